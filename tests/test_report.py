"""`linegate evaluate RUN`: metrics.json rewritten, one HTML report with its PNG plots and the
overlays of every test error; the same metrics keys for every detector."""
import csv
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest

from conftest import linegate_cmd, read_json

pytestmark = pytest.mark.pillqc
DETECTORS = ("padim", "fcdd", "patchcore")


def _keys(node, prefix=""):
    """Every dotted key path of a JSON tree (list items are leaves)."""
    if isinstance(node, dict):
        return {k for key, v in node.items() for k in _keys(v, f"{prefix}{key}.")} | {prefix.rstrip(".")}
    return {prefix.rstrip(".")}


def test_evaluate_cli_writes_metrics_and_report(small_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(small_runs("padim"), run)
    (run / "metrics.json").unlink()
    shutil.rmtree(run / "report")
    # half the good calibration parts may be rejected: a threshold that makes test errors
    proc = subprocess.run(linegate_cmd("evaluate", str(run), "--threshold", "fpr:0.5"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "report/report.html" in proc.stdout and "re-export" in proc.stdout
    metrics = read_json(run / "metrics.json")
    cal, test = metrics["calibration"], metrics["test"]
    assert cal["method"] == "fpr:0.5" and cal["fpr"] <= 0.5 and cal["recall"] == 1.0
    assert read_json(run / "run.json")["threshold"] == "fpr:0.5"  # kept for the next export

    report = run / "report"
    html = (report / "report.html").read_text()
    for plot in ("histograms.png", "roc.png", "confusion.png"):
        image = cv2.imread(str(report / plot))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 200, plot
        assert f'src="{plot}"' in html
    for cls in ("normal", "chip", "dirt"):
        assert f"<th>{cls}</th>" in html  # per-class accuracy table
    # the split set two defects aside for outlier exposure; PaDiM learns from good parts only
    assert "2 defects for outlier exposure (this run used 0)" in html

    (tn, fp), (fn, tp) = test["confusion"]
    assert fp > 0  # the lowered threshold rejects good test parts: they must all be shown
    overlays = sorted(p.name for p in (report / "overlays").iterdir())
    kinds = {k: [n for n in overlays if n.startswith(k)] for k in
             ("false_positive", "false_negative", "true_positive", "true_negative")}
    assert len(kinds["false_positive"]) == fp and len(kinds["false_negative"]) == fn
    assert len(kinds["true_positive"]) == min(4, tp) and len(kinds["true_negative"]) == min(4, tn)
    with open(run / "predictions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["set"] == "test"]
    wrong = {Path(r["path"]).stem for r in rows if (r["decision"] == "reject") != (r["class"] != "normal")}
    assert {n.split("_", 3)[3].rsplit(".", 1)[0] for n in kinds["false_positive"] + kinds["false_negative"]} == wrong
    for name in overlays:
        assert f'src="overlays/{name}"' in html
        assert cv2.imread(str(report / "overlays" / name)) is not None


def test_every_detector_writes_the_same_metrics_keys(small_runs):
    metrics = {d: read_json(small_runs(d) / "metrics.json") for d in DETECTORS}
    manifests = {d: read_json(small_runs(d) / "bundle" / "manifest.json") for d in DETECTORS}
    reference = _keys(metrics["padim"])
    assert {"calibration.aggregate_requested", "calibration.aggregate_auroc.mean", "calibration.threshold",
            "test.auroc", "test.per_class.chip.accuracy", "fit_seconds", "train_seconds"} <= reference
    for d in DETECTORS:
        assert _keys(metrics[d]) == reference, d
        assert metrics[d]["detector"] == d and metrics[d]["calibration"]["aggregate_requested"] == "auto"
        assert metrics[d]["calibration"]["method_requested"] == "binormal"  # the default
        assert _keys(manifests[d]) == _keys(manifests["padim"]), d
        decision = manifests[d]["decision"]
        assert decision["aggregate"] == metrics[d]["calibration"]["aggregate"]
        assert decision["aggregate_requested"] == "auto" and set(decision["aggregate_auroc"]) >= {"mean", "max"}
        assert (small_runs(d) / "report" / "report.html").is_file()  # train writes the report too
