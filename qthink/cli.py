"""The `qthink` command: one subcommand per pipeline stage (ARCHITECTURE.md contract 4).

`fit`, `validate` and `test` are LightningCLI (`qthink.training.lightning_cli`); every other subcommand lives in the
module that implements it, which exposes `cli_main(settings) -> int | None` and either `COMMAND`, a
`qthink.arguments.SignatureCommand` whose function's signature is the command's flags (`-c FILE`, `--print_config`;
rollouts, teachers), or `add_cli_arguments(parser)` (argparse; the commands not yet converted).
User mistakes raise `qthink.errors.UserError` and are printed here as one line, exit status 2; Ctrl-C exits 130 and
SIGTERM, handled the same way (`qthink.signals`), 143.
"""

import argparse
import importlib
import logging
import os
import sys

from qthink.errors import UserError
from qthink.recipe import SEED
from qthink.signals import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, sigterm_as_interrupt

# subcommand -> (module, one-line help)
COMMANDS = {
    "tiny-base": ("qthink.core.tiny", "build the embedded tiny Qwen3 base model (no network)"),
    "init": ("qthink.core.model", "wrap a base model with a fresh projection head as a seed-format checkpoint"),
    "generate": ("qthink.cli", "answer questions with latent reasoning (JSON lines out)"),
    "rollouts": ("qthink.teachers.rollouts", "sample G chain-of-thought rollouts per problem"),
    "teachers": ("qthink.teachers.extract", "extract the teacher hidden-state store from rollouts"),
    "export": ("qthink.export", "merge a Lightning checkpoint's LoRA and write a seed-format checkpoint"),
    "eval": ("qthink.evaluate", "evaluate checkpoints / base models on a benchmark"),
    "demo": ("qthink.demo", "the whole method end to end on a tiny model, on CPU"),
    "bench": ("qthink.bench.inference", "measure speed and memory against the seed recipe and alternatives"),
}
LIGHTNING = ("fit", "validate", "test")


def quiet_libraries() -> None:
    """Silence per-call progress bars and advisories from transformers/hub that bury qthink's own output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


# ---- the foundation's own subcommands ----

def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="seed-format checkpoint directory or Hugging Face repo id")
    p.add_argument("-q", "--question", nargs="+", default=[], help="question(s) to answer")
    p.add_argument("--input", help="JSON lines file with a `question` field per line")
    p.add_argument("--latent-steps", type=int, default=None,
                   help="K (default: the checkpoint's; an adaptive checkpoint then chooses each question's, at most K)")
    p.add_argument("--max-new-tokens", type=int, default=SEED.max_answer_tokens, help="answer token budget")
    p.add_argument("--batch-size", type=int, default=16, help="questions decoded together")
    from qthink.arguments import add_decode_mode_argument

    add_decode_mode_argument(p)
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the repo")


def read_questions(path: str) -> list[str]:
    import json

    questions = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON lines") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); one object per line") from e
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise UserError(f"{path}:{n}: needs a string field `question`")
        questions.append(record["question"])
    return questions


def generate_main(args) -> None:
    import json

    from qthink.arguments import require_positive
    from qthink.core.device import parse_dtype, pick_device
    from qthink.core.model import QThink

    questions = list(args.question) + (read_questions(args.input) if args.input else [])
    if not questions:
        raise UserError("no questions given: pass -q QUESTION or --input FILE.jsonl")
    require_positive({"--batch-size": args.batch_size, "--max-new-tokens": args.max_new_tokens})
    device = pick_device(args.device)
    qt = QThink.from_pretrained(args.ckpt, parse_dtype(args.dtype), device, args.trust_remote_code)
    for r in qt.generate(questions, args.latent_steps, args.max_new_tokens, args.batch_size,
                         decode_mode=args.decode_mode):
        print(json.dumps({"question": r["question"], "answer": r["answer"], "token_ids": r["token_ids"],
                          "latent_steps": r["latent_steps"]}), flush=True)


LOCAL = {
    "generate": (add_generate_arguments, generate_main),
}


def top_level_help() -> str:
    lines = ["usage: qthink COMMAND [ARGS...]   (qthink COMMAND --help for a command's options)", "", "commands:"]
    for name in LIGHTNING:
        lines.append(f"  {name:<10} LightningCLI {name} -c CONFIG.yaml [--ckpt_path last]")
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def command_parser(name: str):
    """The parser of one subcommand; only that subcommand's module is imported. A module with a `COMMAND`
    (`qthink.arguments.SignatureCommand`) has its flags built from its function's signature (jsonargparse);
    the others still add argparse flags in `add_cli_arguments`."""
    from qthink.arguments import OneLineParser

    module, help_text = COMMANDS[name]
    command = None if name in LOCAL else getattr(importlib.import_module(module), "COMMAND", None)
    if command is not None:
        return command.parser(f"qthink {name}", help_text)
    parser = OneLineParser(prog=f"qthink {name}", description=help_text)
    add_arguments = LOCAL[name][0] if name in LOCAL else importlib.import_module(module).add_cli_arguments
    add_arguments(parser)
    return parser


def parse_command(name: str, argv: list[str]):
    """The settings of `qthink NAME ARGV...`: a dict of keyword arguments for a signature command, else
    argparse's namespace."""
    parser = command_parser(name)
    command = None if name in LOCAL else getattr(importlib.import_module(COMMANDS[name][0]), "COMMAND", None)
    return command.parse(parser, argv) if command is not None else parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(top_level_help())
        return 0 if argv else 1
    name = argv[0]
    if name not in COMMANDS and name not in LIGHTNING:
        print(f"qthink: error: unknown command {name!r}; known: {', '.join([*LIGHTNING, *COMMANDS])}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():
            quiet_libraries()
            if name in LIGHTNING:
                from qthink.training.lightning_cli import run_lightning_cli

                run_lightning_cli(argv)
                return 0
            args = parse_command(name, argv[1:])
            run = LOCAL[name][1] if name in LOCAL else importlib.import_module(COMMANDS[name][0]).cli_main
            return int(run(args) or 0)
    except UserError as e:
        print(f"qthink: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("qthink: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("qthink: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
