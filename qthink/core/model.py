"""`QThink`: a base causal LM plus the projection head, in the seed's checkpoint format.

The seed-format checkpoint (ARCHITECTURE.md contract 3) is a directory `AutoModelForCausalLM.from_pretrained`
loads (merged LoRA), plus `projection_head.pt` (state dict, keys `mlp.0.*`, `mlp.2.*`, `mlp.3.*`),
`projection_head.safetensors` (the same tensors) and `qthink.json` (K, hidden size, how it was trained);
an adaptive student (it decides how many latent steps to take, at most K) adds `halting_head.safetensors`.
The seed's own usage snippet runs unchanged on a directory written by `save_pretrained`.
"""

import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from qthink.arguments import Seed, SignatureCommand
from qthink.core.latent import DECODE_MODES, HaltingHead, ProjectionHead, generate
from qthink.core.sampling import Sampler, row_seed
from qthink.core.sequences import encode_prompts, left_pad, length_batches, output_text, stop_ids
from qthink.errors import UserError, require
from qthink.files import read_json, temp_dir_beside, writable_dir
from qthink.identity import fingerprint, verify_checksums, write_checksums
from qthink.ownership import lock_beside, write_marker
from qthink.recipe import SEED

HEAD_PT, HEAD_ST, META = "projection_head.pt", "projection_head.safetensors", "qthink.json"
HALT_ST = "halting_head.safetensors"


def config_of(base_model: str, trust_remote_code: bool = False):
    """`base_model`'s transformers config, without loading its weights; one line when it cannot be read."""
    from transformers import AutoConfig

    try:
        check_model_ref(base_model)
        return AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config of {base_model!r}: {str(e).splitlines()[0]}") from e


def hidden_size_of(base_model: str, trust_remote_code: bool = False) -> int:
    return int(config_of(base_model, trust_remote_code).hidden_size)


