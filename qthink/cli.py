"""The `qthink` command: one subcommand per pipeline stage (ARCHITECTURE.md contract 4).

`fit`, `validate` and `test` are LightningCLI (`qthink.training.lightning_cli`); every other subcommand lives in the
module that implements it, which exposes `cli_main(settings) -> int | None` and `COMMAND`: a
`qthink.arguments.SignatureCommand` whose function's signature is the command's flags (`-c FILE`, `--print_config`;
`bench` is a `CommandGroup` of them, one per bench). Only the chosen subcommand's module is imported, so `qthink --help` answers without torch.
User mistakes raise `qthink.errors.UserError` and are printed here as one line, exit status 2; Ctrl-C exits 130 and
SIGTERM, handled the same way (`qthink.signals`), 143.
"""

import importlib
import os
import sys

from qthink.errors import UserError
from qthink.signals import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    exit_within,
    sigint_recorded,
    sigterm_as_interrupt,
)

# subcommand -> (module, one-line help)
COMMANDS = {
    "tiny-base": ("qthink.core.tiny", "build the embedded tiny Qwen3 base model (no network)"),
    "init": ("qthink.core.model", "wrap a base model with a fresh projection head as a seed-format checkpoint"),
    "generate": ("qthink.generate", "answer questions with latent reasoning (JSON lines out)"),
    "rollouts": ("qthink.teachers.rollouts", "sample G chain-of-thought rollouts per problem"),
    "teachers": ("qthink.teachers.extract", "extract the teacher hidden-state store from rollouts"),
    "export": ("qthink.export", "merge a Lightning checkpoint's LoRA and write a seed-format checkpoint"),
    "eval": ("qthink.evaluate", "evaluate checkpoints / base models on a benchmark"),
    "demo": ("qthink.demo", "the whole method end to end on a tiny model, on CPU"),
    "bench": ("qthink.bench.inference", "measure speed and memory against the seed recipe and alternatives"),
}
LIGHTNING = ("fit", "validate", "test")




def top_level_help() -> str:
    lines = ["usage: qthink COMMAND [ARGS...]   (qthink COMMAND --help for a command's options)", "", "commands:"]
    for name in LIGHTNING:
        lines.append(f"  {name:<10} LightningCLI {name} -c CONFIG.yaml [--ckpt_path last]")
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def command_parser(name: str):
    """The parser of one subcommand, its flags built from its function's signature (jsonargparse); only that
    subcommand's module is imported."""
    module, help_text = COMMANDS[name]
    return importlib.import_module(module).COMMAND.parser(f"qthink {name}", help_text)


def parse_command(name: str, argv: list[str]) -> dict:
    """The settings of `qthink NAME ARGV...`: keyword arguments of the command's function."""
    return importlib.import_module(COMMANDS[name][0]).COMMAND.parse(command_parser(name), argv)


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
        with sigterm_as_interrupt(), sigint_recorded():
            from qthink.parallel import quiet_libraries

            quiet_libraries()
            if name in LIGHTNING:
                from qthink.training.lightning_cli import run_lightning_cli

                run_lightning_cli(argv)
                return 0
            args = parse_command(name, argv[1:])
            return int(importlib.import_module(COMMANDS[name][0]).cli_main(args) or 0)
    except UserError as e:
        print(f"qthink: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("qthink: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("qthink: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> None:
    """The `qthink` command: `main`, then exit with its status, within `EXIT_GRACE_S` after Ctrl-C or SIGTERM."""
    try:
        code = main()
    except BrokenPipeError:  # `qthink ... | head` closed the pipe: end quietly, as other commands do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(1)
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        exit_within(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
