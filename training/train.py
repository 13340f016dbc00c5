"""`linegate train` and `linegate evaluate`: split -> fit -> calibrate -> evaluate -> run dir.

A run directory holds everything export needs and everything a person wants to check:
  run.json         what was trained (detector and its shape, backbone weights, seed, input size,
                   classes, the requested aggregate and threshold method, detector options)
  model.pt         the detector's state dict (backbone included: the run is self-contained)
  split.json       which file went to which set
  predictions.csv  every calibration and test image's score and decision
  metrics.json     calibration and test metrics (the seed's list; the same keys for every detector)
  report/          report.html with its PNG plots and overlays (training/report.py)

Calibration (aggregate choice, threshold, normalisation, display range) sees the calibration
images only; the test images are read after it is done.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge.decision import aggregate_maps
from edge.images import DEFAULT_INTERPOLATION

from . import calibrate
from .augment import jpeg_copies, jpeg_quality, parse_augment, with_mirrors
from .backbone import TAP_CHANNELS, load_backbone, read_state_dict
from .data import LoadedImages, Split, SplitCounts, SplitFractions, load_images, make_split
from .detectors import DETECTORS, FitInput, build_model, get_detector
from .geometry import Geometry, choose_geometry, frame_maps, geometry_of_run, load_prepared
from .padim import check_neighbourhood, extract
from .runfiles import read_run_json, require, retrain_hint
from .select import AUTO, train_auto

log = logging.getLogger(__name__)
__all__ = ["DETECTORS", "build_model", "evaluate", "load_run", "predict", "train"]
MIN_IMAGE_SIZE = 32  # the stride-16 tap is then 2x2 patches
RUN_KEYS = ("image_size", "normal_class")  # run.json keys every run needs, beside the detector's own
SPLIT_KEYS = ("normal_class", "layout", "seed", "calibration", "test")  # split.json keys evaluate reads


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict]:
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run (no run.json); create one with "
                                "`linegate train DATA --normal-class NAME --out RUN`")
    meta = read_run_json(meta_path, RUN_KEYS)
    meta.setdefault("detector", "padim")  # runs from before the key were PaDiM (build_model's default)
    try:
        detector = get_detector(meta["detector"])
    except ValueError as exc:
        raise ValueError(f"{meta_path}: {exc}") from None
    for key in detector.keys:  # the detector's shape, named if missing
        require(meta, key, meta_path)
    model_path = run_dir / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path}: no such file; {retrain_hint(run_dir)}")
    state = read_state_dict(model_path, "model")
    try:
        model = build_model(meta)
        model.load_state_dict(state)
    except ValueError as exc:  # run.json and model.pt disagree; the detector says how
        raise ValueError(f"{run_dir}: {exc}") from None
    return model.eval(), meta


def run_interpolation(meta: dict) -> str:
    """How the run's images were resized (edge.images); runs from before the key: "area"."""
    return meta.get("interpolation", "area")


@torch.no_grad()
def predict(model: nn.Module, tensors: np.ndarray, batch_size: int = 16,
            desc: str = "scoring") -> tuple[np.ndarray, np.ndarray]:
    """(scores (N,), maps (N, h, w)) for preprocessed images."""
    out = extract(lambda x: _stack(model(x)), torch.from_numpy(tensors), batch_size, desc)
    h, w = model.map_size
    return out[:, 0].numpy(), out[:, 1:].reshape(-1, h, w).numpy()


