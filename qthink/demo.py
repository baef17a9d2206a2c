"""`qthink demo`: the whole method end to end on the embedded tiny Qwen3 and the synthetic task, on CPU.

    qthink demo [--workdir runs/demo] [--quick] [--seed S] [--force] [--ablation-seeds 0,1,2]

Stages (each resumable: a finished stage is recorded in `<workdir>/stages.json` and skipped on rerun;
`--force` redoes everything):
1. `base`: `qthink tiny-base`, then a short supervised stage teaching it to think on synthetic chains
   (`qthink.thinking_base`), so it is "a base model that thinks" (both chat modes).
2. `rollouts`: G sampled chain-of-thought rollouts per training problem (`qthink rollouts`).
3. `teachers`: the K=6 teacher store with the seed's `linspace` positions, and one with `steps`.
4. `fit`: QThink (uniform, per-step) and the seed table's baselines (SFT, CODI = weighted final-step,
   RW per-step), plus QThink on `steps` positions, all through `qthink fit` with `configs/tiny/`;
   each exported to a seed-format checkpoint.
5. `eval`: every system and the base (think / nothink) on the held-out test split (`qthink eval`).
6. `report`: `report.md` (the table and the settings), PNG plots, and the table printed.
With `--ablation-seeds`, QThink linspace vs steps is refitted for each seed and summarised (mean ± spread).
"""

import argparse
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qthink.errors import require

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tiny"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of every stage; `--quick` shrinks them to finish in about two minutes."""

    base_steps: int = 400  # supervised steps teaching the tiny base to think (98% with thinking at 400)
    base_problems: int = 20000  # synthetic training chains for that stage (fresh ones: no memorising)
    rollout_problems: int = 1000  # problems with G rollouts each (the distillation set)
    G: int = 8  # rollouts per problem
    fit_steps: int = 200  # optimizer steps per QThink / baseline fit (about 70 s each on one CPU thread)
    fit_batch_size: int = 32  # problems per step
    eval_problems: int = 300  # held-out synthetic test problems
    max_new_tokens: int = 40  # generation budget (a thinking answer of 3 steps is about 30 tokens)
    K: int = 6  # latent steps (the seed's)


QUICK = DemoSettings(base_steps=150, base_problems=500, rollout_problems=48, G=4, fit_steps=12,
                     fit_batch_size=8, eval_problems=48, max_new_tokens=40)

# name, label in the table, config override file (None: no fit), teacher store
SYSTEMS = [
    ("base-think", "Base (thinking)", None, None),
    ("base-nothink", "Base (no thinking)", None, None),
    ("sft", "SFT (no latents)", "sft.yaml", "teachers"),
    ("codi", "QThink RW final-step (CODI)", "codi.yaml", "teachers"),
    ("rw-per-step", "QThink RW per-step", "rw-per-step.yaml", "teachers"),
    ("qthink", "QThink uniform per-step (seed)", None, "teachers"),
    ("qthink-steps", "QThink uniform per-step, steps positions", None, "teachers-steps"),
]


class Stages:
    """`stages.json`: which stages finished, with what they returned; a stage is run at most once."""

    def __init__(self, workdir: Path, force: bool):
        self.path = workdir / "stages.json"
        self.done = {} if force or not self.path.exists() else json.loads(self.path.read_text())

    def run(self, name: str, fn, *args, **kwargs):
        if name in self.done:
            print(f"[demo] {name}: done already (skipped; --force redoes)")
            return self.done[name]
        began = time.perf_counter()
        print(f"[demo] {name} ...", flush=True)
        result = fn(*args, **kwargs)
        self.done[name] = {"result": result, "seconds": round(time.perf_counter() - began, 1)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=2) + "\n")
        os.replace(tmp, self.path)
        print(f"[demo] {name}: {self.done[name]['seconds']} s", flush=True)
        return self.done[name]


def build_base(workdir: Path, s: DemoSettings, seed: int) -> dict:
    from qthink.thinking_base import train_thinking_base
    from qthink.tiny import build_tiny_base

    build_tiny_base(workdir / "tiny-base", seed=seed)
    curve = train_thinking_base(workdir / "tiny-base", workdir / "base", steps=s.base_steps,
                                problems=s.base_problems, seed=seed)
    return {k: v for k, v in curve.items() if k != "losses"}


def build_rollouts(workdir: Path, s: DemoSettings, seed: int) -> dict:
    from qthink.teachers.rollouts import run_rollouts

    return run_rollouts(str(workdir / "base"), "synthetic", workdir / "rollouts", G=s.G,
                        max_new_tokens=s.max_new_tokens, batch_size=16, seed=seed,
                        limit=s.rollout_problems, dtype="float32")


def build_teachers(workdir: Path, s: DemoSettings, scheme: str) -> dict:
    from qthink.teachers.extract import build_teachers as extract

    name = "teachers" if scheme == "linspace" else f"teachers-{scheme}"
    manifest = extract(str(workdir / "base"), workdir / "rollouts", workdir / name, K=s.K, dtype="float32",
                       batch_size=64, position_scheme=scheme)
    return {"counts": manifest.get("counts"), "position_scheme": scheme}


