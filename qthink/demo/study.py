"""`qthink demo --study`: which teacher positions, how many latent steps, how many distinct problems.

Sweeps positions {linspace, steps} x K {1, 2, 3, 6} x distinct training problems {1k, 2k, 8k} on the demo's
base, rollouts and fit settings (`<workdir>` of a finished `qthink demo`), one seed per cell and three for
the headline cells (SFT, the seed's linspace K=6 and steps K=3, at 8k problems). Every cell is a
`qthink fit` + export + eval on the held-out problems; cells run two at a time and are resumable like the
demo's stages (`stages.json`). Writes `study.md` (mean ± std and range per cell) and `study.png`.

`steps` positions with K above the chain's length repeat each step in turn (s1,s1,s2,s2,s3,s3); below it
they take steps evenly, first and last included (K=1: the first step, as `linspace` takes the first token).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from qthink.demo.report import spread
from qthink.demo.stages import DemoSettings, Stages, build_stores, evaluate_system, fit_student, store_name
from qthink.errors import require
from qthink.files import atomic_write_text
from qthink.tables import markdown_table

SCHEMES = ("linspace", "steps")
KS = (1, 2, 3, 6)
PROBLEMS = (1000, 2000, 8000)
HEADLINE_SEEDS = (0, 1, 2)


def from_demo(s: DemoSettings) -> dict[tuple[str, int, int, int], str]:
    """The demo's own fits that are cells of the study (same settings, seed 0, all its problems)."""
    n = s.train_problems
    return {("sft", 0, n, 0): "sft", ("linspace", s.recipe_K, n, 0): "qthink", ("steps", s.steps_K, n, 0): "qthink-steps",
            ("steps-adaptive", s.steps_K, n, 0): "qthink-adaptive"}


def cell_name(scheme: str, K: int, problems: int, seed: int) -> str:
    return f"study-{scheme}-k{K}-n{problems}-seed{seed}"


def cells(s: DemoSettings) -> list[tuple[str, int, int, int]]:
    """(scheme, K, problems, seed): the grid at seed 0, SFT per problem count, extra seeds for the headline."""
    out = [(sc, K, n, 0) for sc in SCHEMES for K in KS for n in PROBLEMS]
    out += [("sft", 0, n, 0) for n in PROBLEMS]
    for sc, K in (("sft", 0), ("linspace", s.recipe_K), ("steps", s.steps_K)):
        out += [(sc, K, max(PROBLEMS), seed) for seed in HEADLINE_SEEDS if seed != 0]
    return out


def fit_and_eval(workdir: Path, s: DemoSettings, scheme: str, K: int, problems: int, seed: int) -> float:
    """One cell: fit, export, exact match on the held-out problems."""
    name = cell_name(scheme, K, problems, seed)
    variant = {"sft": "sft.yaml", "steps-adaptive": "adaptive.yaml"}.get(scheme, "uniform-per-step.yaml")
    store = store_name("linspace", s.recipe_K) if scheme == "sft" else store_name(scheme, K)
    fit = fit_student(workdir, s, name, variant, store, K, seed, problems)
    summary = evaluate_system(workdir, s, name, name, Path(fit["checkpoint"]), "qthink")
    return summary["metrics"]["exact_match"]


def seed_ablation(workdir: Path, s: DemoSettings, stages: Stages, seeds: list[int], run_seed: int,
                  workers: int, names: list[str] | None = None) -> str:
    """The demo's latent rows (and SFT) refitted per seed on the same base, rollouts and stores (those among
    `names`, the demo systems of this run, where given)."""
    systems = (("sft", 0, "SFT"), ("linspace", s.recipe_K, "QThink, linspace (seed's)"),
               ("steps", s.steps_K, "QThink, steps, fixed K"), ("steps-adaptive", s.steps_K, "QThink, steps, adaptive K"))
    demo_fit = {"sft": "sft", "linspace": "qthink", "steps": "qthink-steps", "steps-adaptive": "qthink-adaptive"}
    systems = tuple(x for x in systems if names is None or demo_fit[x[0]] in names)
    jobs = [(cell_name(sc, K, s.train_problems, seed), fit_and_eval, (workdir, s, sc, K, s.train_problems, seed))
            for sc, K, _ in systems for seed in seeds if seed != run_seed]
    stages.run_parallel(jobs, workers)
    rows = []
    for sc, K, label in systems:
        scores = [stages.done[f"eval-{demo_fit[sc]}"]["result"]["metrics"]["exact_match"] if seed == run_seed else
                  stages.done[cell_name(sc, K, s.train_problems, seed)]["result"] for seed in seeds]
        rows.append([label, str(K), ", ".join(f"{100 * x:.1f}%" for x in scores), spread(scores)])
    return markdown_table(["System", "K", f"Exact match per seed ({', '.join(map(str, seeds))})",
                           "Mean ± std (range)"], rows)


