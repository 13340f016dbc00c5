"""Accuracy of every detector on pillQC with the seed protocol, over several split seeds.

Each (detector, seed) is trained, calibrated on its calibration set and evaluated on its
held-back test set exactly as `linegate train` does; the table reports the test AUROC and the
test accuracy at the calibrated threshold, the aggregate `auto` chose on the calibration set,
and the training time (fit_seconds: the detector's own fitting; train_seconds: the whole
`train`, split to metrics). Runs are appended to the JSON as they finish, so an interrupted
sweep resumes where it stopped (--resume).

    python -m benchmarks.accuracy_pillqc [--seeds 0,1,2,3,4] [--detectors padim,patchcore,fcdd]
        [--aggregate auto] [--threshold binormal] [--data ../shared/datasets/pillqc]
        [--workdir /tmp/linegate-accuracy] [--out benchmarks/results] [--resume]
        [--dims D --name accuracy_pillqc_padim_dD]   # PaDiM with another d, into another file
        [--augment hflip --detectors padim,patchcore --name accuracy_pillqc_hflip]  # mirrored normals
        [--neighbourhood 1 --detectors padim --name accuracy_pillqc_padim_raw]  # the paper's raw features
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.data import SplitCounts
from training.detectors import get_detector
from training.padim import COVARIANCE as PADIM_COVARIANCE
from training.padim import DEFAULT_NEIGHBOURHOOD
from training.train import train

REPO = Path(__file__).resolve().parents[1]
TARGET_AUROC = {"padim": 0.995, "patchcore": 0.995, "fcdd": 0.99}  # issue 3
TARGET_BEST_ACCURACY = 0.98
TARGET_FCDD_SECONDS = 15 * 60


def _run(data: Path, workdir: Path, detector: str, seed: int, aggregate: str, threshold: str,
         dims: int | None = None, augment: str | None = None, neighbourhood: int | None = None) -> dict:
    metrics = train(data, workdir / f"{detector}-seed{seed}", "normal", detector, seed=seed, counts=SplitCounts(),
                    aggregate=aggregate, threshold=threshold, dims=dims, augment=augment, report=False,
                    neighbourhood=neighbourhood)
    cal, test = metrics["calibration"], metrics["test"]
    return {"detector": detector, "seed": seed, "test_auroc": test["auroc"], "test_accuracy": test["accuracy"],
            "test_f1": test["f1"], "test_confusion": test["confusion"], "calibration_auroc": cal["auroc"],
            "aggregate": cal["aggregate"], "aggregate_requested": cal["aggregate_requested"],
            "threshold_method": cal["method"], "threshold": cal["threshold"],
            "calibration_aggregate_auroc": cal["aggregate_auroc"], "test_aggregate_auroc": test["aggregate_auroc"],
            "fit_seconds": metrics["fit_seconds"], "train_seconds": metrics["train_seconds"]}


def summarise(runs: list[dict], detectors: list[str]) -> dict:
    summary = {}
    for det in detectors:
        rs = [r for r in runs if r["detector"] == det]
        if not rs:
            continue
        auroc = [r["test_auroc"] for r in rs]
        acc = [r["test_accuracy"] for r in rs]
        summary[det] = {"seeds": [r["seed"] for r in rs], "mean_test_auroc": float(np.mean(auroc)),
                        "min_test_auroc": float(np.min(auroc)), "mean_test_accuracy": float(np.mean(acc)),
                        "min_test_accuracy": float(np.min(acc)),
                        "max_train_seconds": float(max(r["train_seconds"] for r in rs)),
                        "target_auroc": TARGET_AUROC.get(det),
                        "meets_auroc": bool(np.mean(auroc) >= TARGET_AUROC.get(det, 0))}
    if summary:
        best = max(summary, key=lambda d: summary[d]["mean_test_accuracy"])
        summary["best_by_accuracy"] = {"detector": best, "mean_test_accuracy": summary[best]["mean_test_accuracy"],
                                       "meets": summary[best]["mean_test_accuracy"] >= TARGET_BEST_ACCURACY}
    return summary


def _neighbourhood_text(n: int | None) -> str:
    if n is None:  # sweeps from before the option: raw features, not recorded
        return ""
    return f"; PaDiM's features averaged over {n} x {n} neighbourhoods" if n > 1 else \
        "; PaDiM on raw features (`--neighbourhood 1`)"


def markdown(result: dict) -> str:
    s, runs = result["summary"], result["runs"]
    lines = [f"# Accuracy on pillQC, seed protocol (70/30/15/2), seeds {result['seeds']}", "",
             f"Aggregate `{result['aggregate']}` (chosen on each calibration set), threshold "
             f"`{result['threshold']}`"
             + (f"; PaDiM with d = {result['padim_dims']}" if result.get("padim_dims") else "")
             + _neighbourhood_text(result.get("padim_neighbourhood"))
             + (f"; `--augment {result['augment']}` for PaDiM and PatchCore" if result.get("augment") else "")
             + f"; test metrics on held-back images. {result['machine']}, "
             f"{result['date']}. Command: `{result['command']}`.", "",
             "| detector | mean test AUROC | min | target | mean test accuracy | min | max train time |",
             "|---|---|---|---|---|---|---|"]
    for det in result["detectors"]:
        if det in s:
            d = s[det]
            ok = "met" if d["meets_auroc"] else "NOT met"
            lines.append(f"| {det} | {d['mean_test_auroc']:.4f} | {d['min_test_auroc']:.4f} | >= {d['target_auroc']} "
                         f"({ok}) | {d['mean_test_accuracy']:.4f} | {d['min_test_accuracy']:.4f} | "
                         f"{d['max_train_seconds'] / 60:.1f} min |")
    if "best_by_accuracy" in s:
        b = s["best_by_accuracy"]
        lines += ["", f"Best detector by mean test accuracy: **{b['detector']}** ({b['mean_test_accuracy']:.4f}; "
                      f"target >= {TARGET_BEST_ACCURACY}: {'met' if b['meets'] else 'NOT met'})."]
    lines += ["", "## Every run", "",
              "| detector | seed | calibration AUROC | test AUROC | test accuracy | confusion [[tn, fp], [fn, tp]] | "
              "aggregate (auto) | test AUROC with mean | fit | train |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['detector']} | {r['seed']} | {r['calibration_auroc']:.4f} | {r['test_auroc']:.4f} | "
                     f"{r['test_accuracy']:.4f} | "
                     f"{r['test_confusion']} | {r['aggregate']} | {r['test_aggregate_auroc'].get('mean', float('nan')):.4f} | "
                     f"{r['fit_seconds']:.0f} s | {r['train_seconds']:.0f} s |")
    lines += ["", "\"test AUROC with mean\" is for the record only: the aggregate is chosen on the calibration "
                  "set and never sees the test set.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "datasets" / "pillqc"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--detectors", default="padim,patchcore,fcdd")
    parser.add_argument("--aggregate", default="auto")
    parser.add_argument("--threshold", default="binormal")
    parser.add_argument("--workdir", default="/tmp/linegate-accuracy", help="where the runs go (not the repo)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--resume", action="store_true", help="keep finished runs from an earlier JSON")
    parser.add_argument("--dims", type=int, default=None, help="PaDiM feature dimensions (default: its rule)")
    parser.add_argument("--neighbourhood", type=int, default=DEFAULT_NEIGHBOURHOOD,
                        help=f"PaDiM's feature neighbourhood (default {DEFAULT_NEIGHBOURHOOD}; "
                             "1: the paper's raw features)")
    parser.add_argument("--augment", default=None,
                        help="mirrored normal training images for PaDiM and PatchCore (hflip, vflip)")
    parser.add_argument("--name", default="accuracy_pillqc", help="output file name, without .json/.md")
    args = parser.parse_args(argv)
    data, out, workdir = Path(args.data), Path(args.out), Path(args.workdir)
    if not (data / "normal").is_dir():
        parser.error(f"pillQC not found at {data} (it lives in ../shared/datasets/pillqc beside the repository)")
    seeds = [int(s) for s in args.seeds.split(",")]
    detectors = args.detectors.split(",")
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    runs = []
    if args.resume and json_path.is_file():
        earlier = json.loads(json_path.read_text())
        for key, value in (("aggregate", args.aggregate), ("threshold", args.threshold),
                           ("padim_dims", args.dims), ("padim_covariance", PADIM_COVARIANCE),
                           ("padim_neighbourhood", args.neighbourhood),
                           ("augment", args.augment)):
            if earlier.get(key) != value:  # resumed runs must have been made the same way
                parser.error(f"--resume: {json_path} was made with {key} = {earlier.get(key)!r}, "
                             f"not {value!r}; use another --name or drop --resume")
        runs = earlier["runs"]
    result = {"seeds": seeds, "detectors": detectors, "aggregate": args.aggregate, "threshold": args.threshold,
              "padim_dims": args.dims, "padim_covariance": PADIM_COVARIANCE,
              "padim_neighbourhood": args.neighbourhood, "augment": args.augment,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"{platform.processor() or platform.platform()}",
              "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(["python -m benchmarks.accuracy_pillqc", *(sys.argv[1:] if argv is None else argv)]),
              "runs": runs}
    for seed in seeds:  # seed-major: a partial sweep still compares every detector
        for det in detectors:
            if any(r["detector"] == det and r["seed"] == seed for r in runs):
                continue
            print(f"== {det} seed {seed}", flush=True)
            runs.append(_run(data, workdir, det, seed, args.aggregate, args.threshold, args.dims,
                             args.augment if get_detector(det).mirrors else None,
                             args.neighbourhood if det == "padim" else None))
            r = runs[-1]
            print(f"   test AUROC {r['test_auroc']:.4f} accuracy {r['test_accuracy']:.4f} aggregate "
                  f"{r['aggregate']} train {r['train_seconds']:.0f} s", flush=True)
            result["summary"] = summarise(runs, detectors)
            json_path.write_text(json.dumps(result, indent=2) + "\n")
            (out / f"{args.name}.md").write_text(markdown(result))
    result["summary"] = summarise(runs, detectors)  # also when every run was resumed
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
