"""Tiled against stretched on one data set: accuracy from each run's metrics.json (held-back
test images), and frames per second through the runtime's own per-frame path (the bundle's
geometry: prepare -> engine, tiles of several frames sharing engine calls -> stitch ->
decide) with ONNX Runtime on this box.

    linegate train ../shared/datasets/kolektorsdd --normal-class good --out RUNS/stretch --seed 0 --geometry stretch
    linegate train ../shared/datasets/kolektorsdd --normal-class good --out RUNS/auto --seed 0
    python -m benchmarks.tiling_kolektorsdd RUNS/stretch RUNS/auto --out benchmarks/results/tiling_kolektorsdd

Speed is a ratio between the two bundles measured in the same process, pass after pass
alternating, so a busy neighbour slows both alike; the absolute img/s are this box's.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edge.active import ActiveModel
from edge.bundle import load_bundle
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.frames import Frame
from edge.images import read_image
from edge.pipeline import Pipeline


def _test_frames(run: Path, count: int) -> list[np.ndarray]:
    with open(run / "predictions.csv") as fh:
        paths = [r["path"] for r in csv.DictReader(fh) if r["set"] == "test"][:count]
    return [read_image(p) for p in paths]


def _one_pass(model: ActiveModel, images: list[np.ndarray], max_batch: int) -> float:
    """Seconds for every frame: preprocess, engine (tiles sharing calls), stitch, decide."""
    buffer = np.empty((max_batch, *model.geometry.tensor_shape), np.float32)
    started = time.perf_counter()
    for start in range(0, len(images), max_batch):
        frames = [Frame("cam0", i, 0.0, img) for i, img in enumerate(images[start:start + max_batch])]
        for f in frames:
            f.tensor = model.preprocess(f.image)
        if model.geometry.tiled:
            scores, maps = Pipeline._infer_tiles(model, frames, buffer)
        else:
            for i, f in enumerate(frames):
                buffer[i] = f.tensor
            scores, maps = model.infer(buffer[:len(frames)])
        model.decide([f.camera_id for f in frames], scores, maps)
    return time.perf_counter() - started


def _summary(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / "run.json").read_text())
    geometry = meta.get("geometry", {"mode": "stretch", "input": meta["image_size"]})
    test, cal = metrics["test"], metrics["calibration"]
    return {
        "run": str(run), "detector": metrics["detector"], "seed": meta["seed"], "geometry": geometry,
        "tiles_per_frame": len(geometry.get("tiles", [])) or 1,
        "test": {k: test[k] for k in ("auroc", "accuracy", "precision", "recall", "f1", "confusion")},
        "test_aggregate_auroc": test.get("aggregate_auroc", {}),
        "calibration": {k: cal[k] for k in ("aggregate", "method", "threshold", "auroc")},
        "split": {k: len(metrics["split"][k]) for k in ("train", "train_anomalous", "calibration", "test")},
        "fit_seconds": metrics.get("fit_seconds"), "train_seconds": metrics.get("train_seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stretch", type=Path, help="run dir trained with --geometry stretch (exported)")
    parser.add_argument("tiled", type=Path, help="run dir trained with the default geometry (exported)")
    parser.add_argument("--frames", type=int, default=48, help="test frames timed per pass")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--rescored", type=Path, nargs=2, metavar=("STRETCH", "TILED"),
                        help="copies of the two runs re-evaluated with `linegate evaluate RUN --aggregate auto`: "
                             "their accuracy is reported beside (the image score chosen on calibration images)")
    args = parser.parse_args(argv)

    runs = {"stretch": args.stretch, "tiled": args.tiled}
    result = {name: _summary(run) for name, run in runs.items()}
    models = {}
    for name, run in runs.items():
        bundle = load_bundle(run / "bundle")
        models[name] = ActiveModel.build(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle))
    images = _test_frames(args.stretch, args.frames)
    for model in models.values():  # warm: ONNX Runtime plans memory per shape
        _one_pass(model, images[:args.max_batch], args.max_batch)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.passes):
        for name, model in models.items():
            seconds[name].append(_one_pass(model, images, args.max_batch))
    for name in models:
        fps = [len(images) / s for s in seconds[name]]
        result[name]["frames_per_s"] = {"median": round(statistics.median(fps), 2), "passes": [round(f, 2) for f in fps]}
    ratio = result["stretch"]["frames_per_s"]["median"] / result["tiled"]["frames_per_s"]["median"]
    result["cost_ratio"] = {"tiled_frame_over_stretched_frame": round(ratio, 2),
                            "tiles_per_frame": result["tiled"]["tiles_per_frame"],
                            "note": "a stretched frame is one 224 x 224 input, the same graph as one tile"}
    result["timing"] = {"frames": len(images), "passes": args.passes, "max_batch": args.max_batch,
                        "engine": "onnxruntime CPU, default threads"}
    if args.rescored:
        result["aggregate_auto"] = {name: _summary(run) for name, run in zip(("stretch", "tiled"), args.rescored)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


def _markdown(r: dict) -> str:
    rows = []
    for name, s in [(n, r[n]) for n in ("stretch", "tiled")] + \
            [(f"{n}, --aggregate auto", s) for n, s in r.get("aggregate_auto", {}).items()]:
        g = s["geometry"]
        what = (f"{g['mode']} {g['input'][0]}x{g['input'][1]}" if g["mode"] != "tile" else
                f"tile: {s['tiles_per_frame']} tiles of {g['input'][0]}x{g['input'][1]} over {g['work'][0]}x{g['work'][1]}")
        rows.append(f"| {name} | {what} | {s['test']['auroc']:.4f} | {s['test']['accuracy']:.4f} | "
                    f"{s['calibration']['aggregate']} | {s['test']['confusion']} | {s.get('frames_per_s', {}).get('median', '')} |")
    return "\n".join([
        f"| run | geometry | test AUROC | test accuracy | score | confusion [[TN, FP], [FN, TP]] | frames/s |",
        "|---|---|---|---|---|---|---|", *rows, "",
        f"A tiled frame costs {r['cost_ratio']['tiled_frame_over_stretched_frame']}x a stretched one "
        f"({r['cost_ratio']['tiles_per_frame']} tiles; {r['timing']['frames']} test frames x "
        f"{r['timing']['passes']} passes, batches of {r['timing']['max_batch']} frames, {r['timing']['engine']}).", ""])


if __name__ == "__main__":
    raise SystemExit(main())
