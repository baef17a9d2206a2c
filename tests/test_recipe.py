"""The seed's recipe is written once (`qthink.recipe.SEED`): it holds the published values, the configs and the
published code state the same ones, and every entry point's default is the recipe's, so an edit in one place
cannot drift from the others."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from qthink.bench.seed_recipe import seed_generate
from qthink.cli import main, parse_command
from qthink.recipe import SEED, Recipe

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "configs" / "qwen3-1.7b"

# The seed's values as this project records them from its model card (issues 3 and 4, recipe.yaml's header),
# plus the three the card does not give (lora_dropout, weight_decay, rollout_max_new_tokens: qthink's).
PUBLISHED = {
    "latent_steps": 6, "position_scheme": "linspace", "G": 16, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
    "rollout_max_new_tokens": 4096, "teacher": "uniform", "distill": "per_step", "gamma": 2.0,
    "lora_r": 32, "lora_alpha": 16, "lora_dropout": 0.0,
    "lora_target_modules": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "lr": 2e-4, "weight_decay": 0.0, "warmup_ratio": 0.03, "min_lr_ratio": 0.0,
    "max_prompt_tokens": 1024, "max_answer_tokens": 256, "batch_size": 1,
}


def test_the_recipe_holds_the_published_values_and_is_frozen():
    assert dataclasses.asdict(SEED) == PUBLISHED
    assert SEED == Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        SEED.latent_steps = 3  # type: ignore[misc]


def test_the_published_code_and_configs_state_the_recipe():
    # the card's usage code (kept verbatim) runs K latent steps by default
    assert inspect.signature(seed_generate).parameters["latent_steps"].default == SEED.latent_steps
    # recipe.yaml's header says which values are the code's defaults: they must be the recipe's
    header = " ".join(line.lstrip("# ") for line in (QWEN / "recipe.yaml").read_text().splitlines()
                      if line.startswith("#"))
    stated = [f"r={SEED.lora_r}/alpha={SEED.lora_alpha}", f"K={SEED.latent_steps} latent steps",
              f"G={SEED.G} rollouts", f"gamma={SEED.gamma:g}", f"lr {SEED.lr:.0e}".replace("e-0", "e-"), f"{SEED.warmup_ratio:.0%} warmup",
              f"prompts <= {SEED.max_prompt_tokens}", f"answers <= {SEED.max_answer_tokens} tokens",
              f"{SEED.teacher} teachers", f"{SEED.distill.replace('_', '-')} L1", f"{SEED.batch_size} problem per GPU",
              "cosine decay to 0" if SEED.min_lr_ratio == 0 else "?"]
    assert [s for s in stated if s not in header] == []
    # the variant that is the seed's method spells out its teacher and distillation
    variant = yaml.safe_load((QWEN / "uniform-per-step.yaml").read_text())["model"]
    assert variant == {"teacher": SEED.teacher, "distill": SEED.distill}


def defaults(obj) -> dict:
    return {n: p.default for n, p in inspect.signature(obj).parameters.items() if p.default is not p.empty}


def test_every_entry_point_defaults_to_the_recipe():
    from qthink.bench.gpu import SMALL
    from qthink.bench.inference import bench_inference, tiny_qthink
    from qthink.bench.teachers import bench_teachers
    from qthink.bench.train import bench_train
    from qthink.core.model import QThink, init_checkpoint
    from qthink.core.sampling import Sampler
    from qthink.demo.stages import DemoSettings
    from qthink.evaluate import evaluate
    from qthink.teachers.extract import StoreSpec, build_teachers
    from qthink.teachers.rollouts import run_rollouts
    from qthink.training.data import TeacherDataModule
    from qthink.training.module import LoraArgs, QThinkModule

    r = SEED
    sampler = {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k}
    expected = {
        QThinkModule: {"latent_steps": r.latent_steps, "distill": r.distill, "teacher": r.teacher, "gamma": r.gamma,
                       "lr": r.lr, "weight_decay": r.weight_decay, "warmup_ratio": r.warmup_ratio,
                       "min_lr_ratio": r.min_lr_ratio, "val_max_new_tokens": r.max_answer_tokens},
        LoraArgs: {"r": r.lora_r, "alpha": r.lora_alpha, "dropout": r.lora_dropout,
                   "target_modules": r.lora_target_modules},
        TeacherDataModule: {"batch_size": r.batch_size, "max_prompt_tokens": r.max_prompt_tokens,
                            "max_answer_tokens": r.max_answer_tokens},
        run_rollouts: {"G": r.G, **sampler, "max_new_tokens": r.rollout_max_new_tokens},
        Sampler: sampler,
        QThink.generate: {**sampler, "max_new_tokens": r.max_answer_tokens},
        QThink: {"latent_steps": r.latent_steps},
        init_checkpoint: {"latent_steps": r.latent_steps},
        build_teachers: {"K": r.latent_steps, "position_scheme": r.position_scheme},
        StoreSpec: {"K": r.latent_steps, "position_scheme": r.position_scheme},
        evaluate: {"max_new_tokens": r.max_answer_tokens},
        DemoSettings: {"recipe_K": r.latent_steps},
        tiny_qthink: {"latent_steps": r.latent_steps},
        bench_inference: {"latent_steps": r.latent_steps},
        bench_teachers: {"K": r.latent_steps},
        bench_train: {"latent_steps": r.latent_steps, "distill": r.distill},
    }
    wrong = {f"{obj.__qualname__}.{name}": (defaults(obj).get(name), want)
             for obj, want in expected.items() for name, want in want.items() if defaults(obj).get(name) != want}
    assert wrong == {}
    assert SMALL["latent_steps"] == r.latent_steps  # `bench gpu --small` shrinks the shapes, not K
    # the LoRA default of QThinkModule is LoraArgs(), so its fields are the recipe's too
    assert defaults(QThinkModule)["lora"] == LoraArgs()


# each command's required arguments, and the flags that restate the recipe
COMMANDS = {
    "rollouts": (["--base", "b", "--task", "t", "--out", "o"],
                 {"G": SEED.G, "temperature": SEED.temperature, "top_p": SEED.top_p, "top_k": SEED.top_k,
                  "max_new_tokens": SEED.rollout_max_new_tokens}),
    "teachers": (["--base", "b", "--rollouts", "r", "--out", "o"],
                 {"K": SEED.latent_steps, "position_scheme": SEED.position_scheme}),
    "init": (["b", "o"], {"latent_steps": SEED.latent_steps}),
    "generate": (["c"], {"max_new_tokens": SEED.max_answer_tokens}),
    "eval": (["t", "--task", "x"], {"max_new_tokens": SEED.max_answer_tokens}),
    "bench": (["gpu"], {"latent_steps": SEED.latent_steps, "lora_r": SEED.lora_r,
                        "prompt_tokens": SEED.max_prompt_tokens, "answer_tokens": SEED.max_answer_tokens}),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_flag_defaults_to_the_recipe(name):
    required, want = COMMANDS[name]
    args = parse_command(name, required)
    args = args if isinstance(args, dict) else vars(args)
    assert {k: args[k] for k in want} == want
    if name == "bench":
        assert parse_command(name, ["inference"])["latent_steps"] == SEED.latent_steps


def test_fit_prints_the_recipe_as_its_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(QWEN / "gsm8k.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]
    assert {k: model[k] for k in ("latent_steps", "distill", "teacher", "gamma", "lr", "weight_decay",
                                  "warmup_ratio", "min_lr_ratio")} == {
        k: getattr(SEED, k) for k in ("latent_steps", "distill", "teacher", "gamma", "lr", "weight_decay",
                                      "warmup_ratio", "min_lr_ratio")}
    assert model["lora"] == {"r": SEED.lora_r, "alpha": SEED.lora_alpha, "dropout": SEED.lora_dropout,
                             "target_modules": list(SEED.lora_target_modules)}
    assert (data["batch_size"], data["max_prompt_tokens"], data["max_answer_tokens"], model["val_max_new_tokens"]) == (
        SEED.batch_size, SEED.max_prompt_tokens, SEED.max_answer_tokens, SEED.max_answer_tokens)
