"""The embedded default base model: a tiny Qwen3 that qthink builds itself, with no network.

`qthink tiny-base OUT` writes a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline: a small `Qwen3ForCausalLM` (tied embeddings, random
weights drawn from `--seed`) and a byte-level BPE tokenizer trained here on text the project generates.
The tokenizer carries Qwen3's special tokens and a Qwen3-style chat template that honours
`enable_thinking` exactly as Qwen3's does. Tests, the demo and the benchmarks use it in place of
Qwen/Qwen3-1.7B, which needs the Hugging Face hub.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from qthink.arguments import Seed, SignatureCommand
from qthink.errors import require
from qthink.files import writable_dir
from qthink.identity import CHECKSUMS, write_checksums

PAD, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK, END_THINK]

# Qwen3's chat template, reduced to what qthink uses (system / user / assistant turns, no tools), rendering
# the same strings as Qwen3's for these: an assistant turn's reasoning is shown only for the final turn,
# and `enable_thinking=false` appends an empty think block to the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set reasoning = message.reasoning_content if message.reasoning_content is defined else '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.last and reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

WORDS = (
    "the a of to and in is it that for on with as what how many much each total left more less than "
    "answer question step reason think compute value number sum product difference times plus minus "
    "please put your final within boxed tool action input thought user api name description get set "
    "list create update delete id true false null json format use following begin user assistant system"
).split()


def _tokenizer_corpus(seed: int, n: int = 4000) -> list[str]:
    """Text the BPE merges are learnt from: variable chains, arithmetic words and JSON-like tool calls."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        names = rng.sample("abcdefghijklmnopqrstuvwxyz", 4)
        chain = " ".join(f"{v}={rng.randint(0, 9)}{rng.choice('+-*')}{rng.randint(1, 9)}" for v in names)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
        call = json.dumps({rng.choice(WORDS): rng.choice(WORDS), "id": rng.randint(0, 999)})
        lines.append(f"{chain} {names[-1]}?\n{words}.\nAction: {rng.choice(WORDS)}\nAction Input: {call}\n")
    return lines


def build_tokenizer(seed: int = 0, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text encodes) that splits digits one by one, as Qwen's tokenizer does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, additional_special_tokens=[IM_START, THINK, END_THINK]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(vocab_size: int, hidden_size: int = 128, layers: int = 4, max_positions: int = 2048) -> Qwen3Config:
    """A Qwen3 shape scaled down: 4 heads (2 KV heads, grouped-query as in Qwen3), MLP 4x, tied embeddings."""
    heads = max(2, hidden_size // 32)
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden_size // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def redraw_weights(model: torch.nn.Module, seed: int) -> None:
    """Draw every matrix from N(0, 1/fan_in) instead of Qwen3's N(0, 0.02^2).

    0.02 is sized for hidden sizes in the thousands; at hidden 128 it left the model on a long plateau
    at chance (docs/findings.md, F4).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


# what `build_tiny_base` writes: a folder holding nothing else is an earlier tiny base, replaced only with `force`
TINY_BASE_FILES = {"chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                   "tokenizer.json", "tokenizer_config.json", CHECKSUMS}


def check_output_dir(out: str | Path, force: bool = False) -> Path:
    """`out` if it is new or empty, or (with `force`) an earlier tiny base, and writable: any other model or
    file in it is never overwritten, and a base only when asked (rollouts, stores and runs built on it
    then refuse the new one by its fingerprint)."""
    out = writable_dir(out, "output folder")
    held = sorted((p.name for p in out.iterdir()), key=lambda name: (name.startswith("."), name)) if out.is_dir() else []
    others = [name for name in held if name not in TINY_BASE_FILES]  # visible names first
    require(not others, f"{out} holds files a tiny base does not ({', '.join(others[:3])}); nothing was written: "
            "choose a new or empty folder")
    require(not held or force, f"{out} already holds a tiny base; nothing was written: choose a new folder, or add "
            "--force to replace it (what was built on it will then refuse the new one)")
    return out


def build_tiny_base(out: str | Path, seed: Seed = 0, hidden_size: int = 128, layers: int = 4,
                    force: bool = False) -> Path:
    """Write the tiny Qwen3 base model and its tokenizer to `out`, with checksums (`qthink.identity`); the
    same seed gives the same files. An existing base in `out` is replaced only with `force`.

    Args:
        out: output directory
        seed: seed for the weights and the tokenizer corpus
        hidden_size: hidden size (heads = hidden/32)
        layers: number of decoder layers
        force: replace a tiny base already in OUT (what was built on it then refuses the new one)
    """
    require(hidden_size >= 32 and hidden_size % 32 == 0, f"--hidden-size must be a positive multiple of 32 "
            f"(heads are hidden/32; got {hidden_size})")
    require(layers >= 1, f"--layers must be >= 1 (got {layers})")
    out = check_output_dir(out, force)
    tokenizer = build_tokenizer(seed)
    config = tiny_config(len(tokenizer), hidden_size, layers)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()
    redraw_weights(model, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_checksums(out)
    return out


COMMAND = SignatureCommand(build_tiny_base, positional=True)


def cli_main(settings: dict) -> None:
    print(f"wrote tiny Qwen3 base to {build_tiny_base(**settings)}")
