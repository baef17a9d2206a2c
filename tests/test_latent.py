"""The latent loop's contract: batched `QThink.generate` is the seed's published recipe, batch-invariant,
reproducible when sampling, differentiable through every latent step; `qthink generate` end to end.

The model is the tiny real Qwen3 wrapped by `init_checkpoint`, float32 on CPU, with weights redrawn at
std 2/sqrt(fan_in) (`qthink.bench.inference.spread_weights`): a default-initialised tiny model repeats one token
whatever it attends to, which would hide masking and position errors from a token-equality test.
"""

import json
import random
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from qthink.bench.inference import spread_weights
from qthink.bench.seed_recipe import seed_generate
from qthink.cli import main
from qthink.core.decoder_step import LayerStep
from qthink.core.kv_cache import ReservedLayer, static_capacity
from qthink.core.latent import decode, generate, think
from qthink.core.model import HEAD_PT, HEAD_ST, QThink, init_checkpoint
from qthink.core.sampling import Sampler
from qthink.core.sequences import encode_prompts, left_pad
from qthink.errors import UserError

WORDS = ("the a of to and in is it what how many sum total left step a=3 b=a+4 c=b*2 d? x y 7 8 9 + - * "
         "( ) ? ! . , json tool Action: {\"id\": 12} überall 東京").split()
MAX_NEW = 20


