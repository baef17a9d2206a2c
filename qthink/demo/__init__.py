"""`qthink demo`: the whole method end to end on the embedded tiny Qwen3 and the synthetic task, on CPU.

    qthink demo [--workdir runs/demo] [--quick] [--seed S] [--force] [--workers 2] [--chain-steps 2-4]
                [--fit-steps 1500] [--patience 0] [--systems sft,qthink,...|all] [--ablation-seeds 0,1,2]
    qthink demo --study          # then teacher positions x K at convergence (`qthink.demo.study`)

Stages (each resumable: a finished stage is recorded in `<workdir>/stages.json` and skipped on rerun;
`--force` redoes everything; `qthink.demo.stages`):
1. `base`: `qthink tiny-base`, then a short supervised stage teaching it to think on synthetic chains of
   varying length (`qthink.demo.thinking_base`), so it is "a base model that thinks" (both chat modes).
2. `rollouts`: G sampled chain-of-thought rollouts per training problem (`qthink rollouts`, split over
   the worker processes as `torchrun` would), hot enough that some are wrong.
3. `teachers-*`: every store the chosen students read (the seed's K=6 `linspace`; `steps` with K fixed at
   the longest chain; the adaptive `steps` store with each problem's own step count), in one pass.
4. `fit-*`: SFT, the seed's row, the fixed-K and the adaptive `steps` students (CODI and RW per-step with
   `--systems all`), through `qthink fit` with `configs/tiny/`, two fits at a time; each exported.
5. `eval-*`: every system and the base (think / no think) on held-out problems (`qthink eval`, scored per
   chain length), one after another in this process so that no fit shares their timings.
6. `cost`: where the time of the best latent student and of the thinking base goes.
7. `report.md` with both tables, the cost side and plots (`qthink.demo.report`); the tables are printed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from qthink.arguments import Seed, SignatureCommand, comma_ints, comma_list
from qthink.demo.stages import (
    QUICK,
    SYSTEMS,
    DemoSettings,
    Stages,
    System,
    build_base,
    build_rollouts,
    build_stores,
    cost_split,
    evaluate_system,
    fit_jobs,
    select_systems,
    store_of,
)
from qthink.errors import UserError, require
from qthink.ownership import claim
from qthink.tasks.synthetic import parse_steps, steps_label


def run_demo(workdir: str | Path = "runs/demo", quick: bool = False, seed: int = 0, force: bool = False,
             ablation_seeds: list[int] | None = None, workers: int | None = None,
             settings: DemoSettings | None = None, systems: list[str] | None = None) -> dict:
    s = settings or (QUICK if quick else DemoSettings())
    with claim(workdir, "demo", "--workdir") as owned:  # the whole run: one demo per workdir
        # every stage folder is new or the demo's own before any stage writes (a user's `base` is never replaced)
        owned.take("stages.json", "tiny-base", "base", "rollouts", "fit", "export", "eval", "report.md",
                   "training_curves.png", "accuracy_vs_cost.png",
                   *sorted({store_of(x, s)[0] for x in select_systems(systems) if x.variant}))
        return _run_demo(Path(workdir), s, quick, seed, force, ablation_seeds, workers, systems)


def _run_demo(workdir: Path, s: DemoSettings, quick: bool, seed: int, force: bool, ablation_seeds: list[int] | None,
              workers: int | None, systems: list[str] | None) -> dict:
    from qthink.parallel import default_workers, quiet_worker

    began = time.perf_counter()
    workers = workers or default_workers()
    # The tiny model's matmuls are too small for a second OpenMP thread to pay (docs/findings.md, F6):
    # one thread per process, and independent work on two processes.
    quiet_worker()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    stages = Stages(workdir, force, asdict(s))
    # the base trains alone: on two threads where there are two cores, whatever --workers says, so the same
    # seed gives the same base (and rollouts) with one worker or two
    stages.run("base", build_base, workdir, s, seed, min(2, os.cpu_count() or 1))
    stages.run("rollouts", build_rollouts, workdir, s, seed, workers)
    chosen = select_systems(systems)
    stores = sorted({store_of(x, s) for x in chosen if x.variant})
    stages.run("teachers-" + "+".join(name.removeprefix("teachers-") for name, _, _ in stores), build_stores,
               workdir, stores, workers)
    stages.run_parallel(fit_jobs(workdir, s, seed, chosen), workers)
    rows = []
    for system in chosen:
        target, mode = ((workdir / "base", system.name.removeprefix("base-")) if system.variant is None
                        else (workdir / "export" / system.name, "qthink"))
        result = stages.run(f"eval-{system.name}", evaluate_system, workdir, s, system.name, system.label,
                            target, mode)["result"]
        rows.append({**result, "scheme": system.scheme, "fit": stages.done.get(f"fit-{system.name}", {}).get("result")})
    from qthink.demo.report import by_length_table, results_table, write_report

    cost = stages.run("cost", cost_split, workdir, s, rows)["result"]
    ablation = None
    if ablation_seeds:
        from qthink.demo.study import seed_ablation

        ablation = seed_ablation(workdir, s, stages, ablation_seeds, seed, workers, [x.name for x in chosen])
    table = results_table(rows)
    per_length = by_length_table(rows)
    report = write_report(workdir, table, rows, cost, asdict(s), stages.done, quick, seed, ablation,
                          time.perf_counter() - began)
    print("\n" + table)
    if per_length:
        print("\nBy chain length:\n" + per_length)
    if ablation:
        print("\n" + ablation)
    print(f"\n[demo] report: {report}  (wall {time.perf_counter() - began:.0f} s)")
    return {"table": table, "table_by_length": per_length, "rows": rows, "cost": cost, "ablation": ablation, "report": str(report)}




def demo_settings(quick: bool, chain_steps: str | None) -> DemoSettings:
    """The default or `--quick` sizes; `--chain-steps N` or `LOW-HIGH` sets the chains' lengths and a budget
    of 10 tokens per step of the longest plus room for the answer."""
    s = QUICK if quick else DemoSettings()
    if chain_steps is None:
        return s
    try:
        low, high = parse_steps(chain_steps)
    except UserError as e:
        raise UserError(f"--chain-steps must be a number or a range LOW-HIGH such as 2-4 (got {chain_steps!r})") from e
    require(high <= 12, f"--chain-steps must be between 1 and 12 (got {chain_steps})")
    return replace(s, chain_steps=steps_label(chain_steps), max_new_tokens=10 * high + 10)


def demo_command(workdir: str = "runs/demo", quick: bool = False, seed: Seed = 0, force: bool = False,
                 chain_steps: str | int | None = None, fit_steps: int | None = None, patience: int | None = None,
                 systems: str | None = None, workers: int | None = None, ablation_seeds: str | int | None = None,
                 study: bool = False) -> dict:
    """`run_demo` from the command's settings (checked before anything runs), then `--study` if asked.

    Args:
        workdir: where every stage writes (resumable)
        quick: toy sizes: the same pipeline end to end in about 3-5 minutes
        seed: seed of every stage
        force: redo every stage
        chain_steps: operations per synthetic chain: a number or a range LOW-HIGH, each problem's length drawn from
            it (default 2-4; 6 makes the seed's K=6 one latent per step)
        fit_steps: optimizer steps per fit (default 1500; longer chains need longer fits to converge)
        patience: stop each fit early when validation reaches 100% or has not improved for this many checks
            (default 0: every fit runs --fit-steps; with 2, SFT stopped at step 1,000 of 1,500, F22)
        systems: comma-separated students to fit and evaluate, or all (default: {defaults}; also: {others}); the
            base rows always run
        workers: processes for independent stages (default: 2, or 1 on a one-core machine)
        ablation_seeds: comma-separated seeds: refit the chosen students (--systems) per seed, report mean and spread
        study: after the demo, teacher positions x K at convergence, 3 seeds on the headline cells (qthink.demo.study;
            hours: fits of up to 3,000 steps)
    """
    # a YAML file may give `chain_steps: 6` or `ablation_seeds: 3` as a number
    chain_steps, ablation_seeds = (None if v is None else str(v) for v in (chain_steps, ablation_seeds))
    seeds = comma_ints(ablation_seeds, "--ablation-seeds") if ablation_seeds else None
    require(workers is None or workers >= 1, f"--workers must be >= 1 (got {workers})")
    require(not (study and quick), "--study runs at the demo's default sizes; drop --quick")
    settings = demo_settings(quick, chain_steps)
    if fit_steps is not None:
        require(fit_steps >= 1, f"--fit-steps must be >= 1 (got {fit_steps})")
        settings = replace(settings, fit_steps=fit_steps)
    if patience is not None:
        require(patience >= 0, f"--patience must be >= 0 (got {patience})")
        settings = replace(settings, patience=patience)
    chosen = comma_list(systems) if systems else None
    select_systems(chosen)  # an unknown name is one line before anything runs
    result = run_demo(workdir, quick, seed, force, seeds, workers, settings, chosen)
    if study:
        from qthink.demo.study import run_study

        with claim(workdir, "demo", "--workdir"):
            run_study(workdir, seed=seed, workers=workers, settings=settings)
    return result


# the --systems help names the students (a docstring cannot be an f-string)
demo_command.__doc__ = demo_command.__doc__.format(
    defaults=", ".join(x.name for x in SYSTEMS if x.variant and x.default),
    others=", ".join(x.name for x in SYSTEMS if x.variant and not x.default))


COMMAND = SignatureCommand(demo_command)


def cli_main(settings: dict) -> None:
    demo_command(**settings)


__all__ = ["QUICK", "SYSTEMS", "DemoSettings", "System", "run_demo"]
