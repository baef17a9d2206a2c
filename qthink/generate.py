"""`qthink generate CKPT -q QUESTION... | --input FILE.jsonl`: answers with latent reasoning, one JSON line each.

A thin command over `QThink.from_pretrained` + `QThink.generate`; its flags are `generate_answers`' parameters
(`qthink.arguments.SignatureCommand`).
"""

import json

from qthink.arguments import SignatureCommand, require_positive
from qthink.core.model import check_decode_mode
from qthink.errors import UserError, require
from qthink.files import jsonl_values
from qthink.recipe import SEED


def read_questions(path: str) -> list[str]:
    """The `question` field of each line of a JSON lines file; a bad line is one line naming it."""
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON lines") from e
    questions = []
    for where, record in jsonl_values(path, text, "one object per line"):
        require(isinstance(record, dict) and isinstance(record.get("question"), str),
                f"{where}: needs a string field `question`")
        questions.append(record["question"])
    return questions


def generate_answers(ckpt: str, question: list[str] | None = None, input: str | None = None,
                     latent_steps: int | None = None, max_new_tokens: int = SEED.max_answer_tokens,
                     batch_size: int = 16, decode_mode: str = "dynamic", dtype: str = "auto",
                     device: str | None = None, trust_remote_code: bool = False) -> list[dict]:
    """The answer of each question (`question` then `input`'s), in order, as `QThink.generate` gives them.

    Args:
        ckpt: seed-format checkpoint directory or Hugging Face repo id
        question: question(s) to answer (-q Q1 Q2 ...)
        input: JSON lines file with a `question` field per line
        latent_steps: K (default: the checkpoint's; an adaptive checkpoint then chooses each question's, at most K)
        max_new_tokens: answer token budget
        batch_size: questions decoded together
        decode_mode: dynamic (default) | static (fixed-shape StaticCache) | compiled (static + torch.compile, CUDA
            graphs on CUDA; the first batch of each shape compiles, ~30 s or more)
        dtype: float32 | bfloat16 | float16 | auto (the checkpoint's)
        device: cpu | cuda (default: cuda if available)
        trust_remote_code: allow custom model code from the repo
    """
    from qthink.core.device import parse_dtype, pick_device
    from qthink.core.model import QThink

    questions = list(question or []) + (read_questions(input) if input else [])
    require(bool(questions), "no questions given: pass -q QUESTION or --input FILE.jsonl")
    require_positive({"--batch-size": batch_size, "--max-new-tokens": max_new_tokens})
    check_decode_mode(decode_mode)
    qt = QThink.from_pretrained(ckpt, parse_dtype(dtype), pick_device(device), trust_remote_code)
    return qt.generate(questions, latent_steps, max_new_tokens, batch_size, decode_mode=decode_mode)


# `-q A B C` (argparse's nargs="+") appends each question to the list
COMMAND = SignatureCommand(generate_answers, positional=True, aliases={"-q": "--question+", "--question": "--question+"})


def cli_main(settings: dict) -> None:
    for r in generate_answers(**settings):
        print(json.dumps({"question": r["question"], "answer": r["answer"], "token_ids": r["token_ids"],
                          "latent_steps": r["latent_steps"]}), flush=True)
