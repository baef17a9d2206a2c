"""Command-line pieces shared by several subcommands; the library side of the CLI (nothing here imports
`qthink.cli`)."""

from __future__ import annotations

import inspect
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import ArgumentError, ArgumentParser
from jsonargparse.typing import register_type

from qthink.core.latent import DECODE_MODES
from qthink.errors import UserError, require


def comma_list(text: str) -> list[str]:
    """The items of a comma-separated flag value, stripped, empty ones dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def comma_ints(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers; one line naming `flag` otherwise."""
    try:
        return [int(item) for item in comma_list(text)]
    except ValueError as e:
        raise UserError(f"{flag} takes comma-separated integers (got {text!r})") from e


def parse_decode_modes(text: str) -> tuple[str, ...]:
    """`--decode-modes`: a comma-separated subset of `qthink.core.latent.DECODE_MODES`, in the order given."""
    modes = tuple(comma_list(text))
    require(bool(modes) and set(modes) <= set(DECODE_MODES),
            f"--decode-modes: {text!r} is not a comma-separated subset of {','.join(DECODE_MODES)}")
    return modes


def require_positive(flags: dict[str, int | float | None]) -> None:
    """Counts and budgets given on the command line must be > 0; checked before any model loads."""
    for flag, value in flags.items():
        require(value is None or value > 0, f"{flag} must be > 0 (got {value})")


# ---- ranges, checked where a value is parsed (before any file is written) ----

SEED_LIMIT = 2**63  # seeds are in [0, 2^63): torch, numpy's SeedSequence and Python's random all take them


def range_type(name: str, base: type, within: Callable[[int | float], bool], meaning: str) -> type:
    """A type for LightningCLI signatures (`QThinkModule`, `TeacherDataModule`): jsonargparse refuses a value
    for which `within` is false when it parses the config (before anything is written), saying it is not
    `meaning`. The parsed value is a plain `base` (checkpoints store the hyperparameters and are read with
    weights_only=True, which refuses other classes). Float ranges are finite, so inf and nan are refused."""
    cls = type(name, (base,), {"__doc__": f"{base.__name__}: {meaning}"})

    def parse(value) -> int | float:
        try:
            number = base(value)
        except (TypeError, ValueError):
            number = None
        integral = base is float or not isinstance(value, float) or value.is_integer()  # 2.5 is not the integer 2
        if isinstance(value, bool) or not integral or number is None or not within(number):  # YAML's true is not 1
            raise ValueError(f"{value} is not {meaning}")
        return number

    register_type(cls, base, parse)
    return cls


