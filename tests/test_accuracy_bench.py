"""benchmarks/accuracy_pillqc.py's bookkeeping (no training here: every run is resumed from a
JSON written by the test): a resumed sweep must have been made with the same settings, and a
sweep whose runs are all resumed still writes its table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.accuracy_pillqc import main

RUN = {"detector": "padim", "seed": 0, "test_auroc": 0.99, "test_accuracy": 0.95, "test_f1": 0.96,
       "test_confusion": [[48, 1], [9, 138]], "calibration_auroc": 1.0, "aggregate": "mean",
       "aggregate_requested": "auto", "threshold_method": "binormal", "threshold": 1.5,
       "calibration_aggregate_auroc": {"mean": 1.0}, "test_aggregate_auroc": {"mean": 0.99},
       "fit_seconds": 8.0, "train_seconds": 17.0}


def _earlier(out: Path, **settings) -> None:
    base = {"aggregate": "auto", "threshold": "binormal", "padim_dims": None, "padim_covariance": "ledoit-wolf",
            "padim_neighbourhood": 3, "augment": None}
    (out / "acc.json").write_text(json.dumps({**base, **settings, "runs": [RUN]}))


@pytest.mark.parametrize("settings, message", [
    ({"augment": "hflip"}, "was made with augment = 'hflip', not None"),
    # a sweep from before PaDiM's Ledoit-Wolf fit: the same options then meant another model
    ({"padim_covariance": None}, "was made with padim_covariance = None, not 'ledoit-wolf'"),
    # and one from before its locally aware features
    ({"padim_neighbourhood": None}, "was made with padim_neighbourhood = None, not 3"),
])
def test_resume_refuses_a_sweep_made_another_way(pillqc, tmp_path, capsys, settings, message):
    _earlier(tmp_path, **settings)
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(pillqc), "--seeds", "0", "--detectors", "padim", "--out", str(tmp_path),
              "--name", "acc", "--resume"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_fully_resumed_sweep_writes_its_table(pillqc, tmp_path):
    _earlier(tmp_path, augment="hflip")
    assert main(["--data", str(pillqc), "--seeds", "0", "--detectors", "padim", "--out", str(tmp_path),
                 "--name", "acc", "--resume", "--augment", "hflip"]) == 0
    table = (tmp_path / "acc.md").read_text()
    assert "| padim | 0.9900 | 0.9900 | >= 0.995 (NOT met) | 0.9500 |" in table
    assert "`--augment hflip` for PaDiM and PatchCore" in table
    assert "PaDiM's features averaged over 3 x 3 neighbourhoods" in table