def collect(stages: Stages, s: DemoSettings) -> dict[tuple[str, int, int], list[float]]:
    """(scheme, K, problems) -> exact match per seed, the demo's own fits included."""
    scores: dict[tuple[str, int, int], list[float]] = {}
    for scheme, K, n, seed in cells(s):
        name = from_demo(s).get((scheme, K, n, seed))
        value = (stages.done[f"eval-{name}"]["result"]["metrics"]["exact_match"] if name
                 else stages.done[cell_name(scheme, K, n, seed)]["result"])
        scores.setdefault((scheme, K, n), []).append(value)
    return scores


def plot_study(scores: dict[tuple[str, int, int], list[float]], s: DemoSettings, out: Path) -> Path:
    import statistics

    import matplotlib.pyplot as plt

    def mean_std(key):
        v = [100 * x for x in scores[key]]
        return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0

    colors = {"linspace": "C0", "steps": "C1", "sft": "grey"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    n_max = max(PROBLEMS)
    for scheme in SCHEMES:
        m = [mean_std((scheme, K, n_max)) for K in KS]
        left.errorbar(KS, [x for x, _ in m], yerr=[e for _, e in m], marker="o", capsize=3, label=scheme,
                      color=colors[scheme])
    sft, _ = mean_std(("sft", 0, n_max))
    left.axhline(sft, color=colors["sft"], linestyle="--", label="SFT (K=0)")
    left.set(xlabel="latent steps K", ylabel="exact match (%)", xticks=KS, ylim=(0, 102),
             title=f"{n_max:,} distinct problems, {s.chain_steps}-step chains")
    left.legend(fontsize=8)
    for scheme, K, label in (("steps", s.steps_K, f"steps, K={s.steps_K}"), ("linspace", s.recipe_K, f"linspace, K={s.recipe_K} (seed's)"),
                             ("sft", 0, "SFT")):
        m = [mean_std((scheme, K, n)) for n in PROBLEMS]
        right.errorbar(PROBLEMS, [x for x, _ in m], yerr=[e for _, e in m], marker="o", capsize=3, label=label,
                       linestyle="--" if scheme == "sft" else "-", color=colors[scheme])
    right.set(xlabel="distinct training problems", ylabel="exact match (%)", xscale="log", ylim=(0, 102),
              title=f"exact match vs problems (bars: std, {len(HEADLINE_SEEDS)} seeds at 8k)")
    right.set_xticks(PROBLEMS, [f"{n // 1000}k" for n in PROBLEMS])
    right.minorticks_off()
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def study_table(scores: dict[tuple[str, int, int], list[float]], s: DemoSettings) -> str:
    """Exact match per (positions, K) row and problem-count column; cells with several seeds give
    mean ± std (min–max)."""
    rows = [("sft", 0, "SFT (K=0)")] + [(sc, K, f"{sc}, K={K}") for sc in SCHEMES for K in KS]
    body = [[label, *(spread(scores[(sc, K, n)]) for n in PROBLEMS)] for sc, K, label in rows]
    return markdown_table(["Teacher positions, latent steps", *(f"{n // 1000}k problems" for n in PROBLEMS)], body)


def run_study(workdir: str | Path = "runs/demo", seed: int = 0, workers: int | None = None,
              settings: DemoSettings | None = None) -> Path:
    from qthink.parallel import default_workers, quiet_worker

    began = time.perf_counter()
    workdir, s = Path(workdir), settings or DemoSettings()
    workers = workers or default_workers()
    require(seed == 0, "the study reuses the demo's seed-0 fits; run the demo with --seed 0")
    stages = Stages(workdir, force=False, settings=asdict(s))
    require("rollouts" in stages.done and all(f"eval-{n}" in stages.done for n in from_demo(s).values()),
            f"{workdir} holds no finished default `qthink demo`; run it first (the study reuses its base and fits)")
    quiet_worker()
    stores = sorted({(sc, K) for sc in SCHEMES for K in KS})
    stages.run("study-teachers", build_stores, workdir, [(store_name(sc, K), sc, K) for sc, K in stores], workers)
    todo = [c for c in cells(s) if c not in from_demo(s)]
    todo.sort(key=lambda c: (-c[1], -c[2]))  # the longest fits first: the two processes end together
    stages.run_parallel([(cell_name(*c), fit_and_eval, (workdir, s, *c)) for c in todo], workers)
    scores = collect(stages, s)
    figure = plot_study(scores, s, workdir / "study.png")
    table = study_table(scores, s)
    wall = time.perf_counter() - began
    names = ["study-teachers"] + [cell_name(*c) for c in todo]
    busy = sum(stages.done[n]["seconds"] for n in names if n in stages.done) / 60  # resumed runs count it all
    text = (f"# qthink study: positions x K x problems\n\nHeld-out synthetic problems ({s.eval_problems}), "
            f"{s.fit_steps} fit steps per cell, settings as `qthink demo`; {busy:.0f} min of process time for its "
            f"stores and fits, run {workers} at a time (this invocation: {wall / 60:.1f} min).\n\n{table}\n\n"
            f"![study]({figure.name})\n")
    atomic_write_text(workdir / "study.md", text)
    print("\n" + table + f"\n\n[study] {workdir / 'study.md'}, {figure}  (wall {wall / 60:.1f} min)")
    return workdir / "study.md"