COUNT_LIMIT = 2**31  # counts, sizes and budgets: far above any real one, and within every library's int
PositiveCount = range_type("PositiveCount", int, lambda v: 0 < v < COUNT_LIMIT, "an integer in [1, 2^31)")
Count = range_type("Count", int, lambda v: 0 <= v < COUNT_LIMIT, "an integer in [0, 2^31)")
Seed = range_type("Seed", int, lambda v: 0 <= v < SEED_LIMIT, "a seed in [0, 2^63)")
# Lightning's `seed_everything` also seeds numpy's legacy generator, which takes 32 bits
GlobalSeed = range_type("GlobalSeed", int, lambda v: 0 <= v < 2**32, "a seed in [0, 2^32)")
PositiveFinite = range_type("PositiveFinite", float, lambda v: 0 < v < math.inf, "a finite number > 0")
NonNegativeFinite = range_type("NonNegativeFinite", float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
Fraction = range_type("Fraction", float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
Probability = range_type("Probability", float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


# ---- jsonargparse's errors as one line (LightningCLI's and the signature commands') ----

def config_files(argv: list[str]) -> list[str]:
    """The config files named by -c/--config, in order."""
    files = [value for flag, value in zip(argv, argv[1:], strict=False) if flag in ("-c", "--config")]
    return files + [arg.split("=", 1)[1] for arg in argv if arg.startswith(("--config=", "-c="))]


def read_config_file(value: str) -> dict:
    """A config file that exists and is YAML, with the file named in the error (the parser names neither)."""
    path = Path(value)
    require(path.is_file(), f"config file {value} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"config file {value} is not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {value} is not valid YAML{where}: {problem}") from e
    require(data is None or isinstance(data, dict), f"config file {value} holds a {type(data).__name__}, not a "
            "mapping of settings (trainer:, model:, data:)")
    return data or {}


def key_origin(argv: list[str], key: str) -> str:
    """` (in FILE)` for the last config file that sets the dotted `key`, else nothing (a command-line flag)."""
    if any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in argv):
        return ""  # the command line wins over every file
    for value in reversed(config_files(argv)):
        node = read_config_file(value)
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return f" (in {value})"
    return ""


def one_line(message: str, argv: list[str]) -> str:
    """A jsonargparse error on one line (it spreads nested causes over indented lines), naming the config
    file that holds the key it refuses."""
    text = re.sub(r"Expected a <class '([\w.]+)'>", r"expected \1", " ".join(message.split()))
    # a value out of a range type's range (`qthink.arguments.range_type`), alone or in a Union with None/bool:
    # only the range's own sentence, not every subtype's refusal
    # (in a Union, jsonargparse leaves the value out of the subtype's sentence; it follows as "Given value")
    ranged = re.match(r"""(Parser key "[\w.]+": ).*?Not of type \w+: (.*?)is not (.+?)(?: - | Given value|$)""", text)
    if ranged:
        given = re.search(r"Given value: (\S+)", text)
        value = ranged.group(2).strip() or (given.group(1) if given else "the value")
        text = f"{ranged.group(1)}{value} is not {ranged.group(3)}"
    key = re.search(r"""(?:option|Parser key) ['"]([\w.]+)['"]""", text)
    return text + (key_origin(argv, key.group(1)) if key else "")


# ---- commands built from a function's signature (jsonargparse, as LightningCLI builds fit) ----

@dataclass(frozen=True)
class SignatureCommand:
    """A subcommand whose flags are `function`'s parameters (their defaults, types and docstring `Args:`),
    parsed by jsonargparse with `-c FILE` and `--print_config`; the command calls `function` by keyword.

    `skip`: parameters that are not settings (callbacks). `positional`: the required parameters are positional
    arguments instead of required flags. `aliases`: older spellings kept working, "-G": "--G"; a target ending in
    "." takes KEY=VALUE into that dict, "--task-option": "--task_options." (`--task-option steps=6`); one ending
    in "+" appends each value up to the next flag to that list, "-q": "--question+" (`-q A B`). `rest`: a list
    setting ("--targets+") that bare arguments append to (`qthink eval A B --task x`). Any `--snake_case` flag
    may also be written `--kebab-case`, and a bool flag alone means true.
    """

    function: Callable
    skip: frozenset[str] = frozenset()
    positional: bool = False
    aliases: dict[str, str] = field(default_factory=dict)
    rest: str | None = None

    def settings(self) -> dict[str, type]:
        """The flag-named parameters and their types (the required ones excluded when they are positional)."""
        hints = typing.get_type_hints(self.function)
        params = inspect.signature(self.function).parameters.values()
        return {p.name: hints.get(p.name) for p in params if p.name not in self.skip
                and not (self.positional and p.default is inspect.Parameter.empty)}

    def parser(self, prog: str, description: str) -> ArgumentParser:
        spellings = ", ".join(f"{old} KEY=VALUE = {new}KEY VALUE" if new.endswith(".") else
                              f"{old} A B = {new} A {new} B" if new.endswith("+") else f"{old} = {new}"
                              for old, new in self.aliases.items())
        parser = ArgumentParser(prog=prog, description=description, exit_on_error=False,
                                epilog=f"Flags may be written --a-b for --a_b; a bool flag alone means true. {spellings}")
        parser.add_argument("-c", "--config", action="config", help="a YAML file of these settings (as --print_config "
                            "writes them); repeatable, later files and flags win")
        parser.add_function_arguments(self.function, skip=set(self.skip), as_positional=self.positional)
        return parser

    def respell(self, argv: list[str]) -> list[str]:
        """`argv` in the parser's own spellings (see the class)."""
        types, out, i = self.settings(), [], 0
        while i < len(argv):
            arg, i = argv[i], i + 1
            if arg == "--":
                return out + argv[i - 1 :]
            if not arg.startswith("-"):
                out += [self.rest, arg] if self.rest else [arg]
                continue
            name, eq, value = arg.partition("=")
            target = self.aliases.get(name, name)
            if target.endswith("."):  # KEY=VALUE into a dict setting
                pair = value if eq else argv[i] if i < len(argv) else ""
                i += not eq
                key, sep, item = pair.partition("=")
                require(bool(sep) and key.strip() != "", f"{name} must be KEY=VALUE (got {pair!r}), e.g. steps=6")
                out.append(f"{target}{key.strip()}={item}")
                continue
            if target.endswith("+"):  # argparse's nargs="+": every value up to the next flag
                values = [value] if eq else []
                while i < len(argv) and not argv[i].startswith("-"):
                    values.append(argv[i])
                    i += 1
                require(bool(values), f"{name} needs at least one value")
                out += [part for v in values for part in (target, v)]
                continue
            if target.startswith("--") and target[2:].replace("-", "_") in types:
                target = "--" + target[2:].replace("-", "_")
            if types.get(target[2:]) is bool and not eq:  # `--flag` alone is true, as argparse's store_true had it
                given = i < len(argv) and argv[i].lower() in ("true", "false")
                eq, value, i = "=", argv[i] if given else "true", i + given
            elif self.rest and not eq and target not in VALUELESS and i < len(argv):  # its value, not a bare argument
                eq, value, i = "=", argv[i], i + 1
            out.append(f"{target}{eq}{value}")
        return out

    def parse(self, parser: ArgumentParser, argv: list[str]) -> dict:
        """The settings of `argv` as keyword arguments of `function`; a mistake is one line (`UserError`)."""
        argv = self.respell(argv)
        try:
            config = parser.parse_args(argv)
        except ArgumentError as e:
            message = str(e)
            if message.startswith("the following arguments are required:"):  # as flags, the way they are typed
                flags = self.settings()
                message = re.sub(r"\b\w+\b", lambda m: f"--{m[0]}" if m[0] in flags else m[0], message)
            raise UserError(f"{one_line(message, argv)} (see `{parser.prog} --help`)") from e
        settings = config.as_dict()
        settings.pop("config", None)
        return settings


VALUELESS = ("-h", "--help", "--print_config")  # flags that take no value (a bool setting alone means true)


@dataclass(frozen=True)
class CommandGroup:
    """A subcommand with subcommands of its own (`qthink bench inference|train|...`): `commands` maps each name
    to its `SignatureCommand` and help line; the settings are that command's, plus `what`, its name."""

    commands: dict[str, tuple[SignatureCommand, str]]

    def parser(self, prog: str, description: str) -> ArgumentParser:
        parser = ArgumentParser(prog=prog, description=description, exit_on_error=False)
        sub = parser.add_subcommands(dest="what")
        for name, (command, help_text) in self.commands.items():
            sub.add_subcommand(name, command.parser(f"{prog} {name}", help_text), help=help_text)
        return parser

    def parse(self, parser: ArgumentParser, argv: list[str]) -> dict:
        if argv and argv[0] in ("-h", "--help"):
            parser.parse_args(argv)  # prints the subcommands and exits
        require(bool(argv) and argv[0] in self.commands, f"{parser.prog}: choose one of {', '.join(self.commands)} "
                f"(see `{parser.prog} --help`)")
        command, help_text = self.commands[argv[0]]
        return {"what": argv[0], **command.parse(command.parser(f"{parser.prog} {argv[0]}", help_text), argv[1:])}
