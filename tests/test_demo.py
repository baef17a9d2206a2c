"""`qthink demo --quick` end to end (the project's strongest integration test), its resumability and
determinism, and the inspection notebook executed headless on its output."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qthink.demo import SYSTEMS, run_demo
from qthink.demo.stages import select_systems

ROOT = Path(__file__).resolve().parents[1]


def table_without_seconds(table: str) -> list[list[str]]:
    """The demo table's cells with the timing column dropped (the only part allowed to differ)."""
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row[:-1]] for row in rows]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    """Two worker processes: rollouts on two ranks, stores and fits two at a time."""
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, run_demo(workdir, quick=True, seed=0, workers=2)


def test_quick_demo_writes_the_full_table_report_and_plots(quick_run):
    workdir, result = quick_run
    rows = table_without_seconds(result["table"])
    shown = select_systems(None)  # the default rows; CODI and RW per-step only with --systems
    assert len(rows) == 2 + len(shown)  # header, separator, one row per system
    labels = [r[0] for r in rows[2:]]
    assert labels == [system.label for system in shown] and "CODI (RW final-step)" not in labels
    for row in rows[2:]:
        assert re.fullmatch(r"\d+\.\d%", row[3]), row
    latent_steps = {r[0]: r[2] for r in rows[2:]}
    assert latent_steps["QThink, steps positions, fixed K"] == "4"
    assert latent_steps["QThink (seed: uniform per-step, linspace)"] == "6"
    assert re.fullmatch(r"4|\d\.\d\d \(≤ 4\)", latent_steps["QThink, steps positions, adaptive K"])
    report = (workdir / "report.md").read_text()
    assert "## Cost side" in report and "## By chain length" in report
    assert "| System | 2 steps | 3 steps | 4 steps | All |" in result["table_by_length"]
    assert result["table"] in report
    assert (workdir / "training_curves.png").stat().st_size > 10_000
    assert (workdir / "accuracy_vs_cost.png").stat().st_size > 10_000
    for system in shown:  # every system was evaluated and wrote its predictions
        summary = json.loads((workdir / "eval" / system.name / "summary.json").read_text())
        assert summary["problems"] == 48
    # the students are real seed-format checkpoints
    for name in ("sft", "qthink", "qthink-steps", "qthink-adaptive"):
        assert (workdir / "export" / name / "projection_head.pt").is_file()
    # the adaptive student: its halting head is exported, and it chose each problem's latent steps (1 to 4)
    assert (workdir / "export" / "qthink-adaptive" / "halting_head.safetensors").is_file()
    summary = json.loads((workdir / "eval" / "qthink-adaptive" / "summary.json").read_text())
    assert 1 <= summary["mean_latent_steps"] <= 4 and set(summary["by_length"]) == {"2", "3", "4"}
    preds = [json.loads(line) for line in (workdir / "eval" / "qthink-adaptive" / "predictions.jsonl").open()]
    assert {p["chain_length"] for p in preds} == {2, 3, 4} and all(1 <= p["latent_steps"] <= 4 for p in preds)
    store = json.loads((workdir / "teachers-steps-adaptive-k4" / "manifest.json").read_text())
    assert store["adaptive"] is True and set(store["counts"]["num_steps"]) <= {"1", "2", "3", "4"}


def test_demo_rerun_skips_finished_stages_and_gives_the_same_table(quick_run, capsys):
    workdir, first = quick_run
    again = run_demo(workdir, quick=True, seed=0)
    out = capsys.readouterr().out
    assert "base: done already" in out and "fit-qthink: done already" in out
    assert again["table"] == first["table"]


def test_demo_systems_all_adds_the_seed_tables_other_baselines(quick_run):
    workdir, first = quick_run
    every = run_demo(workdir, quick=True, seed=0, systems=["all"])  # the default rows resume; two more fit
    labels = [r[0] for r in table_without_seconds(every["table"])[2:]]
    assert labels == [system.label for system in SYSTEMS]
    assert (workdir / "export" / "codi" / "projection_head.pt").is_file()


