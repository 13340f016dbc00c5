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


def test_a_resumed_default_command_sweep_says_which_days_and_commands_made_it(tmp_path, monkeypatch):
    """benchmarks/accuracy.py --resume: the finished runs are kept, not retrained, and the table
    names the earlier sweep's date and command beside this one's (once, however often resumed)."""
    from benchmarks import accuracy

    row = {"set": "elpv", "seed": 0, "detector": "padim", "chosen": "padim", "why": "", "test_auroc": 0.92,
           "test_accuracy": 0.85, "test_confusion": [[273, 28], [62, 295]], "calibration_auroc": 0.91,
           "aggregate": "max", "separation": 2.2, "split": {"train": 905, "train_anomalous": 2, "calibration": 658,
                                                             "test": 658},
           "train_seconds": 70.0, "fit_seconds": 30.0, "frames_per_second": 200.0}
    (tmp_path / "acc.json").write_text(json.dumps({"date": "2026-12-03", "command": "python -m benchmarks.accuracy "
                                                   "--sets elpv", "runs": [row, {**row, "detector": "auto"}]}))
    monkeypatch.setattr(accuracy, "one_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(accuracy.time, "strftime", lambda *a: "2026-12-04")  # "today", a day later
    args = ["--sets", "elpv", "--seeds", "0", "--fcdd", "", "--out", str(tmp_path), "--name", "acc",
            "--workdir", str(tmp_path / "work"), "--resume"]
    for _ in range(2):
        assert accuracy.main(args) == 0
    result = json.loads((tmp_path / "acc.json").read_text())
    assert result["date"] == "2026-12-03, then 2026-12-04"
    now = "python -m benchmarks.accuracy " + " ".join(args)
    assert result["command"] == f"python -m benchmarks.accuracy --sets elpv`, then `{now}"
    table = (tmp_path / "acc.md").read_text()
    assert "2026-12-03, then 2026-12-04" in table and "| elpv | padim | 0.9200 |" in table
