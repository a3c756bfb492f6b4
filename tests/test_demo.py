"""The main job, CI-sized: `facemae demo --quick` runs every stage and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facemae_dist.demo import METHODS

BIN = Path(sys.executable).parent


@pytest.mark.slow
@pytest.mark.dist
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [str(BIN / "facemae"), "demo", "--quick", "--out", str(out), "--seed", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:] + (out / "demo.log").read_text()[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 1  # a non-default seed reaches every stage's command line
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == set(METHODS)
    for row in rows.values():
        assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["leak_top1"] <= 1.0
        assert 0.0 <= row["teacher_leak_top1"] <= 1.0  # leakage judged by the IRM teacher as well
    assert (out / "auditor/backbone.safetensors").is_file()  # the independent auditor
    # released originals are the original faces: the auditor finds each one's own source
    assert rows["original"]["leak_source_top1"] > 0.9
    # masking 75% of every face must make retrieval of the source image much harder
    assert rows["masked"]["leak_source_top1"] < rows["original"]["leak_source_top1"] - 0.3
    for picture in ("faces_grid.png", "privacy_utility.png"):
        assert (out / picture).stat().st_size > 1000
    assert "| method |" in (out / "report.md").read_text()

    # run again on the same folder: every stage is skipped, the report is the same
    again = subprocess.run(
        [str(BIN / "facemae"), "demo", "--quick", "--out", str(out), "--seed", "1"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = (again.stdout + again.stderr).count("skipped")  # rich may wrap the lines
    assert skipped == 5 + len(METHODS)
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]

    # the sweep repeats release → train → verify → audit at another mask ratio on the same run
    swept = subprocess.run(
        [str(BIN / "facemae"), "sweep", "--out", str(out), "--mask-ratios", "0.9"],
        capture_output=True,
        text=True,
    )
    assert swept.returncode == 0, swept.stderr[-3000:]
    sweep = json.loads((out / "sweep.json").read_text())
    curves = sweep["curves"]
    assert {r["method"] for r in sweep["fixed"]} == {"blur", "noise"}  # drawn as reference points
    assert set(curves) == {"masked", "facemae_mse", "facemae_irm"}
    assert all(points[0]["mask_ratio"] == 0.9 for points in curves.values())
    assert (out / "sweep_privacy_utility.png").stat().st_size > 1000


def test_sweep_without_a_finished_demo_names_the_fix(tmp_path):
    from facemae_dist.demo import run_sweep
    from facemae_dist.errors import FacemaeError

    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher/backbone.safetensors").write_bytes(
        b""
    )  # a run cut short: no auditor, no MAE
    with pytest.raises(FacemaeError, match="holds no finished demo: run `facemae demo --out"):
        run_sweep(str(tmp_path), [0.5])


def test_report_table_shows_missing_values_as_a_dash():
    from facemae_dist.report import demo_table_markdown

    # audits without source queries report leak_source_top1 = None (eval/privacy.py)
    row = {
        "method": "blur",
        "acc": 0.75,
        "acc_std": 0.03,
        "leak_top1": 0.2,
        "leak_source_top1": None,
    }
    table = demo_table_markdown([row])
    assert "0.200" in table.splitlines()[-1] and "—" in table.splitlines()[-1]


def test_plot_leaves_out_points_without_a_leakage_value(tmp_path):
    from facemae_dist.report import measured, privacy_utility_plot

    points = {"measured": [(0.1, 0.7, "0.75"), (None, 0.8, "0.5")], "none": [(None, 0.6, "")]}
    assert measured(points) == {"measured": [(0.1, 0.7, "0.75")]}
    path = privacy_utility_plot(points, tmp_path / "plot.png", "t")
    assert path.is_file() and path.stat().st_size > 1000


def test_stage_journal_skips_finished_stages_and_refuses_other_settings(tmp_path):
    from facemae_dist.demo import StageJournal
    from facemae_dist.errors import FacemaeError

    out, calls, timings = tmp_path / "demo", [], {}

    def stage(name, fail=False):
        def fn():
            calls.append(name)
            if fail:
                raise RuntimeError("killed")
            return {"row": name}

        return fn

    journal = StageJournal(out, {"seed": 0})
    assert journal.run("a", stage("a"), timings) == {"row": "a"}
    with pytest.raises(RuntimeError):
        journal.run("b", stage("b", fail=True), timings)
    journal = StageJournal(out, {"seed": 0})  # the rerun
    assert journal.run("a", stage("a"), timings) == {"row": "a"}  # from the journal
    assert journal.run("b", stage("b"), timings) == {"row": "b"}
    assert calls == ["a", "b", "b"]
    with pytest.raises(FacemaeError, match="holds a demo with other settings"):
        StageJournal(out, {"seed": 1})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(FacemaeError, match="not empty and holds no demo"):
        StageJournal(tmp_path / "other", {"seed": 0})
    (out / "stages.json").write_text("{")  # damaged by hand: named, with the fix
    with pytest.raises(FacemaeError, match="stages.json is not valid JSON.*remove"):
        StageJournal(out, {"seed": 0})


def test_rerun_with_other_flags_names_the_flags_that_made_the_folder(tmp_path):
    """A folder made with --quick, run again without it: the refusal says which flags made it and
    the command to continue it, not the journal's settings dict."""
    from facemae_dist.demo import StageJournal, demo_flags, demo_settings
    from facemae_dist.errors import FacemaeError

    out = tmp_path / "demo"
    StageJournal(out, demo_settings(quick=True, seed=0))
    with pytest.raises(FacemaeError) as err:
        StageJournal(out, demo_settings(quick=False, seed=0))
    message = str(err.value)
    assert "made with --quick --seed 0" in message and "{" not in message
    assert f"run `facemae demo --quick --seed 0 --out {out}`, or choose another --out" in message
    StageJournal(out, demo_settings(quick=True, seed=0))  # the command it gives is accepted
    assert demo_flags(demo_settings(quick=False, seed=3)) == "--seed 3"
    assert demo_flags({"seed": 0}) is None and demo_flags(None) is None
    full = tmp_path / "full"
    StageJournal(full, demo_settings(quick=False, seed=2))
    with pytest.raises(FacemaeError, match=r"made with --seed 2 \(full size, no --quick\)"):
        StageJournal(full, demo_settings(quick=True, seed=2))