def _stack(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(score, map) as one (B, 1 + h*w) tensor, so `extract` can batch and concatenate it."""
    score, amap = outputs
    return torch.cat([score.unsqueeze(1), amap.flatten(1)], dim=1)


@dataclass
class Scored:
    """One evaluated set: its images, the graph's scores and maps, the calibrated image scores."""

    images: LoadedImages
    graph_scores: np.ndarray
    maps: np.ndarray
    normal: str
    scores: np.ndarray | None = None

    @property
    def anomalous(self) -> np.ndarray:
        return np.array([c != self.normal for c in self.images.classes], dtype=bool)


def image_scores(graph_scores: np.ndarray, maps: np.ndarray, aggregate: str) -> np.ndarray:
    """The score the runtime thresholds: the graph's own mean, else the aggregate of the map
    (the same function the runtime applies: edge.decision.aggregate_maps)."""
    return graph_scores if aggregate == "mean" else aggregate_maps(maps, aggregate)


def readable_images(items: list[tuple[str, str]], size: tuple[int, int], interpolation: str, name: str,
                    split_file: str | Path = "split.json") -> LoadedImages:
    """load_images, refusing a set with no readable image (an empty batch fails deep in torch)."""
    # a Geometry (training/geometry.py) reads each image through it: tiles when tiled
    images = load_prepared(items, size) if isinstance(size, Geometry) else load_images(items, size, interpolation)
    if not images.paths:
        if not items:
            raise ValueError(f"{split_file}: the {name} set lists no images; re-train the run to write a new split")
        shown = ", ".join(p for p, _ in items[:3]) + (", ..." if len(items) > 3 else "")
        raise ValueError(f"none of the {len(items)} {name} images in {split_file} can be read ({shown}); "
                         "restore the dataset at those paths (a run copied to another machine needs its "
                         "dataset at the same place) or re-train the run on the data where it is")
    return images


def _score_set(model: nn.Module, items: list[tuple[str, str]], size: Geometry, normal: str,
               batch_size: int, name: str, interpolation: str, split_file: str | Path = "split.json") -> Scored:
    images = readable_images(items, size, interpolation, name, split_file)
    graph_scores, maps = frame_maps(predict, model, images, size, batch_size, desc=f"scoring {name}")
    return Scored(images, graph_scores, maps, normal)


def calibrate_on(cal: Scored, aggregate: str = "mean", method: str = "binormal") -> dict:
    """Everything the decision needs, from the calibration set alone."""
    anomalous = cal.anomalous
    # every candidate's AUROC and separation are recorded, to show what auto picks or would pick
    candidates = tuple(dict.fromkeys((*calibrate.AGGREGATE_CANDIDATES, *([] if aggregate == "auto" else [aggregate]))))
    choice = calibrate.choose_aggregate(cal.maps, anomalous, candidates)
    chosen = choice.chosen if aggregate == "auto" else aggregate
    aurocs = choice.auroc
    cal.scores = image_scores(cal.graph_scores, cal.maps, chosen)
    # the same keys whatever the method: what was asked, why it was not used, binormal's fit
    fitted = {"method_requested": method, "method_fallback": None,
              "threshold_fit": calibrate.BinormalFit.empty_json()}
    if method == "binormal":
        try:
            fit = calibrate.binormal_fit(cal.scores, anomalous)
            threshold, fitted["threshold_fit"] = fit.threshold, fit.to_json()
        except ValueError as exc:  # a small or odd calibration set: the empirical Youden point
            log.warning("%s; using --threshold youden instead", exc)
            method, fitted["method_fallback"] = "youden", str(exc)
    if method != "binormal":
        threshold = calibrate.pick_threshold(cal.scores, anomalous, method)
    norm_min, norm_max = calibrate.normalisation_range(cal.scores)
    display = calibrate.display_range(cal.maps[~anomalous], cal.maps[anomalous])
    return {
        "method": method, **fitted, "aggregate": chosen, "aggregate_requested": aggregate, "aggregate_auroc": aurocs,
        "aggregate_separation": choice.separation,
        "aggregate_reason": choice.reason if aggregate == "auto" else f"aggregate {aggregate}: asked for",
        "separation": choice.separation[chosen],
        "threshold": threshold, "normalisation": {"min": norm_min, "max": norm_max},
        "display_range": list(display),
        **calibrate.binary_metrics(cal.scores, anomalous, threshold),
        "per_class": calibrate.per_class_accuracy(cal.scores, cal.images.classes, cal.normal, threshold),
    }


def _evaluate(model: nn.Module, split: Split, size: Geometry, normal: str, batch_size: int,
              aggregate: str, method: str, interpolation: str,
              split_file: str | Path = "split.json") -> tuple[dict, list[dict], dict[str, Scored]]:
    """Calibrate on the calibration set, then (only then) score and evaluate the test set."""
    cal = _score_set(model, split.calibration, size, normal, batch_size, "calibration", interpolation, split_file)
    calibration = calibrate_on(cal, aggregate, method)
    threshold = calibration["threshold"]
    test = _score_set(model, split.test, size, normal, batch_size, "test", interpolation, split_file)
    test.scores = image_scores(test.graph_scores, test.maps, calibration["aggregate"])
    test_metrics = {
        **calibrate.binary_metrics(test.scores, test.anomalous, threshold),
        "per_class": calibrate.per_class_accuracy(test.scores, test.images.classes, normal, threshold),
        # for the record only (the choice above never sees it): each aggregate's test AUROC
        "aggregate_auroc": calibrate.aggregate_aurocs(test.maps, test.anomalous, tuple(calibration["aggregate_auroc"]))
        if 0 < test.anomalous.sum() < len(test.anomalous) else {},
    }
    scored = {"calibration": cal, "test": test}
    rows = [{"set": name, "path": p, "class": c, "score": float(s),
             "decision": "reject" if s >= threshold else "accept"}
            for name, sc in scored.items()
            for p, c, s in zip(sc.images.paths, sc.images.classes, sc.scores)]
    skipped = cal.images.skipped + test.images.skipped
    return {"calibration": calibration, "test": test_metrics, "skipped": skipped}, rows, scored


def _write_results(run_dir: Path, metrics: dict, rows: list[dict]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with open(run_dir / "predictions.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["set", "path", "class", "score", "decision"])
        writer.writeheader()
        writer.writerows(rows)


def _check_choices(aggregate: str, threshold: str) -> None:
    """Bad names fail before any work."""
    if aggregate != "auto":
        try:
            aggregate_maps(np.zeros((1, 1, 1), np.float32), aggregate)
        except ValueError:
            raise ValueError(f"--aggregate {aggregate!r}: use mean, max, topk:P (P in (0, 100]) "
                             "or auto (best calibration AUROC)") from None
    calibrate.parse_threshold_method(threshold)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(image_size: int = MIN_IMAGE_SIZE, batch_size: int = 1, dims: int | None = None,
                   neighbourhood: int | None = None) -> None:
    """Out-of-range numbers fail before any work, naming the option."""
    total = sum(TAP_CHANNELS.values())
    if not _whole(image_size) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image-size {image_size}: must be an integer of at least {MIN_IMAGE_SIZE} "
                         "(the backbone's stride-16 features need a 2x2 map), e.g. 224")
    if not _whole(batch_size) or batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be an integer of at least 1, e.g. 16")
    if dims is not None and (not _whole(dims) or not 1 <= dims <= total):
        raise ValueError(f"--dims {dims}: must be an integer in 1..{total} (the backbone's tapped channels); "
                         "leave it out for the paper's 100")
    if neighbourhood is not None:
        check_neighbourhood(neighbourhood, "--neighbourhood")
        coarsest = -(-image_size // 16)  # the stride-16 feature map's side
        if neighbourhood > 2 * coarsest - 1:  # every position would average the whole map alike
            raise ValueError(f"--neighbourhood {neighbourhood}: at --image-size {image_size} the coarsest feature "
                             f"map is {coarsest} x {coarsest}, and a window wider than {2 * coarsest - 1} gives "
                             "every position of it the same average; use a small odd number (3, the default)")


def _detector_options(model: str, given: dict) -> dict:
    detector = get_detector(model)
    wrong = [k for k, v in given.items() if v is not None and k not in detector.options]
    if wrong:
        users = {k: [d.name for d in DETECTORS.values() if k in d.options] for k in wrong}
        raise ValueError("; ".join(f"--{k.replace('_', '-')} applies to {', '.join(u)} only, not {model}"
                                   for k, u in users.items()))
    return {**detector.options, **{k: v for k, v in given.items() if v is not None}}


def train(data: str | Path, out: str | Path, normal_class: str = "normal", model: str = "auto",
          seed: int = 0, weights: str | None = "imagenet", image_size: int = 224,
          counts: SplitCounts | SplitFractions | None = None, batch_size: int = 16, aggregate: str = "auto",
          threshold: str = "binormal", epochs: int | None = None, coreset_ratio: float | None = None,
          dims: int | None = None, augment: str | None = None, report: bool = True,
          neighbourhood: int | None = None, geometry: str = "auto", backbone: str = "lite0",
          bank_size: int | None = None, projection_dims: int | None = None) -> dict:
    """Train, calibrate and evaluate a detector; returns metrics (also in out/metrics.json).
    `model="auto"` fits PaDiM and PatchCore and keeps the better on the calibration set
    (training/select.py). `augment` ("hflip", "vflip", "hflip,vflip", and/or "jpeg[:Q]") adds
    mirrored and/or JPEG-compressed copies of the normal training images (training/augment.py);
    calibration and test images are never augmented."""
    if model == AUTO:
        _check_choices(aggregate, threshold)
        given = {"epochs": epochs, "coreset_ratio": coreset_ratio, "dims": dims, "neighbourhood": neighbourhood,
                 "bank_size": bank_size, "projection_dims": projection_dims}
        if epochs is not None:
            raise ValueError("--epochs applies to fcdd only, which --model auto does not fit; add --model fcdd")

        def one(out: Path, model: str, report: bool) -> dict:  # each candidate gets the options it has
            picked = {k: v for k, v in given.items() if k in get_detector(model).options}
            return train(data, out, normal_class, model, seed, weights, image_size, counts, batch_size,
                         aggregate, threshold, augment=augment, report=report, geometry=geometry,
                         backbone=backbone, **picked)
        return train_auto(one, out, report=report)
    detector = get_detector(model)
    _check_choices(aggregate, threshold)
    _check_numbers(image_size, batch_size, dims, neighbourhood)
    mirrors, jpeg = parse_augment(augment), jpeg_quality(augment)
    if (mirrors or jpeg) and not detector.mirrors:
        raise ValueError(f"--augment applies to {', '.join(d.name for d in DETECTORS.values() if d.mirrors)} "
                         f"only: {model} already trains with random flips and turns")
    options = _detector_options(model, {"epochs": epochs, "coreset_ratio": coreset_ratio, "dims": dims,
                                        "neighbourhood": neighbourhood, "bank_size": bank_size,
                                        "projection_dims": projection_dims})
    started = time.time()
    torch.manual_seed(seed)
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(data, normal_class, seed, counts)
    (run_dir / "split.json").write_text(json.dumps(split.to_json(), indent=2) + "\n")
    geo = choose_geometry(geometry, [p for p, _ in split.train], image_size, DEFAULT_INTERPOLATION)
    size = geo.input_size
    log.info("geometry: %s (%s)", geo.describe(), geo.reason)
    log.info("split: %d train (+%d outlier exposure), %d calibration, %d test images (seed %d; %s)",
             len(split.train), len(split.train_anomalous), len(split.calibration), len(split.test), seed,
             split.policy)
    train_set = readable_images(split.train, geo, DEFAULT_INTERPOLATION, "training", run_dir / "split.json")
    # Tiled, every tile of an outlier-exposure image is shown as anomalous, though its label does
    # not say which tile holds the defect: without them FCDD learnt from confetti noise alone and
    # fell from test AUROC 0.818 to 0.539 on KolektorSDD (seed 0), so the noisy labels stay.
    outliers = load_prepared(split.train_anomalous if detector.uses_outliers else [], geo)
    normal = torch.from_numpy(train_set.tensors)
    if jpeg:  # JPEG copies (training/augment.py): a camera that compresses is not a defect
        normal = torch.cat([normal, jpeg_copies(train_set.paths, lambda rgb: geo.prepare(rgb).reshape(-1, 3, *size), jpeg)])
    normal = with_mirrors(normal, mirrors)
    if mirrors or jpeg:
        extras = [f"JPEG copies (quality {jpeg}-95)"] * bool(jpeg) + [f"mirrors ({', '.join(mirrors)})"] * bool(mirrors)
        log.info("training on %d normal inputs: %d images and their %s", len(normal), len(train_set.paths),
                 " and ".join(extras))
    variant = backbone
    backbone = load_backbone(weights, size, variant)
    fit_started = time.time()
    fitted = detector.fit(FitInput(backbone, normal,
                                   torch.from_numpy(outliers.tensors), seed, batch_size, options))
    fit_seconds = time.time() - fit_started
    meta = {"detector": model, "seed": seed, "backbone": variant, "weights": str(weights), "image_size": list(size),
            "interpolation": DEFAULT_INTERPOLATION, "geometry": geo.to_json(), **detector.shape(fitted),
            "options": options, "outlier_exposure": len(outliers.paths),  # defective images it learnt from
            "augment": list(mirrors) + [f"jpeg:{jpeg}"] * bool(jpeg),
            "train_images": len(normal) // geo.tile_count,  # inputs per image: 1, or the tiles
            "normal_class": normal_class, "aggregate": aggregate, "threshold": threshold,
            "anomalous_classes": sorted({c for _, c in split.calibration + split.test} - {normal_class}),
            "data": str(Path(data).resolve())}
    torch.save(fitted.state_dict(), run_dir / "model.pt")
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    metrics, rows, scored = _evaluate(fitted, split, geo, normal_class, batch_size, aggregate, threshold,
                                      DEFAULT_INTERPOLATION, run_dir / "split.json")
    metrics = {"detector": model, **metrics}
    metrics["skipped"] = train_set.skipped + outliers.skipped + metrics["skipped"]
    metrics["split"] = split.to_json()
    metrics["fit_seconds"] = round(fit_seconds, 1)
    metrics["train_seconds"] = round(time.time() - started, 1)
    _write_results(run_dir, metrics, rows)
    if report:
        _report(run_dir, meta, metrics, scored)
    return metrics


def evaluate(run_dir: str | Path, batch_size: int = 16, aggregate: str | None = None,
             threshold: str | None = None, report: bool = True) -> dict:
    """Recalibrate and re-evaluate a run from its saved model and split; rewrites metrics.json,
    predictions.csv and the report. A new aggregate or threshold method is stored in run.json
    (the bundle keeps the old one until `linegate export onnx RUN`)."""
    run_dir = Path(run_dir)
    model, meta = load_run(run_dir)
    aggregate = aggregate or meta.get("aggregate", "mean")
    threshold = threshold or meta.get("threshold", "youden")
    _check_choices(aggregate, threshold)
    _check_numbers(batch_size=batch_size)
    changed = (aggregate, threshold) != (meta.get("aggregate"), meta.get("threshold"))
    meta.update(aggregate=aggregate, threshold=threshold)
    split_path = run_dir / "split.json"
    split = Split.from_json(read_run_json(split_path, SPLIT_KEYS))
    metrics, rows, scored = _evaluate(model, split, geometry_of_run(meta), meta["normal_class"],
                                      batch_size, aggregate, threshold, run_interpolation(meta), split_path)
    old = _previous_metrics(run_dir / "metrics.json")
    # training facts survive re-evaluation: the fit's timings, and the training images it skipped
    trained_on = {p for p, _ in split.train + split.train_anomalous}
    skipped = old.get("skipped") if isinstance(old.get("skipped"), list) else []
    metrics["skipped"] = [p for p in skipped if p in trained_on] + metrics["skipped"]
    metrics = {"detector": meta["detector"], **metrics, "split": split.to_json()}
    for key in ("fit_seconds", "train_seconds"):
        if key in old:
            metrics[key] = old[key]
    _write_results(run_dir, metrics, rows)
    if changed:  # only now that the new calibration is written beside it
        (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    if report:
        _report(run_dir, meta, metrics, scored)
    return metrics


def _previous_metrics(path: Path) -> dict:
    """The metrics.json evaluate is about to replace ({} when missing or unreadable: rewriting it
    is the cure, so a broken one must not stop evaluate)."""
    if not path.is_file():
        return {}
    try:
        return read_run_json(path)
    except ValueError as exc:
        log.warning("%s; its training timings and skipped training images are not carried over", exc)
        return {}


def _report(run_dir: Path, meta: dict, metrics: dict, scored: dict[str, Scored]) -> Path:
    from .report import write_report  # matplotlib is imported only when a report is drawn

    path = write_report(run_dir / "report", meta, metrics, scored)
    log.info("report: %s", path)
    return path
