"""Where in the Youden gap should the threshold sit? Evidence from the calibration set alone,
next to what the held-back test set says, for the runs of an accuracy sweep.

The Youden point is an interval: every threshold between the calibration score just below
the optimum and the optimum itself has the same TPR - FPR. `--threshold youden` places the
threshold at its midpoint (training/calibrate.py). This compares three placements, "low" (just
above the lower end: catches more faint defects), "mid" and "high" (at the optimum), and
"binormal" (`--threshold binormal`, the default: Youden's cutoff of normal distributions fitted
to the Box-Cox transformed scores, which may fall outside the interval):
- calibration only: 300 stratified half splits of each run's calibration set; the threshold
  is placed on one half and judged on the other (never the test set);
- test: each run's test accuracy with the threshold placed on its whole calibration set,
  for the record.

    python -m benchmarks.threshold_placement [--workdir /tmp/linegate-accuracy] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from training.calibrate import binormal_threshold

PLACEMENTS = ("low", "mid", "high", "binormal")


def youden_gap(scores: np.ndarray, anomalous: np.ndarray) -> tuple[float, float]:
    """(lower end, optimum) of the interval of thresholds with the best TPR - FPR."""
    fpr, tpr, thresholds = roc_curve(anomalous, scores, drop_intermediate=False)
    high = float(thresholds[int(np.argmax(tpr - fpr))])
    lower = scores[scores < high]
    return (float(lower.max()) if lower.size else high), high


def place(scores: np.ndarray, anomalous: np.ndarray) -> dict[str, float]:
    lo, hi = youden_gap(scores, anomalous)
    mid = (lo + hi) / 2
    try:
        binormal = binormal_threshold(scores, anomalous)
    except ValueError:  # what training does when the fit fails: youden's midpoint
        binormal = mid
    return {"low": lo + 1e-3 * (hi - lo), "mid": mid, "high": hi, "binormal": binormal}


def _read(run: Path, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with open(run / "predictions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["set"] == which]
    classes = np.array([r["class"] for r in rows])
    return np.array([float(r["score"]) for r in rows]), classes != "normal", classes


def study(run: Path, splits: int = 300, seed: int = 0) -> dict:
    cal, cal_y, cal_classes = _read(run, "calibration")
    test, test_y, _ = _read(run, "test")
    rng = np.random.default_rng(seed)
    cv = {p: 0.0 for p in PLACEMENTS}
    for _ in range(splits):
        fit, judge = [], []
        for cls in np.unique(cal_classes):  # stratified by class
            idx = rng.permutation(np.flatnonzero(cal_classes == cls))
            fit += list(idx[: len(idx) // 2])
            judge += list(idx[len(idx) // 2:])
        for p, t in place(cal[fit], cal_y[fit]).items():
            cv[p] += float(((cal[judge] >= t) == cal_y[judge]).mean()) / splits
    on_test = {p: float(((test >= t) == test_y).mean()) for p, t in place(cal, cal_y).items()}
    return {"calibration_cv_accuracy": cv, "test_accuracy": on_test,
            "test_anomalous_fraction": float(test_y.mean()), "calibration_anomalous_fraction": float(cal_y.mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/linegate-accuracy", help="the sweep's run directories")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    runs = sorted(p.parent for p in Path(args.workdir).glob("*/predictions.csv"))
    if not runs:
        parser.error(f"{args.workdir}: no runs (*/predictions.csv); run benchmarks.accuracy_pillqc first")
    per_run = {run.name: study(run) for run in runs}
    detectors = sorted({name.split("-seed")[0] for name in per_run})
    summary = {}
    print("| detector | runs | " + " | ".join(f"cal. CV acc. {p}" for p in PLACEMENTS) + " | "
          + " | ".join(f"test acc. {p}" for p in PLACEMENTS) + " |")
    print("|---|---|" + "---|" * (2 * len(PLACEMENTS)))
    for det in detectors:
        mine = [v for k, v in per_run.items() if k.split("-seed")[0] == det]
        summary[det] = {kind: {p: float(np.mean([m[kind][p] for m in mine])) for p in PLACEMENTS}
                        for kind in ("calibration_cv_accuracy", "test_accuracy")}
        print(f"| {det} | {len(mine)} | " + " | ".join(f"{summary[det]['calibration_cv_accuracy'][p]:.4f}" for p in PLACEMENTS)
              + " | " + " | ".join(f"{summary[det]['test_accuracy'][p]:.4f}" for p in PLACEMENTS) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"workdir": args.workdir, "summary": summary, "runs": per_run}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
