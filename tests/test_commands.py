"""Every signature command (`qthink.arguments.SignatureCommand`): `--print_config` prints its whole configuration,
`-c FILE` sets a value, and the old dashed spellings are the same settings; parsing only (`qthink.cli.parse_command`),
so nothing heavy runs."""

import pytest
import yaml

from qthink.cli import main, parse_command
from qthink.errors import UserError
from qthink.recipe import SEED

# command words (with its required arguments), a few printed defaults, and one setting a YAML file changes
CASES = {
    "tiny-base": (["tiny-base", "OUT"], {"out": "OUT", "seed": 0, "hidden_size": 128, "layers": 4, "force": False},
                  {"hidden_size": 64}),
    "init": (["init", "BASE", "OUT"], {"base": "BASE", "out": "OUT", "seed": 0, "latent_steps": SEED.latent_steps,
                                       "trust_remote_code": False}, {"latent_steps": 3}),
    "generate": (["generate", "CKPT"], {"ckpt": "CKPT", "question": None, "input": None, "latent_steps": None,
                                        "max_new_tokens": SEED.max_answer_tokens, "batch_size": 16,
                                        "decode_mode": "dynamic", "dtype": "auto"},
                 {"question": ["a=1 b=a+2 b?", "c?"], "decode_mode": "static"}),
    "eval": (["eval", "CKPT", "--task", "synthetic"], {"targets": ["CKPT"], "task": "synthetic", "split": "test",
                                                       "max_new_tokens": SEED.max_answer_tokens, "batch_size": 16,
                                                       "devices": 1, "out": "runs/eval"},
             {"mode": ["nothink"], "limit": 5, "task_options": {"steps": 3}}),
    "demo": (["demo"], {"workdir": "runs/demo", "quick": False, "seed": 0, "chain_steps": None, "fit_steps": None,
                        "systems": None, "ablation_seeds": None, "study": False},
             {"chain_steps": 6, "fit_steps": 20, "systems": "sft,qthink"}),
    "bench-inference": (["bench", "inference"], {"model": "tiny", "batch_sizes": "1,8,32,64", "problems": 64,
                                                 "latent_steps": SEED.latent_steps, "decode_modes": "dynamic"},
                        {"problems": 3, "batch_sizes": "1,3"}),
    "bench-gpu": (["bench", "gpu"], {"batch_size": 8, "latent_steps": SEED.latent_steps, "lora_r": SEED.lora_r,
                                     "prompt_tokens": SEED.max_prompt_tokens, "small": False, "peak_tflops": None},
                  {"small": True, "peak_tflops": 100.0}),
}


def printed(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--print_config"])
    assert stopped.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("name", CASES)
def test_print_config_is_the_whole_configuration(name, tmp_path, capsys):
    words, defaults, change = CASES[name]
    config = printed(words, capsys)
    assert {k: config[k] for k in defaults} == defaults
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(config))
    assert printed([*words, "-c", str(tmp_path / "settings.yaml")], capsys) == config  # it reads back


@pytest.mark.parametrize("name", CASES)
def test_config_file_sets_a_value(name, tmp_path):
    words, _, change = CASES[name]
    (tmp_path / "change.yaml").write_text(yaml.safe_dump(change))
    settings = parse_command(words[0], [*words[1:], "-c", str(tmp_path / "change.yaml")])
    assert {k: settings[k] for k in change} == change
    assert {k: parse_command(words[0], words[1:])[k] for k in change} != change  # the file, not a default


def test_tiny_base_old_spellings():
    assert parse_command("tiny-base", ["o", "--hidden-size", "64", "--force"]) == \
        parse_command("tiny-base", ["o", "--hidden_size", "64", "--force", "true"])


def test_init_old_spellings():
    assert parse_command("init", ["b", "o", "--latent-steps", "2", "--trust-remote-code"]) == \
        parse_command("init", ["b", "o", "--latent_steps", "2", "--trust_remote_code", "true"])


def test_generate_old_spellings():
    """`-q A B` and `--question A B` (argparse's nargs="+") are the list of questions, whatever they look like."""
    questions = ["a=1 b=a+2 b?", "what: is 3", "3", "[1, 2]"]
    old = parse_command("generate", ["c", "-q", *questions, "--max-new-tokens", "4", "--decode-mode", "static",
                                     "--trust-remote-code"])
    assert old == parse_command("generate", ["c", "--question", *questions, "--max_new_tokens", "4",
                                             "--decode_mode", "static", "--trust_remote_code", "true"])
    assert old["question"] == questions and old["max_new_tokens"] == 4


def test_demo_old_spellings():
    old = parse_command("demo", ["--workdir", "w", "--quick", "--chain-steps", "2-4", "--fit-steps", "9",
                                 "--ablation-seeds", "0,1", "--systems", "sft"])
    assert old == parse_command("demo", ["--workdir", "w", "--quick", "true", "--chain_steps", "2-4", "--fit_steps", "9",
                                         "--ablation_seeds", "0,1", "--systems", "sft"])
    assert (old["quick"], old["chain_steps"], old["ablation_seeds"]) == (True, "2-4", "0,1")


def test_bench_old_spellings():
    """`bench gpu --config` is still the model's config.json (`-c` is the settings file); a bench takes its own
    flags only."""
    gpu = parse_command("bench", ["gpu", "--config", "m.json", "--batch-size", "2", "--small", "--peak-tflops", "9"])
    assert gpu == {**parse_command("bench", ["gpu"]), "model_config": "m.json", "batch_size": 2, "small": True,
                   "peak_tflops": 9.0}
    assert gpu["what"] == "gpu"
    assert parse_command("bench", ["all", "--batch-sizes", "3", "--max-new-tokens", "4"]) == \
        {**parse_command("bench", ["all"]), "batch_sizes": "3", "max_new_tokens": 4}
    with pytest.raises(UserError, match="unrecognized arguments: --problems"):
        parse_command("bench", ["train", "--problems", "3"])
    with pytest.raises(UserError, match="choose one of inference, train, teachers, all, gpu"):
        parse_command("bench", [])


def test_eval_old_spellings():
    """Bare targets, `--mode A B`, `--name A B`, `--task-option K=V` and dashed flags as argparse had them; a
    flag's value is never taken for a target."""
    settings = parse_command("eval", ["a", "b:nothink", "--task", "synthetic", "--mode", "qthink", "nothink",
                                      "--name", "x", "y", "--task-option", "steps=3", "--max-new-tokens", "8",
                                      "--no-progress", "c"])
    assert settings["targets"] == ["a", "b:nothink", "c"]
    assert (settings["mode"], settings["name"]) == (["qthink", "nothink"], ["x", "y"])
    assert (settings["task_options"], settings["max_new_tokens"], settings["no_progress"]) == ({"steps": 3}, 8, True)
