"""The demo's report: `report.md` (the results table and the settings) and PNG plots.

Plots: training curves (CE and each latent step's L1) read back from each fit's TensorBoard events, and
accuracy against mean generated tokens per system. matplotlib's Agg backend: no display needed.
"""

import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of a TensorBoard log folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.exists():
        return {}
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def plot_training_curves(fit_dirs: dict[str, Path], out: Path) -> Path | None:
    """One panel of answer CE per system, one of per-step L1 per distilled system."""
    series = {name: read_scalars(d / "tensorboard") for name, d in fit_dirs.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    distilled = [n for n, s in series.items() if any(t.startswith("train/l1_step_") for t in s)]
    fig, axes = plt.subplots(1, 1 + len(distilled), figsize=(5 * (1 + len(distilled)), 3.6), squeeze=False)
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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy_tokens(rows: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in rows:
        x, y = r["mean_tokens"], 100 * r["metrics"]["exact_match"]
        ax.scatter([x], [y])
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="mean generated tokens per problem", ylabel="exact match (%)", title="accuracy vs generated tokens")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(workdir: Path, table: str, rows: list[dict], settings: dict, stages: dict, quick: bool,
                 seed: int, ablation_table: str | None, wall_seconds: float) -> Path:
    fit_dirs = {name.removeprefix("fit-"): Path(v["result"]["run_dir"]) for name, v in stages.items()
                if name.startswith("fit-")}
    curves = plot_training_curves(fit_dirs, workdir / "training_curves.png")
    scatter = plot_accuracy_tokens(rows, workdir / "accuracy_vs_tokens.png")
    base = stages.get("base", {}).get("result", {})
    lines = [
        f"# qthink demo report ({'--quick' if quick else 'default'} settings, seed {seed})",
        "",
        f"Run on {time.strftime('%Y-%m-%d')}, {platform.machine()} CPU ({torch_threads()} thread), Python "
        f"{platform.python_version()}; whole run {wall_seconds:.0f} s (stages resumed from earlier runs count "
        "only their skipping).",
        "",
        "Task: synthetic chains of three single-digit operations mod 10 (`a=3 b=a+4 c=b*2 d=c+5 d?`), held-out "
        f"test split, {rows[0]['problems']} problems. Exact match = the final digit is right.",
        "",
        table,
        "",
        "Rows: the base model with its chain of thought and without; SFT on answers with no latents; the "
        "latent students of the seed's table (CODI = reward-weighted teacher on the final latent step only, "
        "RW per-step = reward-weighted on every step, QThink = uniform teacher on every step, the seed's "
        "method) and QThink with teacher states on reasoning-step boundaries (`steps`).",
        "",
    ]
    if ablation_table:
        lines += ["## Teacher positions over seeds", "", ablation_table, ""]
    lines += ["## Settings", "", "```json", json.dumps({"demo": settings, "base_training": base}, indent=2), "```", "",
              "## Stage times (seconds)", ""]
    lines += [f"- {name}: {v['seconds']}" for name, v in stages.items()]
    lines += ["", "## Plots", ""]
    if curves:
        lines.append(f"![training curves]({curves.name})")
    lines.append(f"![accuracy vs generated tokens]({scatter.name})")
    report = workdir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