def linear_layer_names(base_model: str, trust_remote_code: bool = False) -> set[str]:
    """Dotted names of `base_model`'s linear layers (what LoRA's `target_modules` name), from its config alone:
    the model is built on the meta device, so no weight is read or allocated."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_of(base_model, trust_remote_code),
                                                 trust_remote_code=trust_remote_code)
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def context_length(config) -> int:
    """The longest sequence a model of `config` takes (its `max_position_embeddings`; unbounded without one)."""
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


def context_length_of(base_model: str, trust_remote_code: bool = False) -> int:
    return context_length(config_of(base_model, trust_remote_code))


def load_base(path_or_repo: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a local directory or a Hugging Face repo id, with a one-line error."""
    check_model_ref(path_or_repo)
    local = Path(path_or_repo)
    if local.is_dir():  # a damaged or swapped file would load and answer differently, without a word
        verify_checksums(local)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path_or_repo), dtype=dtype or "auto", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, SafetensorError) as e:  # missing, unreachable, or a cut/damaged weights file
        where = "local directory" if local.exists() else "local directory or reachable Hugging Face repo"
        raise UserError(f"cannot load model {path_or_repo!r} ({where}): {str(e).splitlines()[0]}") from e
    if dtype is None and model.dtype == torch.float16 and not torch.cuda.is_available():
        model = model.float()  # fp16 matmuls are slow or missing on CPU
    tokenizer = load_tokenizer(path_or_repo, trust_remote_code)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def load_tokenizer(path_or_repo: str | Path, trust_remote_code: bool = False):
    """A model's tokenizer, with a one-line error; pad falls back to EOS (Qwen3 has both)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path_or_repo), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {str(path_or_repo)!r}: {str(e).splitlines()[0]}") from e
    require(tokenizer.eos_token_id is not None, f"tokenizer of {path_or_repo} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def looks_local(path_or_repo: str) -> bool:
    """A reference that can only be a path: a hub id is `name` or `owner/name`, so anything absolute, starting
    with `.` or `~`, with a backslash or more than one `/`, or whose first folder exists here (`runs/tiny-bsae`
    beside `runs/`) is a local folder."""
    parts = Path(path_or_repo).parts
    return (Path(path_or_repo).is_absolute() or path_or_repo.startswith((".", "~")) or "\\" in path_or_repo
            or path_or_repo.count("/") > 1 or (len(parts) > 1 and Path(parts[0]).exists()))


HUB_TIMEOUT_S = 5  # one request to the hub when a hub id is not in the cache (its own default retries ~48 s)


def check_model_ref(path_or_repo: str | Path) -> None:
    """A local model directory, or a hub id that is in the Hugging Face cache or on a reachable hub; one line
    otherwise, at once for a path and within a few seconds for a hub id. Commands call it before they write
    anything (so a mistyped model leaves no manifest naming it) and before any other hub access (whose
    retries would take most of a minute offline, then report something else)."""
    ref, local = str(path_or_repo), Path(path_or_repo)
    if local.exists():
        require(local.is_dir(), f"{local} is a file; give the model directory")
        require((local / "config.json").is_file(), f"{local} has no config.json: it is not a model directory")
        return
    require(not looks_local(ref), f"{ref}: no such directory")
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    neither = f"no local folder {ref}, and"
    try:
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return  # cached: loads offline
    except HFValidationError as e:
        raise UserError(f"{neither} {ref!r} is not a Hugging Face repo id ({str(e).splitlines()[0]})") from e
    require(not constants.is_offline_mode(), f"{neither} not in the Hugging Face cache (HF_HUB_OFFLINE is set); "
            "check the name, or download it while online")
    try:
        HfApi().model_info(ref, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; loading it reports the access it needs
    except RepositoryNotFoundError as e:
        raise UserError(f"{neither} no model {ref} on the Hugging Face hub; check the name") from e
    except Exception as e:  # no network, DNS, timeout, proxy: the hub cannot say
        raise UserError(f"{neither} not in the Hugging Face cache, and the hub is unreachable "
                        f"({type(e).__name__}); check the name or the network") from e


def _fetch(path_or_repo: str, filename: str) -> Path | None:
    """A checkpoint file from a local directory or, for a repo id, from the hub; None if absent."""
    local = Path(path_or_repo)
    if local.exists():
        return local / filename if (local / filename).is_file() else None
    require(not looks_local(path_or_repo), f"{path_or_repo}: no such directory")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(path_or_repo, filename))
    except EntryNotFoundError:
        return None
    except Exception as e:  # no network, unknown repo, auth
        raise UserError(f"cannot fetch {filename} from {path_or_repo!r}: {str(e).splitlines()[0]}") from e


def load_head_state(path: Path) -> dict[str, torch.Tensor]:
    """A head state dict from safetensors or a `weights_only` torch file, with errors naming the file."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is corrupt or not a projection head ({type(e).__name__}); re-export it") from e
    require(isinstance(state, dict), f"{path} does not hold a state dict")
    return state


def build_head(state: dict[str, torch.Tensor], hidden_size: int, source: Path, kind: type[nn.Module] = ProjectionHead):
    head = kind(hidden_size)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    require(set(got) == set(expected), f"{source}: keys {sorted(got)} are not a {kind.__name__}'s {sorted(expected)}")
    for k, shape in expected.items():
        require(got[k] == shape, f"{source}: {k} has shape {got[k]} but the model's hidden size {hidden_size} needs {shape}")
    head.load_state_dict(state)
    return head


