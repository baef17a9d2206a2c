"""The demo's settings, systems and stages (each a module-level function: the parallel ones run in spawned
processes), and `Stages`, the resumable record of which finished (`<workdir>/stages.json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qthink.errors import require
from qthink.files import atomic_write_text
from qthink.recipe import SEED
from qthink.shipped import config_file
from qthink.tasks.synthetic import parse_steps


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of every stage (the defaults take 31-37 minutes on 2 CPU cores, docs/findings.md F19, F27); `--quick`
    shrinks them."""

    base_steps: int = 400  # supervised steps teaching the tiny base to think (100% with thinking at 400)
    base_problems: int = 20000  # synthetic training chains for that stage (fresh ones: no memorising)
    chain_steps: str = "2-4"  # operations per synthetic chain (`a=3 b=a+4 c=b*2 d=c+5 d?`): a number or a range, each problem's length drawn from it
    train_problems: int = 8000  # distinct problems with rollouts: the students' training set
    G: int = 4  # rollouts per problem
    temperature: float = 1.3  # rollout sampling; hot enough that about 8% of rollouts are wrong
    fit_steps: int = 1500  # optimizer steps per fit (on 2-4-step chains the adaptive student's validation reaches 100% by 1,000 of 1,500; F17)
    fit_batch_size: int = 32  # problems per step
    lr: float = 3e-3  # LoRA + head learning rate (cosine to 0 after 3% warm-up)
    recipe_K: int = SEED.latent_steps  # latent steps of the published recipe's rows (the seed's K; linspace positions)
    eval_problems: int = 300  # held-out synthetic test problems (disjoint from training by construction)
    max_new_tokens: int = 50  # generation budget (a thinking answer is about 8 tokens per step + 5; 4 steps: ~37)
    val_every: int = 250  # validation (64 held-out problems) every this many steps
    patience: int = 0  # > 0: a fit stops early at 100% on validation, or after this many checks without a gain (F20)

    @property
    def steps_K(self) -> int:
        """Latent steps of the `steps` students: one per reasoning step of the longest chain (K_max)."""
        return parse_steps(self.chain_steps)[1]


QUICK = DemoSettings(base_steps=150, base_problems=500, train_problems=48, G=4, fit_steps=12, fit_batch_size=8,
                     eval_problems=48, val_every=6)


@dataclass(frozen=True)
class System:
    name: str
    label: str
    variant: str | None = None  # override config layered on configs/tiny/qthink.yaml (None: no fit)
    scheme: str | None = None  # teacher positions of its store
    K: int | str = 0  # latent steps: a number, "recipe" or "steps" (from the settings; adaptive: the most)
    default: bool = True  # run by a plain `qthink demo` (the others with --systems)


SYSTEMS = [
    System("base-think", "Base (thinking)"),
    System("base-nothink", "Base (no thinking)"),
    System("sft", "SFT (no latents)", "sft.yaml", "linspace", 0),
    # the seed table's other baselines: within a point or two of the seed's row at the demo's scale (F10), so
    # they cost a plain run time without telling anything new; `--systems all` runs them
    System("codi", "CODI (RW final-step)", "codi.yaml", "linspace", "recipe", default=False),
    System("rw-per-step", "QThink RW per-step", "rw-per-step.yaml", "linspace", "recipe", default=False),
    System("qthink", "QThink (seed: uniform per-step, linspace)", "uniform-per-step.yaml", "linspace", "recipe"),
    System("qthink-steps", "QThink, steps positions, fixed K", "uniform-per-step.yaml", "steps", "steps"),
    System("qthink-adaptive", "QThink, steps positions, adaptive K", "adaptive.yaml", "steps-adaptive", "steps"),
]


def select_systems(names: list[str] | None) -> list[System]:
    """The systems to run, in table order: the named students (`all`: every one; None: the default ones) and
    always the base rows."""
    students = [x.name for x in SYSTEMS if x.variant]
    unknown = sorted(set(names or []) - set(students) - {"all"})
    require(not unknown, f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(students)} or all")
    if names is None:
        return [x for x in SYSTEMS if x.default]
    return [x for x in SYSTEMS if x.variant is None or "all" in names or x.name in names]


def store_of(system: System, s: DemoSettings) -> tuple[str, str, int]:
    """(store folder, position scheme, K) a student reads; SFT reads only the problems (the recipe's store)."""
    scheme, K = (system.scheme, latent_steps(system, s)) if system.K != 0 else ("linspace", s.recipe_K)
    return store_name(scheme, K), scheme, K


def latent_steps(system: System, s: DemoSettings) -> int:
    return {"recipe": s.recipe_K, "steps": s.steps_K}.get(system.K, system.K)  # type: ignore[arg-type]


def store_name(scheme: str, K: int) -> str:
    return f"teachers-{scheme}-k{K}"