def test_demo_is_deterministic_for_a_seed_in_one_process_or_two(quick_run, tmp_path):
    workdir, first = quick_run
    second = run_demo(tmp_path / "again", quick=True, seed=0, workers=1)
    assert (tmp_path / "again" / "rollouts" / "rollouts.jsonl").read_bytes() == \
        (workdir / "rollouts" / "rollouts.jsonl").read_bytes()
    assert table_without_seconds(second["table"]) == table_without_seconds(first["table"])


def test_inspection_notebook_runs_headless_on_the_demo_output(quick_run):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    workdir, _ = quick_run
    nb = nbformat.read(ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    os.environ["QTHINK_RUN"] = str(workdir)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", cwd=str(ROOT)).execute()
    finally:
        os.environ.pop("QTHINK_RUN")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "latent 6: top tokens" in text
    assert "teacher positions (linspace)" in text and "teacher positions (steps)" in text
    assert "qthink: k=1" in text


def test_demo_cli_rejects_bad_ablation_seeds(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qthink", "demo", "--workdir", str(tmp_path), "--ablation-seeds", "a,b"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--ablation-seeds" in proc.stderr


@pytest.mark.parametrize("patience", [0, 2])
def test_demo_fits_stop_early_at_100_percent_or_a_plateau_on_validation(tmp_path, capsys, patience):
    """The demo's budgets are chosen on validation: each fit carries Lightning's EarlyStopping on validation exact
    match (stop at 100%, or after `patience` checks without a gain); patience 0 trains to max_steps."""
    import yaml

    from qthink.demo.stages import DemoSettings, fit_argv
    from qthink.training.lightning_cli import run_lightning_cli

    s = DemoSettings(patience=patience)
    argv = fit_argv(tmp_path, s, "adaptive.yaml", "teachers-steps-adaptive-k4", 4, 0, tmp_path / "run")
    with pytest.raises(SystemExit) as stopped:
        run_lightning_cli([*argv, "--print_config"])
    assert stopped.value.code in (0, None)
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    early = [c["init_args"] for c in callbacks if c["class_path"].endswith("EarlyStopping")]
    if patience == 0:
        assert early == []
    else:
        assert len(early) == 1
        assert (early[0]["monitor"], early[0]["mode"], early[0]["patience"], early[0]["stopping_threshold"]) == \
            ("val/exact_match", "max", 2, 0.999)
        # EarlyStopping stops when the score is strictly above the threshold: 100% on 64 problems must be, 63/64 not
        assert 63 / 64 < early[0]["stopping_threshold"] < 1.0
    assert any(c["class_path"].endswith("ModelCheckpoint") for c in callbacks)  # appended, not replacing the config's


def test_study_fits_positions_by_k_around_the_longest_chain_and_reports_them(quick_run):
    """`qthink demo --study` on a finished demo: linspace and steps at K below, equal to and above the longest
    chain, each fit with the study's own budget and early stopping; SFT and the adaptive rows from the demo."""
    import yaml

    from qthink.demo.stages import QUICK
    from qthink.demo.study import STUDY_PATIENCE, cells, run_study, study_ks

    workdir, _ = quick_run
    assert study_ks(QUICK) == (2, 4, 6)  # chains of 2-4 steps; the seed's K=6 is the one above
    report = run_study(workdir, settings=QUICK, fit_steps=12, seeds=(0,)).read_text()
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert table[0].startswith("| Teacher positions, latent steps | Exact match") and "| 4 steps |" in table[0]
    labels = [row.split("|")[1].strip() for row in table[2:]]
    assert labels == ["linspace, K=2", "linspace, K=4", "linspace, K=6 (the seed's)", "steps, K=2", "steps, K=4",
                      "steps, K=6", "SFT (no latents)", "steps, adaptive (K ≤ 4)"]
    assert (workdir / "study.png").stat().st_size > 10_000
    for scheme, K, seed in cells(QUICK, (0,)):
        name = f"study-{scheme}-k{K}-n{QUICK.train_problems}-seed{seed}"
        config = yaml.safe_load((workdir / "fit" / name / "tensorboard" / "config.yaml").read_text())
        assert (config["trainer"]["max_steps"], config["model"]["latent_steps"]) == (12, K)
        early = [c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EarlyStopping")]
        assert [e["patience"] for e in early] == [STUDY_PATIENCE]
        assert json.loads((workdir / "eval" / name / "summary.json").read_text())["K"] == K