def random_questions(seed: int, n: int) -> list[str]:
    """Questions of 1 to 60 words, so a batch of 8 needs up to ~100 columns of left padding."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def ckpt(tiny_base, tmp_path_factory):
    return init_checkpoint(str(tiny_base), tmp_path_factory.mktemp("ckpt") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def qt(ckpt) -> QThink:
    return QThink.from_pretrained(ckpt, torch.float32)


def spread(qt: QThink, seed: int) -> QThink:
    spread_weights(qt.model, seed)
    spread_weights(qt.head, seed + 1000)
    return qt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_generate_equals_seed_recipe(qt, seed):
    spread(qt, seed)
    questions = random_questions(seed, 16)
    for k in (0, 1, 6):
        want = [seed_generate(qt.model, qt.tokenizer, qt.head, q, k, MAX_NEW) for q in questions]
        got = [r["token_ids"] for r in qt.generate(questions, k, MAX_NEW, batch_size=8)]
        assert got == want, f"K={k}: batched tokens differ from the seed recipe"
        assert len({tuple(w[:3]) for w in want}) >= 8, "outputs barely depend on the question: the test is blind"


def test_equality_test_sees_masking_errors(qt):
    """Control: attending to left padding (CODI's missing mask) changes tokens, so the equality above is a
    real check of the masks and positions."""
    spread(qt, 0)
    questions = random_questions(0, 8)
    batch = left_pad(encode_prompts(qt.tokenizer, questions), qt.tokenizer.pad_token_id)
    args = (6, MAX_NEW, qt.tokenizer.eos_token_id, qt.tokenizer.pad_token_id)
    right = generate(qt.model, qt.head, batch.input_ids, batch.attention_mask, *args)
    wrong = generate(qt.model, qt.head, batch.input_ids, torch.ones_like(batch.attention_mask), *args)
    assert not torch.equal(right.tokens, wrong.tokens)


def test_batch_invariance(qt):
    spread(qt, 2)
    questions = random_questions(2, 16)
    alone = {q: r["token_ids"] for q, r in zip(questions, qt.generate(questions, 6, MAX_NEW, batch_size=1), strict=True)}
    rng = random.Random(0)
    for size in (2, 5, 11, 16):
        subset = rng.sample(questions, size)
        for r in qt.generate(subset, 6, MAX_NEW, batch_size=size):
            assert r["token_ids"] == alone[r["question"]], f"output changed inside a shuffled batch of {size}"
    for r in qt.generate(questions, 6, MAX_NEW, batch_size=3):
        assert r["token_ids"] == alone[r["question"]]


def test_sampling_is_reproducible_and_batch_independent(qt):
    spread(qt, 3)
    questions = random_questions(3, 10)
    runs = [[r["token_ids"] for r in qt.generate(questions, 6, MAX_NEW, batch_size=b, sampler_seed=7, temperature=1.0)]
            for b in (10, 10, 1, 4)]
    assert runs[0] == runs[1] == runs[2] == runs[3]
    other = [r["token_ids"] for r in qt.generate(questions, 6, MAX_NEW, batch_size=10, sampler_seed=8, temperature=1.0)]
    greedy = [r["token_ids"] for r in qt.generate(questions, 6, MAX_NEW, batch_size=10)]
    assert other != runs[0] and greedy != runs[0], "the sampler does not sample"


def test_preallocated_cache_equals_dynamic_cache(qt):
    """Inference preallocates the KV cache (`ReservedLayer`); training keeps HF's `DynamicLayer`. Both give
    bit-identical states and tokens, also when the reserve runs out and when G samples share a prefill."""
    spread(qt, 5)
    batch = left_pad(encode_prompts(qt.tokenizer, random_questions(5, 6)), qt.tokenizer.pad_token_id)
    ids, mask, eos, pad = batch.input_ids, batch.attention_mask, qt.tokenizer.eos_token_id, qt.tokenizer.pad_token_id
    fast = generate(qt.model, qt.head, ids, mask, 6, MAX_NEW, eos, pad)
    with torch.no_grad():
        short = think(qt.model, qt.head, ids, mask, 6, reserve=0)  # no room: the buffer and the mask must grow
    with torch.enable_grad():
        plain = think(qt.model, qt.head, ids, mask, 6, reserve=MAX_NEW)
    assert all(type(layer) is ReservedLayer for layer in short.cache.layers)
    assert all(type(layer) is DynamicLayer for layer in plain.cache.layers)
    for state in (short, plain):
        gen = decode(qt.model, state, MAX_NEW, eos, pad)
        assert torch.equal(gen.tokens, fast.tokens) and torch.equal(gen.latents, fast.latents)
    seeds = torch.arange(18)
    shared = generate(qt.model, qt.head, ids, mask, 6, MAX_NEW, eos, pad, Sampler(seeds), num_samples=3)
    repeated = generate(qt.model, qt.head, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), 6, MAX_NEW,
                        eos, pad, Sampler(seeds))
    assert torch.equal(shared.tokens, repeated.tokens)


def test_layer_step_equals_the_decoders_forward(qt, monkeypatch):
    """`dynamic` inference steps call the layers directly (`LayerStep`: the mask and RoPE set up once per
    `think`); they give bit-identical states to `decoder.forward`: with and without padding (the forward then
    passes no mask), when rows stop thinking early (a latent column turns 0), and when the mask outgrows its
    reserve (the RoPE table grows)."""
    spread(qt, 8)
    tok = qt.tokenizer
    padded = left_pad(encode_prompts(tok, random_questions(8, 5)), tok.pad_token_id)
    alike = left_pad(encode_prompts(tok, random_questions(9, 1) * 4), tok.pad_token_id)
    assert bool(alike.attention_mask.all()) and not bool(padded.attention_mask.all())
    cases = [(padded, None, MAX_NEW), (alike, None, MAX_NEW), (alike, torch.tensor([6, 2, 0, 4]), MAX_NEW),
             (padded, None, 0)]

    def run(batch, row_steps, reserve):
        with torch.inference_mode():
            state = think(qt.model, qt.head, batch.input_ids, batch.attention_mask, 6, reserve, row_steps=row_steps)
            used = state.layer_step is not None
            return used, state.latents.clone(), decode(qt.model, state, MAX_NEW, -1, tok.pad_token_id).tokens

    fast = [run(*case) for case in cases]
    monkeypatch.setattr(LayerStep, "for_state", classmethod(lambda cls, *args: None))
    for (used, latents, tokens), (plain_used, plain_latents, plain_tokens) in zip(fast, [run(*c) for c in cases],
                                                                                   strict=True):
        assert used and not plain_used
        assert torch.equal(latents, plain_latents) and torch.equal(tokens, plain_tokens)


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_static_and_compiled_decoding_give_the_dynamic_tokens(qt, mode):
    """The fixed-shape modes (StaticCache + the whole mask, and that under torch.compile: inductor on CPU) decode
    the same tokens as the default path, greedy and sampled, on batches with up to ~100 columns of left padding;
    the hidden states agree to float rounding (attention also reduces over the masked columns)."""
    spread(qt, 6)
    questions = random_questions(6, 8)
    dynamic = qt.generate(questions, 6, MAX_NEW, batch_size=4)
    fixed = qt.generate(questions, 6, MAX_NEW, batch_size=4, decode_mode=mode)
    assert [r["token_ids"] for r in fixed] == [r["token_ids"] for r in dynamic]
    batch = left_pad(encode_prompts(qt.tokenizer, questions[:4]), qt.tokenizer.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, 6, MAX_NEW, qt.tokenizer.eos_token_id, qt.tokenizer.pad_token_id)
    want = generate(qt.model, qt.head, *args, Sampler(torch.arange(8), temperature=1.0), num_samples=2)
    got = generate(qt.model, qt.head, *args, Sampler(torch.arange(8), temperature=1.0), num_samples=2, decode_mode=mode)
    assert torch.equal(got.tokens, want.tokens)
    assert torch.allclose(got.latents, want.latents, atol=1e-3, rtol=1e-3)


def test_static_cache_is_bucketed_and_reused(qt):
    """Capacities round up to a bucket (few compiled shapes); a second call of the same shape gets the same
    buffers back, reset (a CUDA graph replays on the same addresses); a new shape gets new ones."""
    assert [static_capacity(n) for n in (1, 64, 65, 97, 129, 200, 1000)] == [64, 64, 96, 128, 192, 256, 1024]
    batch = left_pad(encode_prompts(qt.tokenizer, random_questions(7, 3)), qt.tokenizer.pad_token_id)
    with torch.inference_mode():
        first = think(qt.model, qt.head, batch.input_ids, batch.attention_mask, 6, MAX_NEW, "static")
        keys = first.cache.layers[0].keys
        assert first.mask.shape[1] == static_capacity(batch.input_ids.shape[1] + 6 + MAX_NEW)
        again = think(qt.model, qt.head, batch.input_ids, batch.attention_mask, 6, MAX_NEW, "static")
        assert again.cache.layers[0].keys.data_ptr() == keys.data_ptr()
        assert torch.equal(again.latents, first.latents)
        other = think(qt.model, qt.head, batch.input_ids[:2], batch.attention_mask[:2], 6, MAX_NEW, "static")
        assert other.cache.layers[0].keys.shape[0] == 2


def test_decode_mode_bad_input(qt, ckpt):
    with pytest.raises(UserError, match="--decode-mode must be one of dynamic, static, compiled"):
        qt.generate(["x"], decode_mode="fast")
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    with torch.enable_grad(), pytest.raises(ValueError, match="inference"):
        think(qt.model, qt.head, ids, mask, 2, decode_mode="static")
    proc = subprocess.run([sys.executable, "-m", "qthink", "generate", str(ckpt), "-q", "x", "--decode-mode", "fast"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--decode-mode must be one of dynamic, static, compiled" in proc.stderr


class RecordingHead(nn.Module):
    """The head, keeping each latent step's output with its gradient."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head, self.outputs = head, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(x)
        y.retain_grad()
        self.outputs.append(y)
        return y


def test_gradients_flow_through_every_latent_step(ckpt):
    from peft import LoraConfig, get_peft_model

    qt = spread(QThink.from_pretrained(ckpt, torch.float32), 4)
    model = get_peft_model(qt.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    head = RecordingHead(qt.head.train())
    batch = left_pad(encode_prompts(qt.tokenizer, random_questions(4, 3)), qt.tokenizer.pad_token_id)
    state = think(model, head, batch.input_ids, batch.attention_mask, latent_steps=6)
    state.latents[:, -1].pow(2).sum().backward()  # a loss on h_K alone
    assert len(head.outputs) == 6
    for k, out in enumerate(head.outputs):
        assert out.grad is not None and out.grad.abs().sum() > 0, f"no gradient reaches latent step {k + 1}"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qt.head.parameters())
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    with torch.no_grad():  # the latents attend to the prompt: another prompt, another h_K
        other = left_pad(encode_prompts(qt.tokenizer, random_questions(5, 3)), qt.tokenizer.pad_token_id)
        h_other = think(model, qt.head, other.input_ids, other.attention_mask, 6).latents[:, -1]
    assert not torch.allclose(h_other, state.latents[:, -1].detach())


def test_generate_cli_end_to_end(ckpt):
    questions = ["a=1 b=a+2 b?", "what is the total?"]
    proc = subprocess.run([sys.executable, "-m", "qthink", "generate", str(ckpt), "-q", *questions,
                           "--max-new-tokens", "6", "--latent-steps", "2", "--batch-size", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["question"] for r in lines] == questions
    for r in lines:
        assert isinstance(r["answer"], str) and 1 <= len(r["token_ids"]) <= 6


def broken_checkpoints(ckpt, tiny_base, root):
    """(name, checkpoint dir) of each kind of bad checkpoint."""
    import shutil

    from safetensors.torch import save_file

    from qthink.core.latent import ProjectionHead
    from qthink.identity import CHECKSUMS

    def copy(name):  # hand-edited, without qthink's checksums: the loader's own checks must catch each
        folder = shutil.copytree(ckpt, root / name)
        (folder / CHECKSUMS).unlink()
        return folder

    wrong = copy("wrong-hidden")
    state = {k: v.contiguous() for k, v in ProjectionHead(64).state_dict().items()}
    save_file(state, str(wrong / HEAD_ST))
    torch.save(state, wrong / HEAD_PT)
    corrupt = copy("corrupt-head")
    (corrupt / HEAD_ST).write_bytes(b"\x00not a safetensors file")
    empty = root / "empty"
    empty.mkdir()
    return {"not-a-checkpoint": empty, "base-model-no-head": tiny_base, "wrong-hidden": wrong, "corrupt-head": corrupt}


# what each one-line error must say, so that each case fails for its own reason
EXPECT = {"no-questions": "no questions", "longer-than-context": "exceeds the model's context",
          "negative-K": "--latent-steps", "zero-max-new-tokens": "--max-new-tokens",
          "not-a-checkpoint": "not a qthink checkpoint", "base-model-no-head": "base model",
          "wrong-hidden": "hidden size 128", "corrupt-head": "corrupt"}
BAD_ARGS = {
    "no-questions": [],
    "longer-than-context": ["-q", "word " * 3000],
    "negative-K": ["-q", "hi", "--latent-steps", "-1"],
    "zero-max-new-tokens": ["-q", "hi", "--max-new-tokens", "0"],
}


def test_generate_cli_bad_input(ckpt, tiny_base, tmp_path, capsys):
    cases = [(name, [str(ckpt), *args]) for name, args in BAD_ARGS.items()]
    cases += [(name, [str(path), "-q", "hi"]) for name, path in broken_checkpoints(ckpt, tiny_base, tmp_path).items()]
    for name, args in cases:
        code = main(["generate", *args])
        err = capsys.readouterr().err
        assert code != 0, name
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, f"{name}: {err}"
        assert EXPECT[name] in err, f"{name}: {err}"


def test_generate_cli_bad_input_process(ckpt, tmp_path):
    """The same through a real process: exit status, one stderr line, no traceback."""
    (tmp_path / "empty.jsonl").write_text("")
    proc = subprocess.run([sys.executable, "-m", "qthink", "generate", str(ckpt), "--input", str(tmp_path / "empty.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_think_latents_are_batch_by_k_by_hidden_for_every_k(qt):
    batch = left_pad(encode_prompts(qt.tokenizer, ["a=1 b=a+2 b?", "a=3 b=a*2 c=b+1 c?"]), qt.tokenizer.pad_token_id)
    hidden = qt.model.config.hidden_size
    for k in (0, 1, 3):
        with torch.inference_mode():
            state = think(qt.model, qt.head, batch.input_ids, batch.attention_mask, k)
        assert tuple(state.latents.shape) == (2, k, hidden)
