"""Datasets on disk and the train / calibration / test split.

Two layouts are read:
- one folder per class (`normal/`, `chip/`, `dirt/`), as pillQC;
- MVTec AD (`train/good/`, `test/<class>/`), where `train/good` is the training set and
  `test/` is split, stratified by class, into a calibration half and a test half.

The split follows the seed protocol (pillQC's SOURCE.md): a fixed number of normal images
for training, a fixed number of normal and per-anomaly-class images for calibration, a few
anomalous images reserved for outlier exposure, everything else for the test. It is seeded,
and no file is in two sets.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge.images import (
    DEFAULT_INTERPOLATION,
    ImageReadError,
    list_images,
    preprocess,
    read_image,
)

log = logging.getLogger(__name__)


@dataclass
class SplitCounts:
    """Images per set, the seed protocol's numbers by default (pillQC SOURCE.md)."""

    train_normal: int = 70
    calib_normal: int = 30
    calib_per_anomaly: int = 15
    train_per_anomaly: int = 2  # reserved for outlier exposure (FCDD); never in calib or test


@dataclass
class Split:
    normal_class: str
    layout: str
    seed: int
    train: list[tuple[str, str]] = field(default_factory=list)  # (path, class)
    train_anomalous: list[tuple[str, str]] = field(default_factory=list)
    calibration: list[tuple[str, str]] = field(default_factory=list)
    test: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Split":
        fields = {k: [tuple(x) for x in v] if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)

    def check_disjoint(self) -> None:
        seen: dict[str, str] = {}
        for name in ("train", "train_anomalous", "calibration", "test"):
            for path, _ in getattr(self, name):
                if path in seen:
                    raise AssertionError(f"{path} is in both {seen[path]} and {name}")
                seen[path] = name


def detect_layout(root: Path) -> str:
    if (root / "train" / "good").is_dir() and (root / "test").is_dir():
        return "mvtec"
    if any(p.is_dir() for p in root.iterdir()):
        return "folders"
    raise ValueError(f"{root}: no class folders found; expected one folder per class "
                     "(normal/, chip/, ...) or the MVTec AD layout (train/good/, test/<class>/)")


def _class_folders(root: Path) -> dict[str, list[Path]]:
    return {d.name: list_images(d) for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".")}


def _take(rng: np.random.Generator, files: list[Path], n: int) -> tuple[list[Path], list[Path]]:
    order = rng.permutation(len(files))
    chosen = [files[i] for i in order[:n]]
    return chosen, [files[i] for i in order[n:]]


def _fit_counts(name: str, available: int, wanted: list[int]) -> list[int]:
    """Scale a class's wanted counts down when it is too small, keeping one image for the test."""
    if sum(wanted) < available:
        return wanted
    scale = (available - 1) / max(sum(wanted), 1)
    fitted = [int(w * scale) for w in wanted]
    log.warning("class %r has %d images, fewer than the %d the split asks for plus one for the "
                "test; using %s instead", name, available, sum(wanted), fitted)
    return fitted


def make_split(root: str | Path, normal_class: str = "normal", seed: int = 0,
               counts: SplitCounts | None = None) -> Split:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {root}: no such folder")
    counts = counts or SplitCounts()
    rng = np.random.default_rng(seed)
    layout = detect_layout(root)
    split = Split(normal_class=normal_class, layout=layout, seed=seed)

    def add(target: list, files: list[Path], cls: str) -> None:
        target.extend((str(f), cls) for f in files)

    if layout == "mvtec":
        add(split.train, list_images(root / "train" / "good"), normal_class)
        for cls, files in _class_folders(root / "test").items():
            label = normal_class if cls == "good" else cls
            calib, test = _take(rng, files, len(files) // 2)
            add(split.calibration, calib, label)
            add(split.test, test, label)
    else:
        classes = _class_folders(root)
        if normal_class not in classes:
            raise ValueError(f"dataset {root}: no folder {normal_class!r} for the normal class; "
                             f"found {sorted(classes)}; pass --normal-class NAME")
        for cls, files in classes.items():
            if cls == normal_class:
                n_train, n_calib = _fit_counts(cls, len(files), [counts.train_normal, counts.calib_normal])
                train, rest = _take(rng, files, n_train)
                add(split.train, train, cls)
            else:
                n_oe, n_calib = _fit_counts(cls, len(files), [counts.train_per_anomaly, counts.calib_per_anomaly])
                oe, rest = _take(rng, files, n_oe)
                add(split.train_anomalous, oe, cls)
            calib, test = _take(rng, rest, n_calib)
            add(split.calibration, calib, cls)
            add(split.test, test, cls)
    for name in ("train", "calibration", "test"):
        if not getattr(split, name):
            raise ValueError(f"dataset {root}: the {name} set is empty; add images")
    # The threshold is picked on normal vs anomalous calibration images: say so now, not after
    # the detector has been fitted (FCDD: minutes).
    cal_classes = {c for _, c in split.calibration}
    if cal_classes == {normal_class}:
        defects = sorted({c for _, c in split.test + split.train_anomalous} - {normal_class})
        where = root / "test" if layout == "mvtec" else root
        normal_dir = where / ("good" if layout == "mvtec" else normal_class)
        if not defects:
            raise ValueError(f"dataset {root}: only the normal class ({normal_dir}) has images; calibration "
                             f"needs anomalous images too: add one folder of images per defect class next to "
                             f"{normal_dir} (e.g. {where / 'scratch'}/)")
        raise ValueError(f"dataset {root}: the defect classes {defects} have too few images to put any in "
                         "the calibration set; add images to their folders")
    if normal_class not in cal_classes:
        raise ValueError(f"dataset {root}: too few normal images to put any in the calibration set; "
                         "add normal images")
    split.check_disjoint()
    return split


@dataclass
class LoadedImages:
    tensors: np.ndarray  # N x 3 x H x W float32, 0..255
    paths: list[str]
    classes: list[str]
    skipped: list[str]  # unreadable files, reported and left out


def load_images(items: list[tuple[str, str]], size: tuple[int, int],
                interpolation: str = DEFAULT_INTERPOLATION) -> LoadedImages:
    """Read and preprocess (path, class) pairs; an unreadable file is logged and skipped."""
    tensors, paths, classes, skipped = [], [], [], []
    for path, cls in items:
        try:
            tensors.append(preprocess(read_image(path), size, interpolation))
        except ImageReadError as exc:
            log.warning("skipping %s", exc)
            skipped.append(path)
            continue
        paths.append(path)
        classes.append(cls)
    stacked = np.stack(tensors) if tensors else np.zeros((0, 3, *size), np.float32)
    return LoadedImages(stacked, paths, classes, skipped)