class Stages:
    """`stages.json`: which stages finished, with what they returned; a stage is run at most once."""

    def __init__(self, workdir: Path, force: bool, settings: dict | None = None):
        self.path = workdir / "stages.json"
        self.done = {} if force or not self.path.exists() else json.loads(self.path.read_text())
        if settings is not None:  # stages made with other sizes cannot be mixed with these
            made_with = self.done.setdefault("settings", {"result": settings, "seconds": 0})["result"]
            changed = sorted(k for k in settings if made_with.get(k) != settings[k])
            require(not changed, f"{workdir} was made with other demo settings ({', '.join(changed)}); "
                    "rerun with the same options, --force to redo it, or another --workdir")

    def record(self, name: str, result: Any, seconds: float) -> None:
        self.done[name] = {"result": result, "seconds": round(seconds, 1)}
        atomic_write_text(self.path, json.dumps(self.done, indent=2) + "\n")
        print(f"[demo] {name}: {self.done[name]['seconds']} s", flush=True)

    def run(self, name: str, fn, *args, **kwargs):
        if name in self.done:
            print(f"[demo] {name}: done already (skipped; --force redoes)")
            return self.done[name]
        from qthink.measure import timed_call

        print(f"[demo] {name} ...", flush=True)
        self.record(name, *timed_call(fn, *args, **kwargs))
        return self.done[name]

    def run_parallel(self, jobs: list[tuple[str, Any, tuple]], workers: int) -> None:
        """Independent stages on `workers` processes (`qthink.parallel.run_jobs`), recorded as they end."""
        from qthink.parallel import run_jobs

        todo = [job for job in jobs if job[0] not in self.done]
        for name, _, _ in jobs:
            if name in self.done:
                print(f"[demo] {name}: done already (skipped; --force redoes)")
        if todo:
            print(f"[demo] {', '.join(name for name, _, _ in todo)} on {min(workers, len(todo))} process(es) ...",
                  flush=True)
        run_jobs(todo, workers, self.record)


def build_base(workdir: Path, s: DemoSettings, seed: int, threads: int = 1) -> dict:
    """The thinking base. It trains alone (nothing else can run before it), so on `threads` torch threads:
    two made its steps 1.6x faster on the 2-core machine (docs/findings.md, F15)."""
    from qthink.core.tiny import build_tiny_base
    from qthink.demo.thinking_base import train_thinking_base
    from qthink.parallel import torch_threads

    build_tiny_base(workdir / "tiny-base", seed=seed, force=True)  # this stage's own folder: a rerun redoes it
    with torch_threads(threads):
        curve = train_thinking_base(workdir / "tiny-base", workdir / "base", steps=s.base_steps,
                                    problems=s.base_problems, seed=seed, chain_steps=s.chain_steps)
    return {k: v for k, v in curve.items() if k != "losses"}


def build_rollouts(workdir: Path, s: DemoSettings, seed: int, workers: int) -> dict:
    from qthink.parallel import run_ranks
    from qthink.teachers.rollouts import run_rollouts

    kwargs = {"base": str(workdir / "base"), "task": "synthetic", "out": workdir / "rollouts", "G": s.G,
              "temperature": s.temperature, "top_p": 1.0, "top_k": 0, "max_new_tokens": s.max_new_tokens,
              "batch_size": 64, "seed": seed, "limit": s.train_problems, "dtype": "float32", "device": "cpu",
              "task_options": {"steps": s.chain_steps}}
    parts = run_ranks(run_rollouts, kwargs, workers)  # each rank's counts; rank 0 merged the file
    return {**{k: sum(p[k] for p in parts) for k in ("problems", "rollouts", "correct", "finished", "closed_think")},
            "total_problems": parts[0]["total_problems"]}


def build_stores(workdir: Path, stores: list[tuple[str, str, int]], workers: int) -> dict:
    """Every teacher store the students read, `(folder, scheme, K)`, in one pass over the rollouts (one forward
    per rollout serves them all) on `workers` ranks; scheme `steps-adaptive` is `steps` positions with each
    problem's own step count."""
    from qthink.parallel import run_ranks
    from qthink.teachers.extract import StoreSpec
    from qthink.teachers.extract import build_stores as build

    specs = [StoreSpec(workdir / name, K, scheme.removesuffix("-adaptive"), scheme.endswith("-adaptive"))
             for name, scheme, K in stores]
    kwargs = {"base": str(workdir / "base"), "rollouts": workdir / "rollouts", "specs": specs, "dtype": "float32",
              "batch_size": 64, "device": "cpu"}
    manifests = run_ranks(build, kwargs, workers)[0]  # rank 0 wrote and returns the manifests
    return {name: {"counts": m.get("counts"), "position_scheme": scheme, "K": K}
            for (name, scheme, K), m in zip(stores, manifests, strict=True)}


