"""`linegate train --model auto` (the default): PaDiM and PatchCore fitted on the same split, the
better one on the calibration set kept, and the choice explained; real fits on real pillQC images."""
from __future__ import annotations

import json

import pytest

from conftest import SMALL_IMAGE_SIZE, small_split

pytestmark = pytest.mark.pillqc


@pytest.fixture(scope="module")
def auto_run(pillqc_small, tmp_path_factory):
    from training.train import train

    run = tmp_path_factory.mktemp("auto") / "run"
    metrics = train(pillqc_small, run, "normal", seed=0, image_size=SMALL_IMAGE_SIZE, counts=small_split(),
                    coreset_ratio=0.25)
    return run, metrics


def test_auto_fits_both_and_keeps_the_calibration_winner(auto_run):
    from training.calibrate import choose_best

    run, metrics = auto_run
    choice = metrics["detector_choice"]
    assert set(choice["candidates"]) == {"padim", "patchcore"} and choice["requested"] == "auto"
    cands = {n: json.loads((run / "candidates" / n / "metrics.json").read_text()) for n in ("padim", "patchcore")}
    # the rule, recomputed from the candidates' own calibration figures (never the test's)
    cal = cands["padim"]["calibration"]
    n_normal = sum(cal["confusion"][0])
    again = choose_best({n: m["calibration"]["auroc"] for n, m in cands.items()},
                        {n: m["calibration"]["separation"] for n, m in cands.items()}, cal["n"] - n_normal, n_normal,
                        "detector")
    assert again.chosen == choice["chosen"] == metrics["detector"]
    chosen = run / "candidates" / choice["chosen"]
    # the run is the chosen candidate's: same model file, same split, its detector in run.json
    assert (run / "model.pt").read_bytes() == (chosen / "model.pt").read_bytes()
    assert (run / "split.json").read_text() == (chosen / "split.json").read_text()
    meta = json.loads((run / "run.json").read_text())
    assert meta["detector"] == choice["chosen"] and meta["model_requested"] == "auto"
    assert json.loads((run / "metrics.json").read_text())["detector_choice"]["chosen"] == choice["chosen"]
    # both candidates saw the same split
    assert (run / "candidates" / "padim" / "split.json").read_text() == \
        (run / "candidates" / "patchcore" / "split.json").read_text()
    assert "Detector: chosen on the calibration set" in (run / "report" / "report.html").read_text()


def test_auto_run_exports_and_loads_like_any_run(auto_run):
    from edge.bundle import load_bundle
    from export.onnx_export import export_onnx

    run, metrics = auto_run
    bundle = load_bundle(export_onnx(run))
    assert bundle.manifest["detector"] == metrics["detector"]
    assert bundle.manifest["decision"]["aggregate"] == metrics["calibration"]["aggregate"]


def test_auto_refuses_an_option_it_cannot_use(pillqc_small, tmp_path):
    from training.train import train

    with pytest.raises(ValueError, match="--epochs applies to fcdd only"):
        train(pillqc_small, tmp_path / "run", "normal", epochs=3, image_size=SMALL_IMAGE_SIZE, counts=small_split())
    assert not (tmp_path / "run").exists()
