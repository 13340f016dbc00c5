"""`linegate export onnx RUN`: the run's detector (PaDiM, FCDD or PatchCore) -> RUN/bundle
(model.onnx + manifest.json).

The graph takes float32 NCHW RGB pixels in 0..255 with a dynamic batch axis and does the
backbone's normalisation itself, so the runtime only resizes and transposes. It returns
`score` (B,) (the mean of the map) and `anomaly_map` (B, h, w) at feature resolution.
Before the bundle is written, ONNX Runtime's scores are compared with torch's on the run's
own calibration images: a mismatch stops the export instead of shipping a wrong model.
"""
from __future__ import annotations

import logging
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from edge.bundle import FORMAT_VERSION, write_manifest
from edge.decision import DecisionRule
from edge.engine import OnnxRuntimeEngine
from training.backbone import INPUT_MEAN, INPUT_STD
from training.data import Split
from training.detectors import get_detector
from training.runfiles import read_run_json, require
from training.train import load_run, predict, readable_images, run_interpolation

log = logging.getLogger(__name__)
INPUT_NAME, SCORE_NAME, MAP_NAME = "pixels", "score", "anomaly_map"
PARITY_RTOL = 1e-3
# what the manifest copies from metrics.json and run.json (checked before the slow export)
METRICS_KEYS = tuple(f"calibration.{k}" for k in (
    "aggregate", "threshold", "method", "normalisation.min", "normalisation.max", "display_range", "auroc",
    "accuracy", "precision", "recall", "specificity", "f1", "fpr", "fnr", "confusion")) + \
    ("test.auroc", "test.accuracy", "test.f1")
RUN_KEYS = ("image_size", "map_size", "weights", "normal_class", "anomalous_classes")


def export_graph(model: torch.nn.Module, path: Path, image_size: tuple[int, int], max_batch: int = 256) -> None:
    """torch -> ONNX with the dynamo exporter, dynamic batch axis, no external data."""
    example = torch.rand(2, 3, *image_size) * 255
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT_NAME],
                          output_names=[SCORE_NAME, MAP_NAME], dynamic_shapes=({0: batch},),
                          dynamo=True, opset_version=18, external_data=False, verbose=False)


def parity_check(model: torch.nn.Module, onnx_path: Path, tensors: np.ndarray,
                 threshold: float, aggregate: str = "mean") -> dict:
    """Compare torch and ONNX Runtime on real images: relative score error and decisions,
    for the image score the runtime will threshold (the calibrated aggregate)."""
    rule = DecisionRule(threshold, aggregate)
    torch_scores = rule.scores(*predict(model, tensors, desc="parity: torch"))
    engine = OnnxRuntimeEngine(onnx_path, INPUT_NAME, SCORE_NAME, MAP_NAME)
    ort_scores = np.concatenate([rule.scores(*engine.infer(tensors[i:i + 8]))
                                 for i in range(0, len(tensors), 8)])
    rel = np.abs(ort_scores - torch_scores) / np.maximum(np.abs(torch_scores), 1e-12)
    flips = int(np.sum((ort_scores >= threshold) != (torch_scores >= threshold)))
    return {"images": int(len(tensors)), "max_rel_score_error": float(rel.max()),
            "decision_mismatches": flips}


def export_onnx(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    bundle_dir = Path(out) if out else run_dir / "bundle"
    model, meta = load_run(run_dir)
    for key in RUN_KEYS:
        require(meta, key, run_dir / "run.json")
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: the run is not calibrated; run `linegate evaluate {run_dir}`")
    metrics = read_run_json(metrics_path, METRICS_KEYS)
    cal = metrics["calibration"]
    size = tuple(meta["image_size"])
    # The parity images are read before any file is written: a run copied without its dataset
    # fails here, naming the files, and leaves no bundle.tmp behind.
    split_path = run_dir / "split.json"
    split = Split.from_json(read_run_json(split_path, ("normal_class", "layout", "seed", "calibration")))
    interpolation = run_interpolation(meta)
    calib = readable_images(split.calibration, size, interpolation, "calibration", split_path)

    tmp_dir = bundle_dir.with_name(bundle_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    onnx_path = tmp_dir / "model.onnx"
    try:
        log.info("exporting %s to ONNX", meta["detector"])
        export_graph(model, onnx_path, size)
        parity = parity_check(model, onnx_path, calib.tensors, cal["threshold"], cal["aggregate"])
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # nothing in it worth inspecting
        raise
    if parity["max_rel_score_error"] > PARITY_RTOL or parity["decision_mismatches"]:
        raise RuntimeError(f"ONNX parity check failed on {parity['images']} calibration images: {parity}; "
                           f"the exported graph is in {onnx_path} for inspection")
    log.info("parity: max relative score error %.2e over %d images, 0 decision changes",
             parity["max_rel_score_error"], parity["images"])

    h, w = meta["map_size"]
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_id": "",
        "detector": meta["detector"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": {"name": f"efficientnet-{meta.get('backbone', 'lite0')}", "weights": meta["weights"]},
        "input": {"name": INPUT_NAME, "shape": [-1, 3, *size], "layout": "NCHW", "dtype": "float32",
                  "colour": "RGB", "resize": "stretch", "interpolation": interpolation, "range": [0, 255],
                  "normalisation": {"where": "in_graph", "mean": INPUT_MEAN, "std": INPUT_STD}},
        "outputs": {"score": {"name": SCORE_NAME, "shape": [-1], "aggregate": "mean"},
                    "map": {"name": MAP_NAME, "shape": [-1, h, w], "resolution": "feature",
                            # how overlays bring the map to the image (FCDD: the paper's Gaussian)
                            "upsample": get_detector(meta["detector"]).upsample}},
        "decision": {"aggregate": cal["aggregate"], "threshold": cal["threshold"], "method": cal["method"],
                     "reject_if": "score >= threshold", "normalisation": cal["normalisation"],
                     # what was asked for (e.g. auto) and the calibration AUROC of each candidate
                     "aggregate_requested": cal.get("aggregate_requested", cal["aggregate"]),
                     "aggregate_auroc": cal.get("aggregate_auroc", {})},
        "display_range": cal["display_range"],
        # what the detector sees of a frame (edge/tiling.py); the runtime applies exactly this
        **({"geometry": meta["geometry"]} if "geometry" in meta else {}),
        "classes": {"normal": meta["normal_class"], "anomalous": meta["anomalous_classes"]},
        # what the model learned "normal" from: mirrored training images mean a mirrored part passes
        "training": {"seed": meta.get("seed"), "augment": meta.get("augment", []),
                     "train_images": meta.get("train_images")},
        "calibration_metrics": {k: cal[k] for k in ("auroc", "accuracy", "precision", "recall",
                                                    "specificity", "f1", "fpr", "fnr", "confusion")},
        "test_metrics": {k: metrics["test"][k] for k in ("auroc", "accuracy", "f1")},
        "parity": parity,
        "files": {"model.onnx": {"kind": "onnx", "precision": "fp32"}},
    }
    write_manifest(tmp_dir, manifest)
    # model id: detector + the first hex digits of the graph's hash, stable per exported model
    manifest["model_id"] = f"{meta['detector']}-{manifest['files']['model.onnx']['sha256'][:12]}"
    write_manifest(tmp_dir, manifest)
    shutil.rmtree(bundle_dir, ignore_errors=True)
    tmp_dir.rename(bundle_dir)  # a half-written bundle never sits at the final path
    return bundle_dir
