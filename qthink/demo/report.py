"""The demo's report: the results table, the cost side, `report.md` and PNG plots.

Plots: training curves (CE and each latent step's L1) read back from each fit's TensorBoard events, and
accuracy against decoder passes per system. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qthink.files import atomic_write_text  # noqa: E402
from qthink.tables import markdown_table  # noqa: E402


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard log folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.exists():
        return {}
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def decoder_passes(row: dict) -> float:
    """Forward passes of the decoder per problem: one prefill, K latent passes (the mean taken, where the
    student chooses), one per generated token after the first (the prefill or the last latent pass predicts
    the first): K + generated tokens."""
    return row.get("mean_latent_steps", row["K"]) + row["mean_tokens"]


def latent_steps_cell(row: dict) -> str:
    """`3`, or for a student that chooses: `2.98 (≤ 4)`: the mean taken and the most it may take."""
    taken = row.get("mean_latent_steps", row["K"])
    return str(row["K"]) if taken == row["K"] else f"{taken:.2f} (≤ {row['K']})"


def results_table(rows: list[dict]) -> str:
    body = [[r["label"], (r.get("scheme") if r["K"] else None) or "-", latent_steps_cell(r),
             f"{100 * r['metrics']['exact_match']:.1f}%", f"{r['mean_tokens']:.1f}", f"{decoder_passes(r):.1f}",
             f"{1000 * r['seconds_per_problem']:.2f} ms"] for r in rows]
    return markdown_table(["System", "Teacher positions", "Latent steps", "Exact match", "Generated tokens",
                           "Decoder passes", "Time / problem"], body)


def by_length_table(rows: list[dict]) -> str | None:
    """Exact match per chain length (rows: systems; columns: `2 steps`, `3 steps`, ...), from each
    evaluation's `by_length`; for a student that chooses its K, the mean latent steps per length too.
    None where the task has no lengths."""
    lengths = sorted({int(n) for r in rows for n in r.get("by_length", {})})
    if not lengths:
        return None
    body = []
    for r in rows:
        groups = r.get("by_length", {})
        cells = [f"{100 * groups[str(n)]['exact_match']:.1f}%" if str(n) in groups else "" for n in lengths]
        chooses = r.get("mean_latent_steps", r["K"]) != r["K"]
        steps = " / ".join(f"{groups[str(n)]['mean_latent_steps']:.2f}" for n in lengths if str(n) in groups)
        match = f" ({100 * r['latent_steps_match']:.0f}% exact)" if chooses and "latent_steps_match" in r else ""
        body.append([r["label"], *cells, f"{100 * r['metrics']['exact_match']:.1f}%", (steps + match) if chooses else ""])
    head = ["System", *(f"{n} steps" for n in lengths), "All", "Latent steps taken per length"]
    return markdown_table(head, body)


def spread(values: list[float]) -> str:
    """`mean ± std (min–max)` of percentages (one value: just the value)."""
    v = [100 * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.1f}%"
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.mean(v):.1f}% ± {std:.1f} ({min(v):.1f}–{max(v):.1f})"


def plot_training_curves(fit_dirs: dict[str, Path], out: Path) -> Path | None:
    """One panel of answer CE per system, one of per-step L1 per distilled system."""
    series = {name: read_scalars(d / "tensorboard") for name, d in fit_dirs.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    distilled = [n for n, s in series.items() if any(t.startswith("train/l1_step_") for t in s)]
    fig, axes = plt.subplots(1, 1 + len(distilled), figsize=(4.5 * (1 + len(distilled)), 3.6), squeeze=False)
    ax = axes[0][0]
    for name, s in series.items():
        if "train/ce" in s:
            steps, values = zip(*s["train/ce"], strict=True)
            ax.plot(steps, values, label=name)
    ax.set(title="answer cross-entropy", xlabel="step", yscale="log")
    ax.legend(fontsize=7)
    for ax, name in zip(axes[0][1:], distilled, strict=True):
        tags = sorted((t for t in series[name] if t.startswith("train/l1_step_")), key=lambda t: int(t.rsplit("_", 1)[1]))
        for tag in tags:
            steps, values = zip(*series[name][tag], strict=True)
            ax.plot(steps, values, label=f"k={tag.rsplit('_', 1)[1]}")
        ax.set(title=f"{name}: L1 per latent step", xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_accuracy_cost(rows: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        x, y = decoder_passes(r), 100 * r["metrics"]["exact_match"]
        ax.scatter([x], [y])
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="decoder forward passes per problem", ylabel="exact match (%)",
           title="accuracy vs inference cost (held-out problems)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cost_section(cost: dict) -> list[str]:
    """The cost side: the best latent student against the thinking base, split into prefill + latent passes
    and answer decoding."""
    latent, base = cost["latent"], cost["base"]
    body = [[c["label"], f"{100 * c['exact_match']:.1f}%", f"{c['passes']:.1f}", f"{c['ms_total']:.2f} ms",
             f"{c['ms_prefill']:.2f} ms", f"{c['ms_decode']:.2f} ms"] for c in (latent, base)]
    table = markdown_table(["System", "Exact match", "Decoder passes", "Time / problem",
                            "prompt + latent passes", "answer decoding"], body)
    return [
        "## Cost side", "",
        f"The best latent student against the base with its chain of thought, both timed here on the same "
        f"{cost['problems']} problems at batch {cost['batch_size']}, median of {cost['repeats']} runs (the "
        "prompt + latent column is a generation cut at its first token; decoding is the rest).", "",
        table, "",
        f"Latent vs thinking: **{latent['ms_total'] / base['ms_total']:.2f}× the time** and "
        f"**{latent['passes'] / base['passes']:.2f}× the decoder passes** per problem, at "
        f"{100 * latent['exact_match']:.1f}% vs {100 * base['exact_match']:.1f}% exact match.", "",
    ]


def write_report(workdir: Path, table: str, rows: list[dict], cost: dict, settings: dict, stages: dict,
                 quick: bool, seed: int, ablation: str | None, wall_seconds: float) -> Path:
    fit_dirs = {name.removeprefix("fit-"): Path(v["result"]["run_dir"]) for name, v in stages.items()
                if name.startswith("fit-")}
    curves = plot_training_curves(fit_dirs, workdir / "training_curves.png")
    scatter = plot_accuracy_cost(rows, workdir / "accuracy_vs_cost.png")
    rollouts = stages.get("rollouts", {}).get("result", {})
    n = max(rollouts.get("rollouts", 0), 1)
    lines = [
        f"# qthink demo report ({'--quick' if quick else 'default'} settings, seed {seed})", "",
        f"Run on {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU, one torch thread per process, Python "
        f"{platform.python_version()}; whole run {wall_seconds:.0f} s (stages resumed from earlier runs count "
        "only their skipping).", "",
        f"Task: synthetic chains of {settings['chain_steps']} single-digit operations mod 10 "
        f"(`a=3 b=a+4 c=b*2 d=c+5 d?`), {settings['train_problems']} distinct training problems, "
        f"{rows[0]['problems']} held-out test problems (a hash assigns every problem to one split). "
        "Exact match = the final digit is right; greedy decoding.", "",
        table, "",
        *(["## By chain length", "", per_length, ""] if (per_length := by_length_table(rows)) else []),
        "Rows: the base model with its chain of thought and without; SFT on answers with no latents; the "
        "latent students of the seed's table with its K and evenly spaced (`linspace`) teacher positions "
        "(CODI = reward-weighted teacher on the final latent step only, RW per-step = reward-weighted on every "
        "step, QThink = uniform teacher on every step, the seed's method), and QThink with one teacher "
        "position per reasoning step (`steps`: the `=` before each intermediate result): with K fixed at the "
        "longest chain's length (shorter chains repeat their steps in turn), and adaptive, where each "
        "problem is taught its own number of steps and a halting head chooses it at test time (its "
        "latent steps: the mean taken, ≤ the most). Decoder passes = latent steps + generated tokens.", "",
        f"Rollouts: G={settings['G']} per problem at temperature {settings['temperature']}: "
        f"{rollouts.get('correct', 0) / n:.1%} correct, {rollouts.get('closed_think', 0) / n:.1%} closed their "
        "think block; so the uniform teacher (all valid rollouts) and the reward-weighted one (correct ones "
        "only) differ.", "",
    ]
    lines += cost_section(cost)
    if ablation:
        lines += ["## Over seeds", "", ablation, ""]
    lines += ["## Validation during training (exact match on 64 held-out problems)", ""]
    if settings.get("patience"):
        lines += [f"A fit stops early when validation reaches 100% or has not improved for {settings['patience']} "
                  "checks; its last checkpoint is the one evaluated.", ""]
    for r in rows:
        curve = (r.get("fit") or {}).get("val_exact_match")
        if curve:
            stopped = curve[-1][0] + 1 < settings["fit_steps"]
            lines.append(f"- {r['label']}: " + ", ".join(f"step {s + 1}: {100 * v:.0f}%" for s, v in curve)
                         + (f" (stopped early at step {curve[-1][0] + 1} of {settings['fit_steps']})" if stopped else ""))
        taken = (r.get("fit") or {}).get("val_latent_steps")
        if taken:
            lines.append("  - mean latent steps chosen: " + ", ".join(f"step {s + 1}: {v:.2f}" for s, v in taken))
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2), "```", "", "## Stage times (seconds)", ""]
    lines += [f"- {name}: {v['seconds']}" for name, v in stages.items() if name != "settings"]
    lines += ["", "## Plots", ""]
    if curves:
        lines.append(f"![training curves]({curves.name})")
    lines.append(f"![accuracy vs cost]({scatter.name})")
    report = workdir / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
