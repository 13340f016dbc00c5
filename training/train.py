"""`linegate train` and `linegate evaluate`: split -> fit -> calibrate -> evaluate -> run dir.

A run directory holds everything export needs and everything a person wants to check:
  run.json         what was trained (detector, backbone weights, seed, input size, classes)
  model.pt         the detector's state dict (backbone included: the run is self-contained)
  split.json       which file went to which set
  predictions.csv  every calibration and test image's score and decision
  metrics.json     calibration and test metrics (the seed's list)
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from edge.decision import aggregate_maps

from . import calibrate
from .backbone import load_backbone
from .data import LoadedImages, Split, SplitCounts, load_images, make_split
from .padim import PaDiMModel, extract, fit_padim, select_channels

log = logging.getLogger(__name__)
DETECTORS = ("padim",)


def build_model(meta: dict) -> PaDiMModel:
    """An empty detector of the run's shape, ready for load_state_dict (no weights file read)."""
    size = meta["image_size"]
    backbone = load_backbone(weights=None, image_size=size[0])
    h, w = meta["map_size"]
    dims = meta["dims"]
    return PaDiMModel(backbone, select_channels(meta["seed"], dims), torch.zeros(h * w, dims),
                      torch.zeros(h * w, dims, dims), (h, w))


def load_run(run_dir: str | Path) -> tuple[PaDiMModel, dict]:
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run (no run.json); create one with "
                                "`linegate train DATA --normal-class NAME --out RUN`")
    meta = json.loads(meta_path.read_text())
    model = build_model(meta)
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), meta


@torch.no_grad()
def predict(model: PaDiMModel, tensors: np.ndarray, batch_size: int = 16,
            desc: str = "scoring") -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), maps (N, h, w)) for preprocessed images."""
    out = extract(lambda x: _stack(model(x)), torch.from_numpy(tensors), batch_size, desc)
    h, w = model.map_size
    return out[:, 0].numpy(), out[:, 1:].reshape(-1, h, w).numpy()


def _stack(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(score, map) as one (B, 1 + h*w) tensor, so `extract` can batch and concatenate it."""
    score, amap = outputs
    return torch.cat([score.unsqueeze(1), amap.flatten(1)], dim=1)


def _evaluate(model: PaDiMModel, split: Split, size: tuple[int, int], normal: str,
              batch_size: int, aggregate: str = "mean") -> tuple[dict, list[dict], dict]:
    """Calibrate on the calibration set, evaluate on the test set.

    The image score is `aggregate` of the map: the graph's own mean, or the same function
    the runtime applies to the map (edge.decision.aggregate_maps) for max / topk:P.
    """
    sets: dict[str, LoadedImages] = {}
    scored: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, items in (("calibration", split.calibration), ("test", split.test)):
        sets[name] = load_images(items, size)
        scores, maps = predict(model, sets[name].tensors, batch_size, desc=f"scoring {name}")
        scored[name] = (scores if aggregate == "mean" else aggregate_maps(maps, aggregate), maps)
    cal_scores, cal_maps = scored["calibration"]
    cal_anom = np.array([c != normal for c in sets["calibration"].classes])
    threshold = calibrate.youden_threshold(cal_scores, cal_anom)
    norm_min, norm_max = calibrate.normalisation_range(cal_scores)
    display = calibrate.display_range(cal_maps[~cal_anom], cal_maps[cal_anom])
    calibration = {
        "method": "youden", "aggregate": aggregate, "threshold": threshold,
        "normalisation": {"min": norm_min, "max": norm_max}, "display_range": list(display),
        **calibrate.binary_metrics(cal_scores, cal_anom, threshold),
        "per_class": calibrate.per_class_accuracy(cal_scores, sets["calibration"].classes, normal, threshold),
    }
    test_scores, _ = scored["test"]
    test_anom = np.array([c != normal for c in sets["test"].classes])
    test = {
        **calibrate.binary_metrics(test_scores, test_anom, threshold),
        "per_class": calibrate.per_class_accuracy(test_scores, sets["test"].classes, normal, threshold),
    }
    rows = [{"set": name, "path": p, "class": c, "score": float(s),
             "decision": "reject" if s >= threshold else "accept"}
            for name in ("calibration", "test")
            for p, c, s in zip(sets[name].paths, sets[name].classes, scored[name][0])]
    skipped = sets["calibration"].skipped + sets["test"].skipped
    return {"calibration": calibration, "test": test, "skipped": skipped}, rows, scored


def _write_results(run_dir: Path, metrics: dict, rows: list[dict]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(run_dir / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["set", "path", "class", "score", "decision"])
        writer.writeheader()
        writer.writerows(rows)


def train(data: str | Path, out: str | Path, normal_class: str = "normal", model: str = "padim",
          seed: int = 0, weights: str | None = "imagenet", image_size: int = 224,
          counts: SplitCounts | None = None, batch_size: int = 16, aggregate: str = "mean") -> dict:
    """Train, calibrate and evaluate one detector; returns metrics (also in out/metrics.json)."""
    aggregate_maps(np.zeros((1, 1, 1), np.float32), aggregate)  # a bad name fails before any work
    if model not in DETECTORS:
        raise ValueError(f"--model {model!r}: this version trains {', '.join(DETECTORS)}")
    started = time.time()
    torch.manual_seed(seed)
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(data, normal_class, seed, counts)
    (run_dir / "split.json").write_text(json.dumps(split.to_json(), indent=2) + "\n")
    size = (image_size, image_size)
    log.info("split: %d train, %d calibration, %d test images (seed %d)",
             len(split.train), len(split.calibration), len(split.test), seed)
    train_set = load_images(split.train, size)
    backbone = load_backbone(weights, image_size)
    detector = fit_padim(backbone, torch.from_numpy(train_set.tensors), seed=seed, batch_size=batch_size)
    meta = {"detector": model, "seed": seed, "weights": str(weights), "image_size": list(size),
            "map_size": list(detector.map_size), "dims": int(detector.channels.numel()),
            "normal_class": normal_class, "aggregate": aggregate,
            "anomalous_classes": sorted({c for _, c in split.calibration + split.test} - {normal_class}),
            "data": str(Path(data).resolve())}
    torch.save(detector.state_dict(), run_dir / "model.pt")
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    metrics, rows, _ = _evaluate(detector, split, size, normal_class, batch_size, aggregate)
    metrics["skipped"] = train_set.skipped + metrics["skipped"]
    metrics["split"] = split.to_json()
    metrics["train_seconds"] = round(time.time() - started, 1)
    _write_results(run_dir, metrics, rows)
    return metrics


def evaluate(run_dir: str | Path, batch_size: int = 16) -> dict:
    """Recompute calibration and test metrics for a run from its saved model and split."""
    run_dir = Path(run_dir)
    model, meta = load_run(run_dir)
    split = Split.from_json(json.loads((run_dir / "split.json").read_text()))
    metrics, rows, _ = _evaluate(model, split, tuple(meta["image_size"]), meta["normal_class"], batch_size,
                                 meta.get("aggregate", "mean"))
    metrics["split"] = split.to_json()
    _write_results(run_dir, metrics, rows)
    return metrics
