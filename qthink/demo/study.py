"""`qthink demo --study`: teacher positions x latent steps K at convergence, on the demo's own chains.

Fits positions {linspace, steps} x K {below the longest chain, equal to it, above it; and the seed's K} on the
base, rollouts and sizes of a finished `qthink demo` (`<workdir>`), each with a budget that converges: up to
`STUDY_FIT_STEPS` optimizer steps, stopped at 100% validation or after `STUDY_PATIENCE` checks without a gain
(the budget is chosen on validation; docs/findings.md F18, F28). One seed per cell and three for the headline
cells (`steps` at K equal to and above the longest chain, the seed's `linspace` K). SFT and the adaptive
student are the demo's own fits (and `--ablation-seeds` refits): both settle within the demo's budget (F17,
F19, F20). Cells run two at a time and resume like the demo's stages (`stages.json`). Writes `study.md`
(exact match mean ± std, per chain length, the step each fit stopped at) and `study.png` (exact match vs K;
validation curves).

`steps` positions with K above the chain's length repeat each step in turn (s1,s1,s2,s2,s3,s3); below it
they take steps evenly, first and last included.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from qthink.demo.report import read_scalars, spread
from qthink.demo.stages import DemoSettings, Stages, build_stores, evaluate_system, fit_student, store_name
from qthink.errors import require
from qthink.files import atomic_write_text
from qthink.tables import markdown_table

SCHEMES = ("linspace", "steps")
STUDY_FIT_STEPS = 3000  # every row of the 2-4-step grid had converged or plateaued by 3,000 (F28)
STUDY_PATIENCE = 4  # validation checks (every 250 steps) without a gain before a fit stops
HEADLINE_SEEDS = (0, 1, 2)
DEMO_FIT = {"sft": "sft", "linspace": "qthink", "steps": "qthink-steps", "steps-adaptive": "qthink-adaptive"}


def study_ks(s: DemoSettings) -> tuple[int, ...]:
    """K below the longest chain (about half of it), equal to it, above it, and the seed's K."""
    longest = s.steps_K
    return tuple(sorted({max(1, (longest + 1) // 2), longest, max(s.recipe_K, longest + 1), s.recipe_K}))


def study_settings(s: DemoSettings, fit_steps: int = STUDY_FIT_STEPS) -> DemoSettings:
    return replace(s, fit_steps=fit_steps, patience=STUDY_PATIENCE)


def cell_name(scheme: str, K: int, problems: int, seed: int) -> str:
    return f"study-{scheme}-k{K}-n{problems}-seed{seed}"


def ablation_name(scheme: str, K: int, problems: int, seed: int) -> str:
    """A demo row refitted with another seed at the demo's own budget (`--ablation-seeds`)."""
    return f"seeds-{scheme}-k{K}-n{problems}-seed{seed}"


def cells(s: DemoSettings, seeds: tuple[int, ...] = HEADLINE_SEEDS) -> list[tuple[str, int, int]]:
    """(scheme, K, seed): the grid at seed 0 and the other seeds for the headline cells."""
    ks = study_ks(s)
    out = [(sc, K, 0) for sc in SCHEMES for K in ks]
    headline = {("steps", s.steps_K), ("steps", max(ks)), ("linspace", s.recipe_K)}
    out += [(sc, K, seed) for sc, K in sorted(headline) for seed in seeds if seed != 0]
    return out


def fit_and_eval(workdir: Path, s: DemoSettings, name: str, scheme: str, K: int, seed: int) -> float:
    """One cell: fit, export, exact match on the held-out problems."""
    variant = {"sft": "sft.yaml", "steps-adaptive": "adaptive.yaml"}.get(scheme, "uniform-per-step.yaml")
    store = store_name("linspace", s.recipe_K) if scheme == "sft" else store_name(scheme, K)
    fit = fit_student(workdir, s, name, variant, store, K, seed, s.train_problems)
    summary = evaluate_system(workdir, s, name, name, Path(fit["checkpoint"]), "qthink")
    return summary["metrics"]["exact_match"]


def seed_ablation(workdir: Path, s: DemoSettings, stages: Stages, seeds: list[int], run_seed: int,
                  workers: int, names: list[str] | None = None) -> str:
    """The demo's latent rows (and SFT) refitted per seed on the same base, rollouts and stores (those among
    `names`, the demo systems of this run, where given)."""
    systems = (("sft", 0, "SFT"), ("linspace", s.recipe_K, "QThink, linspace (seed's)"),
               ("steps", s.steps_K, "QThink, steps, fixed K"), ("steps-adaptive", s.steps_K, "QThink, steps, adaptive K"))
    systems = tuple(x for x in systems if names is None or DEMO_FIT[x[0]] in names)
    n = s.train_problems
    jobs = [(ablation_name(sc, K, n, seed), fit_and_eval, (workdir, s, ablation_name(sc, K, n, seed), sc, K, seed))
            for sc, K, _ in systems for seed in seeds if seed != run_seed]
    stages.run_parallel(jobs, workers)
    rows = []
    for sc, K, label in systems:
        scores = [stages.done[f"eval-{DEMO_FIT[sc]}"]["result"]["metrics"]["exact_match"] if seed == run_seed else
                  stages.done[ablation_name(sc, K, n, seed)]["result"] for seed in seeds]
        rows.append([label, str(K), ", ".join(f"{100 * x:.1f}%" for x in scores), spread(scores)])
    return markdown_table(["System", "K", f"Exact match per seed ({', '.join(map(str, seeds))})",
                           "Mean ± std (range)"], rows)


def read_cell(workdir: Path, name: str) -> dict:
    """A fitted and evaluated cell from its files: exact match, per chain length, the validation curve."""
    summary = json.loads((workdir / "eval" / name / "summary.json").read_text())
    curve = read_scalars(workdir / "fit" / name / "tensorboard").get("val/exact_match", [])
    return {"exact_match": summary["metrics"]["exact_match"],
            "by_length": {int(n): g["exact_match"] for n, g in summary.get("by_length", {}).items()},
            "val": [(step + 1, value) for step, value in curve]}


def collect(workdir: Path, stages: Stages, s: DemoSettings, seeds: tuple[int, ...]) -> dict[tuple[str, int], list[dict]]:
    """(scheme, K) -> one `read_cell` per seed; SFT and the adaptive student from the demo's own fits and
    whichever `--ablation-seeds` refits exist."""
    found: dict[tuple[str, int], list[dict]] = {}
    for scheme, K, seed in cells(s, seeds):
        found.setdefault((scheme, K), []).append(read_cell(workdir, cell_name(scheme, K, s.train_problems, seed)))
    for scheme, K in (("sft", 0), ("steps-adaptive", s.steps_K)):
        refits = [ablation_name(scheme, K, s.train_problems, seed) for seed in seeds]
        names = [DEMO_FIT[scheme]] + [name for name in refits if name in stages.done]
        found[(scheme, K)] = [read_cell(workdir, name) for name in names]
    return found


def label(scheme: str, K: int, s: DemoSettings) -> str:
    if scheme == "sft":
        return "SFT (no latents)"
    if scheme == "steps-adaptive":
        return f"steps, adaptive (K ≤ {K})"
    return f"{scheme}, K={K}" + (" (the seed's)" if scheme == "linspace" and K == s.recipe_K else "")


def study_table(found: dict[tuple[str, int], list[dict]], s: DemoSettings) -> str:
    """Rows: positions and K; columns: exact match over seeds, per chain length (mean over seeds), the step
    each seed's fit stopped at."""
    lengths = sorted({n for runs in found.values() for r in runs for n in r["by_length"]})
    body = []
    for (scheme, K), runs in found.items():
        per_length = [f"{100 * statistics.mean(r['by_length'][n] for r in runs):.1f}%" for n in lengths]
        stopped = " / ".join(f"{r['val'][-1][0]:,}" if r["val"] else "-" for r in runs)
        body.append([label(scheme, K, s), spread([r["exact_match"] for r in runs]), *per_length, stopped])
    return markdown_table(["Teacher positions, latent steps", "Exact match (mean ± std over seeds)",
                           *(f"{n} steps" for n in lengths), "Fit stopped at step (per seed)"], body)


def plot_study(found: dict[tuple[str, int], list[dict]], s: DemoSettings, out: Path) -> Path:
    import matplotlib.pyplot as plt

    colors = {"linspace": "C0", "steps": "C1", "sft": "grey", "steps-adaptive": "C2"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ks = study_ks(s)
    for scheme in SCHEMES:
        points = [[100 * r["exact_match"] for r in found[(scheme, K)]] for K in ks]
        left.errorbar(ks, [statistics.mean(p) for p in points],
                      yerr=[statistics.stdev(p) if len(p) > 1 else 0.0 for p in points],
                      marker="o", capsize=3, label=f"{scheme}, K fixed", color=colors[scheme])
    for scheme, K, style in (("sft", 0, "--"), ("steps-adaptive", s.steps_K, ":")):
        left.axhline(statistics.mean(100 * r["exact_match"] for r in found[(scheme, K)]), color=colors[scheme],
                     linestyle=style, label=label(scheme, K, s))
    left.axvline(s.steps_K, color="black", linewidth=0.5)  # K = the longest chain
    left.set(xlabel="latent steps K (line: the longest chain)", ylabel="exact match (%)", xticks=ks, ylim=(0, 102),
             title=f"{s.chain_steps}-step chains, held-out test (bars: std over seeds)")
    left.legend(fontsize=7)
    for (scheme, K), runs in found.items():
        if runs[0]["val"] and scheme in SCHEMES:
            steps, values = zip(*runs[0]["val"], strict=True)
            right.plot(steps, [100 * v for v in values], marker=".", color=colors[scheme],
                       linestyle=("-", "--", ":", "-.")[ks.index(K) % 4], label=label(scheme, K, s))
    right.set(xlabel="optimizer step", ylabel="validation exact match (%)", ylim=(0, 102),
              title="validation during each fit (seed 0)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_study(workdir: str | Path = "runs/demo", seed: int = 0, workers: int | None = None,
              settings: DemoSettings | None = None, fit_steps: int = STUDY_FIT_STEPS,
              seeds: tuple[int, ...] = HEADLINE_SEEDS) -> Path:
    from qthink.parallel import default_workers, quiet_worker

    began = time.perf_counter()
    workdir, s = Path(workdir), settings or DemoSettings()
    workers = workers or default_workers()
    require(seed == 0, "the study reuses the demo's seed-0 fits; run the demo with --seed 0")
    require(s.steps_K >= 2, f"the study varies K around the longest chain; --chain-steps {s.chain_steps} has one step")
    stages = Stages(workdir, force=False, settings=asdict(s))
    require("rollouts" in stages.done and all(f"eval-{DEMO_FIT[x]}" in stages.done for x in ("sft", "steps-adaptive")),
            f"{workdir} holds no finished `qthink demo` with SFT and the adaptive student; run it first "
            "(the study reuses its base, rollouts and those fits)")
    quiet_worker()
    stores = sorted({(sc, K) for sc, K, _ in cells(s, seeds)})
    stages.run("study-teachers-" + "+".join(f"{sc}-k{K}" for sc, K in stores), build_stores, workdir,
               [(store_name(sc, K), sc, K) for sc, K in stores], workers)
    budget = study_settings(s, fit_steps)
    todo = sorted(cells(s, seeds), key=lambda c: (c[0] != "linspace", -c[1]))  # the longest fits first
    names = [cell_name(sc, K, s.train_problems, sd) for sc, K, sd in todo]
    stages.run_parallel([(name, fit_and_eval, (workdir, budget, name, *c)) for name, c in zip(names, todo, strict=True)],
                        workers)
    found = collect(workdir, stages, s, seeds)
    figure = plot_study(found, s, workdir / "study.png")
    table = study_table(found, s)
    wall = time.perf_counter() - began
    busy = sum(stages.done[n]["seconds"] for n in names if n in stages.done) / 60  # resumed runs count it all
    text = (f"# qthink study: teacher positions x K at convergence\n\n{s.eval_problems} held-out synthetic problems "
            f"of {s.chain_steps} steps; each fit up to {fit_steps:,} steps, stopped at 100% validation or after "
            f"{STUDY_PATIENCE} checks without a gain; SFT and the adaptive student are the demo's fits "
            f"({s.fit_steps:,} steps). {busy:.0f} min of process time for the fits, run {workers} at a time "
            f"(this invocation: {wall / 60:.1f} min).\n\n{table}\n\n![study]({figure.name})\n")
    atomic_write_text(workdir / "study.md", text)
    print("\n" + table + f"\n\n[study] {workdir / 'study.md'}, {figure}  (wall {wall / 60:.1f} min)")
    return workdir / "study.md"