class QThink(nn.Module):
    """Base model + projection head; `generate` runs the shared latent loop in batches."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, head: ProjectionHead | None,
                 latent_steps: int = SEED.latent_steps, info: dict | None = None, halting_head: HaltingHead | None = None):
        super().__init__()
        self.model, self.tokenizer, self.head, self.halting_head = model, tokenizer, head, halting_head
        self.latent_steps = latent_steps
        self.info = info or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return context_length(self.model.config)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, trust_remote_code: bool = False) -> "QThink":
        """Load a seed-format checkpoint from a local directory or a Hugging Face repo id."""
        path_or_repo = str(path_or_repo)
        local = Path(path_or_repo)
        if local.exists():
            require(local.is_dir(), f"{local} is a file; give the checkpoint directory")
            require((local / "config.json").is_file(), f"{local} is not a qthink checkpoint (no config.json); "
                    "create one with `qthink init BASE OUT` or `qthink export`")
        check_model_ref(path_or_repo)  # a mistyped folder or an unreachable hub id: at once, not after retries
        head_file = _fetch(path_or_repo, HEAD_ST) or _fetch(path_or_repo, HEAD_PT)
        require(head_file is not None, f"{path_or_repo} has no {HEAD_ST} or {HEAD_PT}: it is a base model, not a "
                "qthink checkpoint; wrap it with `qthink init BASE OUT`")
        meta_file = _fetch(path_or_repo, META)
        info = read_json(meta_file, "re-export the checkpoint") if meta_file is not None else {}
        model, tokenizer = load_base(path_or_repo, dtype, trust_remote_code)
        head = build_head(load_head_state(head_file), model.config.hidden_size, head_file)
        require_finite(model, path_or_repo)
        require_finite(head, head_file)
        halting = None
        if info.get("adaptive"):
            halt_file = _fetch(path_or_repo, HALT_ST)
            require(halt_file is not None, f"{path_or_repo}: qthink.json says adaptive but {HALT_ST} is missing; "
                    "re-export the checkpoint")
            halting = build_head(load_head_state(halt_file), model.config.hidden_size, halt_file, HaltingHead)
            require_finite(halting, halt_file)
            halting = halting.to(model.dtype).eval()
        qt = cls(model, tokenizer, head.to(model.dtype).eval(), int(info.get("latent_steps", 6)), info, halting)
        return qt.to(device) if device is not None else qt

    @classmethod
    def for_base(cls, path_or_repo: str | Path, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, trust_remote_code: bool = False) -> "QThink":
        """A base model without a head, for plain decoding (K = 0): the think / nothink baselines."""
        model, tokenizer = load_base(str(path_or_repo), dtype, trust_remote_code)
        qt = cls(model, tokenizer, None, 0, {"base_model": str(path_or_repo)})
        return qt.to(device) if device is not None else qt

    def save_pretrained(self, out: str | Path, extra_info: dict | None = None) -> Path:
        """Write the seed-format checkpoint; the directory appears whole or not at all. It replaces only an
        empty folder or an earlier qthink checkpoint (`check_checkpoint_dir`)."""
        out = Path(out)
        with lock_beside(out, "checkpoint folder"):
            return self._save_locked(out, extra_info)

    def _save_locked(self, out: Path, extra_info: dict | None) -> Path:
        check_checkpoint_dir(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(out)  # also clears the temporary folder of an earlier export killed mid-write
        try:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            buffer = io.BytesIO()
            torch.save(state, buffer)  # in memory, so a failed write is an OSError (torch's own is a RuntimeError)
            (tmp / HEAD_PT).write_bytes(buffer.getbuffer())
            save_file(state, str(tmp / HEAD_ST))
            if self.halting_head is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.halting_head.state_dict().items()},
                          str(tmp / HALT_ST))
            info = {"format": "qthink-seed-v1", "latent_steps": self.latent_steps,
                    "adaptive": self.halting_head is not None,
                    "hidden_size": self.head.hidden_size, "hidden_state": "post-norm last layer",
                    **self.info, **(extra_info or {})}
            (tmp / META).write_text(json.dumps(info, indent=2) + "\n")
            write_checksums(tmp)
            write_marker(tmp, "checkpoint")
            if out.exists():
                # the old checkpoint moves aside under a name that carries this process (an empty folder a
                # rename may replace), never onto a `.<out>.old` that may be someone else's
                old = temp_dir_beside(out)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except (OSError, SafetensorError) as e:  # a full disk or quota: nothing of this export stays behind
            raise UserError(f"cannot write {out}: {getattr(e, 'strerror', None) or e}; free space or choose "
                            "another folder") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def check_request(self, prompt_lengths: list[int], latent_steps: int, max_new_tokens: int) -> None:
        require(latent_steps >= 0, f"--latent-steps must be >= 0 (got {latent_steps})")
        require(max_new_tokens > 0, f"--max-new-tokens must be > 0 (got {max_new_tokens})")
        require(latent_steps == 0 or self.head is not None, "this model has no projection head, so it can only "
                "decode with --latent-steps 0; wrap it with `qthink init BASE OUT` for latent steps")
        longest = max(prompt_lengths)
        need = longest + latent_steps + max_new_tokens
        require(need <= self.context_length, f"a question of {longest} prompt tokens + {latent_steps} latent steps + "
                f"{max_new_tokens} new tokens exceeds the model's context of {self.context_length}; "
                "shorten the question or lower --max-new-tokens")

    def generate(self, questions: list[str], latent_steps: int | None = None,
                 max_new_tokens: int = SEED.max_answer_tokens, batch_size: int = 16,
                 enable_thinking: bool = False, sampler_seed: int | None = None,
                 temperature: float = SEED.temperature, top_p: float = SEED.top_p, top_k: int = SEED.top_k,
                 on_batch: Callable[[list[int]], None] | None = None, decode_mode: str = "dynamic") -> list[dict]:
        """Answers for `questions`: dicts with `question`, `answer`, `token_ids`, `finished`, `latent_steps`.

        Batches are formed from questions of similar length (less padding); results do not depend on
        batching. Greedy unless `sampler_seed` is given. `on_batch(indices)` is called after each batch with
        the positions in `questions` it answered (progress bars, per-batch timing). `decode_mode`: `dynamic`,
        `static` or `compiled` (static cache + torch.compile; CUDA graphs on CUDA), see `qthink.core.latent`.
        An adaptive model (with a halting head) chooses each question's latent steps, at most K; an explicit
        `latent_steps` turns that off and runs exactly that many.
        """
        require(len(questions) > 0, "no questions given: pass -q QUESTION or --input FILE.jsonl")
        require(batch_size > 0, f"--batch-size must be > 0 (got {batch_size})")
        check_decode_mode(decode_mode)
        k = self.latent_steps if latent_steps is None else latent_steps
        prompts = encode_prompts(self.tokenizer, questions, enable_thinking)
        self.check_request([len(p) for p in prompts], k, max_new_tokens)
        results: list[dict | None] = [None] * len(prompts)
        for idx in length_batches(prompts, batch_size):
            batch = left_pad([prompts[i] for i in idx], self.tokenizer.pad_token_id, self.device)
            sampler = None
            if sampler_seed is not None:
                seeds = torch.tensor([row_seed(sampler_seed, i) for i in idx], device=self.device)
                sampler = Sampler(seeds, temperature, top_p, top_k)
            for i, result in zip(idx, self.decode(batch.input_ids, batch.attention_mask, latent_steps, max_new_tokens,
                                                  sampler, decode_mode), strict=True):
                results[i] = {"question": questions[i], **result}
            if on_batch is not None:
                on_batch(idx)
        return results  # type: ignore[return-value]

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, latent_steps: int | None = None,
               max_new_tokens: int = SEED.max_answer_tokens, sampler: Sampler | None = None,
               decode_mode: str = "dynamic") -> list[dict]:
        """One batch of left-padded prompts -> per row `answer` (`output_text`), `token_ids`, `finished` and
        `latent_steps` (taken). `latent_steps` None: the model's K, and an adaptive model chooses each row's."""
        k = self.latent_steps if latent_steps is None else latent_steps
        halting = self.halting_head if latent_steps is None and k > 0 else None
        pad, eos = self.tokenizer.pad_token_id, stop_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        gen = generate(self.model, self.head, input_ids, attention_mask, k, max_new_tokens, eos, pad, sampler,
                       decode_mode=decode_mode, halting_head=halting)
        # one device-to-host copy per batch, not two per row (each would be a GPU sync)
        tokens, lengths, finished = gen.tokens.tolist(), gen.lengths.tolist(), gen.finished.tolist()
        taken = gen.latent_steps.tolist() if gen.latent_steps is not None else [k] * len(tokens)
        return [{"answer": output_text(self.tokenizer, row[:n], done), "token_ids": row[:n], "finished": done,
                 "latent_steps": steps} for row, n, done, steps in zip(tokens, lengths, finished, taken, strict=True)]


def require_finite(module: nn.Module, where: str | Path) -> None:
    """One line naming the first weight holding NaN or inf: such a checkpoint answers with silent garbage."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{where}: weight {name} holds NaN or inf; this checkpoint is damaged: "
                            "export it again from a Lightning checkpoint that trained without errors")