def fit_system(workdir: Path, s: DemoSettings, name: str, variant: str | None, store: str, seed: int,
               run_dir: Path | None = None) -> dict:
    """`qthink fit -c configs/tiny/qthink.yaml [-c variant]` in process, resumed if a last.ckpt exists,
    then exported to a seed-format checkpoint."""
    from qthink.export import export_checkpoint
    from qthink.train_cli import run_lightning_cli

    require((CONFIGS / "qthink.yaml").is_file(), f"{CONFIGS} not found: run the demo from a source checkout "
            "(pip install -e .)")
    run_dir = run_dir or workdir / "fit" / name
    argv = ["fit", "-c", str(CONFIGS / "qthink.yaml")]
    if variant:
        argv += ["-c", str(CONFIGS / variant)]
    argv += ["--model.base_model", str(workdir / "base"), "--data.teachers", str(workdir / store),
             "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(s.fit_steps),
             "--data.batch_size", str(s.fit_batch_size), "--data.val_limit", str(min(64, s.eval_problems)),
             "--trainer.val_check_interval", str(max(1, s.fit_steps // 2)),
             "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed)]
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        argv += ["--ckpt_path", "last"]
    run_lightning_cli(argv)
    out = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", workdir / "export" / name)
    return {"checkpoint": str(out), "run_dir": str(run_dir)}


def eval_system(workdir: Path, s: DemoSettings, name: str, label: str) -> dict:
    from qthink.evaluate import evaluate

    if name.startswith("base-"):
        target, mode = workdir / "base", name.removeprefix("base-")
    else:
        target, mode = workdir / "export" / name, "qthink"
    summary = evaluate(str(target), "synthetic", "test", mode=mode, name=name, limit=s.eval_problems,
                       max_new_tokens=s.max_new_tokens, batch_size=64, out=workdir / "eval", progress=True)
    return {"label": label, **summary}


def results_table(rows: list[dict]) -> str:
    lines = ["| System | Exact match | Mean generated tokens | Latent steps | Seconds / problem |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {100 * r['metrics']['exact_match']:.1f}% | {r['mean_tokens']:.1f} | {r['K']} | "
                     f"{r['seconds_per_problem'] * 1000:.1f} ms |")
    return "\n".join(lines)


def ablation(workdir: Path, s: DemoSettings, stages: Stages, seeds: list[int], run_seed: int) -> str:
    """QThink linspace vs steps, refitted per seed on the same base, rollouts and teachers."""
    scores: dict[str, list[float]] = {"qthink": [], "qthink-steps": []}
    for seed in seeds:
        for name, _, _, store in SYSTEMS:
            if name not in scores:
                continue
            if seed == run_seed:  # the main table's fit is this seed's run already
                scores[name].append(stages.done[f"eval-{name}"]["result"]["metrics"]["exact_match"])
                continue
            run = f"ablation-{name}-seed{seed}"

            def fit_and_eval(name=name, store=store, run=run, seed=seed):
                fit_system(workdir, s, run, None, store, seed, workdir / "fit" / run)
                return eval_system(workdir, s, run, run)["metrics"]["exact_match"]

            scores[name].append(stages.run(run, fit_and_eval)["result"])
    lines = [f"| Teacher positions | Exact match per seed ({', '.join(map(str, seeds))}) | Mean | Spread (max-min) | Std |",
             "|---|---|---|---|---|"]
    for name, label in (("qthink", "linspace (seed's)"), ("qthink-steps", "steps")):
        v = [100 * x for x in scores[name]]
        std = statistics.stdev(v) if len(v) > 1 else 0.0
        lines.append(f"| {label} | {', '.join(f'{x:.1f}%' for x in v)} | {statistics.mean(v):.1f}% | "
                     f"{max(v) - min(v):.1f} pp | {std:.1f} pp |")
    return "\n".join(lines)


def run_demo(workdir: str | Path = "runs/demo", quick: bool = False, seed: int = 0, force: bool = False,
             ablation_seeds: list[int] | None = None) -> dict:
    began = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    s = QUICK if quick else DemoSettings()
    # The tiny model's matmuls are too small for a second OpenMP thread to pay; on a busy machine it
    # made steps many times slower (measured), and one thread keeps results the same run to run.
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    stages = Stages(workdir, force)
    stages.run("base", build_base, workdir, s, seed)
    stages.run("rollouts", build_rollouts, workdir, s, seed)
    stages.run("teachers", build_teachers, workdir, s, "linspace")
    stages.run("teachers-steps", build_teachers, workdir, s, "steps")
    for name, _, variant, store in SYSTEMS:
        if store is not None:
            stages.run(f"fit-{name}", fit_system, workdir, s, name, variant, store, seed)
    rows = [stages.run(f"eval-{name}", eval_system, workdir, s, name, label)["result"]
            for name, label, _, _ in SYSTEMS]
    table = results_table(rows)
    ablation_table = ablation(workdir, s, stages, ablation_seeds, seed) if ablation_seeds else None
    from qthink.report import write_report

    report = write_report(workdir, table, rows, asdict(s), stages.done, quick, seed, ablation_table,
                          time.perf_counter() - began)
    print("\n" + table)
    if ablation_table:
        print("\n" + ablation_table)
    print(f"\n[demo] report: {report}  (wall {time.perf_counter() - began:.0f} s)")
    return {"table": table, "rows": rows, "ablation": ablation_table, "report": str(report)}


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo", help="where every stage writes (resumable)")
    p.add_argument("--quick", action="store_true", help="small sizes: end to end in about two minutes")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--ablation-seeds", default=None,
                   help="comma-separated seeds: refit QThink linspace vs steps per seed, report mean and spread")


def cli_main(args) -> None:
    seeds = None
    if args.ablation_seeds:
        try:
            seeds = [int(x) for x in args.ablation_seeds.split(",") if x.strip()]
        except ValueError:
            require(False, f"--ablation-seeds must be comma-separated integers (got {args.ablation_seeds!r})")
    run_demo(args.workdir, args.quick, args.seed, args.force, seeds)