def fit_argv(workdir: Path, s: DemoSettings, variant: str | None, store: str, K: int, seed: int, run_dir: Path,
             train_limit: int | None = None) -> list[str]:
    """`qthink fit` arguments for one student: configs/tiny/qthink.yaml [+ variant] and the demo's sizes."""
    argv = ["fit", "-c", str(config_file("tiny", "qthink.yaml"))]
    if variant:
        argv += ["-c", str(config_file("tiny", variant))]
    argv += ["--model.base_model", str(workdir / "base"), "--data.teachers", str(workdir / store),
             "--model.latent_steps", str(K), "--trainer.default_root_dir", str(run_dir),
             "--trainer.max_steps", str(s.fit_steps), "--model.lr", str(s.lr),
             "--data.batch_size", str(s.fit_batch_size), "--data.val_limit", str(min(64, s.eval_problems)),
             "--trainer.val_check_interval", str(min(s.val_every, s.fit_steps)),
             "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed),
             "--trainer.enable_model_summary", "false"]
    if s.patience:  # the budget chosen on validation: stop a row that is perfect or has plateaued
        argv += ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                 "--trainer.callbacks.monitor", "val/exact_match", "--trainer.callbacks.mode", "max",
                 # EarlyStopping stops when the score is strictly above the threshold: 1.0 never would; 0.999 is
                 # only a perfect score on the 64 validation problems (63/64 = 0.984)
                 "--trainer.callbacks.patience", str(s.patience), "--trainer.callbacks.stopping_threshold", "0.999"]
    if train_limit is not None:
        argv += ["--data.train_limit", str(train_limit)]
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        argv += ["--ckpt_path", "last"]
    return argv


def fit_student(workdir: Path, s: DemoSettings, name: str, variant: str | None, store: str, K: int, seed: int,
                train_limit: int | None = None) -> dict:
    """`qthink fit` in process (resumed if a last.ckpt exists), exported to `export/<name>`; returns the
    validation curve."""
    from qthink.demo.report import read_scalars
    from qthink.export import export_checkpoint
    from qthink.training.lightning_cli import run_lightning_cli

    run_dir = workdir / "fit" / name
    run_lightning_cli(fit_argv(workdir, s, variant, store, K, seed, run_dir, train_limit))
    out = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", workdir / "export" / name)
    scalars = read_scalars(run_dir / "tensorboard")
    return {"checkpoint": str(out), "run_dir": str(run_dir), "K": K, "store": store,
            "val_exact_match": scalars.get("val/exact_match", []), "val_latent_steps": scalars.get("val/latent_steps", [])}


def evaluate_system(workdir: Path, s: DemoSettings, name: str, label: str, target: Path, mode: str) -> dict:
    from qthink.evaluate import evaluate
    from qthink.tasks import make_task

    task = make_task("synthetic", {"steps": s.chain_steps})
    summary = evaluate(str(target), task, "test", mode=mode, name=name, limit=s.eval_problems,
                       max_new_tokens=s.max_new_tokens, batch_size=64, out=workdir / "eval", progress=False)
    return {"label": label, **summary}


def cost_split(workdir: Path, s: DemoSettings, rows: list[dict], repeats: int = 3) -> dict:
    """Where the time goes, for the best latent student and the thinking base: each generation timed whole
    and cut at its first token (prompt prefill + latent passes), on the same held-out problems."""
    from qthink.demo.report import decoder_passes
    from qthink.evaluate import load_target
    from qthink.measure import timed
    from qthink.tasks import load_problems, make_task

    task = make_task("synthetic", {"steps": s.chain_steps})
    questions = [task.prompt(r) for r in load_problems(task, "test", None, s.eval_problems)]
    latent = max((r for r in rows if r["mode"] == "qthink"), key=lambda r: r["metrics"]["exact_match"])
    base = next(r for r in rows if r["system"] == "base-think")
    out = {"problems": len(questions), "batch_size": 64, "repeats": repeats}
    for key, row in (("latent", latent), ("base", base)):
        qt = load_target(row["target"], row["mode"], device="cpu")
        think = row["mode"] == "think"
        k = None if row["mode"] == "qthink" else 0  # the checkpoint's own K (adaptive: each problem's choice)

        def ms_per_problem(max_new_tokens: int, qt=qt, think=think, k=k) -> float:
            seconds, _ = timed(lambda: qt.generate(questions, k, max_new_tokens, 64, enable_thinking=think), repeats)
            return 1000 * seconds / len(questions)

        total, first = ms_per_problem(s.max_new_tokens), ms_per_problem(1)
        out[key] = {"label": row["label"], "exact_match": row["metrics"]["exact_match"], "K": row["K"],
                    "passes": decoder_passes(row), "ms_total": total, "ms_prefill": first,
                    "ms_decode": max(total - first, 0.0)}
    return out


def fit_jobs(workdir: Path, s: DemoSettings, seed: int, systems: list[System] = SYSTEMS) -> list[tuple[str, Any, tuple]]:
    """One job per student of the table, the longest (most latent steps) first."""
    jobs = []
    for system in sorted((x for x in systems if x.variant), key=lambda x: -latent_steps(x, s)):
        K, store = latent_steps(system, s), store_of(system, s)[0]
        jobs.append((f"fit-{system.name}", fit_student, (workdir, s, system.name, system.variant, store, K, seed)))
    return jobs