def generation_config(path_or_repo: str | Path):
    """The model's `generation_config.json` as a transformers GenerationConfig, or None where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(str(path_or_repo))
    except (OSError, ValueError):
        return None


def check_decode_mode(decode_mode: str) -> None:
    """A one-line user error unless `decode_mode` is one of `qthink.core.latent.DECODE_MODES`."""
    require(decode_mode in DECODE_MODES, f"--decode-mode must be one of {', '.join(DECODE_MODES)} (got {decode_mode!r})")


def check_checkpoint_dir(out: str | Path, sources: tuple[str | Path | None, ...] = ()) -> None:
    """One-line refusals before anything is written: `out` must be new, empty or an earlier qthink
    checkpoint (which is replaced), and none of `sources` (the models read to build it)."""
    out = Path(out)
    for source in sources:
        require(source is None or not Path(source).exists() or Path(source).resolve() != out.resolve(),
                f"{out} is also the model this reads ({source}); write the checkpoint to another folder")
    require(not out.exists() or out.is_dir(), f"{out} is a file; choose a folder for the checkpoint")
    require(not out.exists() or (out / META).is_file() or not any(out.iterdir()),
            f"{out} is a folder with other files in it and not a qthink checkpoint; nothing was written: "
            "choose a new or empty folder")
    # written beside `out` and renamed over it: both must be writable
    writable_dir(out, "checkpoint folder")
    writable_dir(out.absolute().parent, "checkpoint parent folder")


def init_checkpoint(base: str, out: str | Path, seed: Seed = 0, latent_steps: int = SEED.latent_steps,
                    trust_remote_code: bool = False) -> Path:
    """Wrap a base model with a freshly initialised head (seeded) and write a seed-format checkpoint.

    Args:
        base: base model directory or Hugging Face repo id (e.g. Qwen/Qwen3-1.7B)
        out: output checkpoint directory
        seed: seed for the head's initial weights
        latent_steps: K recorded in qthink.json
        trust_remote_code: allow custom model code from the repo
    """
    require(latent_steps >= 0, f"--latent-steps must be >= 0 (got {latent_steps})")
    with lock_beside(out, "checkpoint folder"):  # held from the first check to the rename
        return _init_locked(base, out, seed, latent_steps, trust_remote_code)


def _init_locked(base: str, out: str | Path, seed: int, latent_steps: int, trust_remote_code: bool) -> Path:
    check_checkpoint_dir(out, (base,))
    model, tokenizer = load_base(base, None, trust_remote_code)
    torch.manual_seed(seed)
    head = ProjectionHead(model.config.hidden_size).to(model.dtype)
    info = {"base_model": base, "base_fingerprint": fingerprint(base), "trained": "no (fresh head)", "seed": seed}
    qt = QThink(model, tokenizer, head, latent_steps, info)
    return qt.save_pretrained(out)


COMMAND = SignatureCommand(init_checkpoint, positional=True)


def cli_main(settings: dict) -> None:
    print(f"wrote seed-format checkpoint to {init_checkpoint(**settings)}")
