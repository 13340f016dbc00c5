"""Datasets on disk and the train / calibration / test split.

Two layouts are read:
- one folder per class (`normal/`, `chip/`, `dirt/`), as pillQC;
- MVTec AD (`train/good/`, `test/<class>/`), where `train/good` is the training set and
  `test/` is split, stratified by class, into a calibration half and a test half.

By default the split scales with the data set (`SplitFractions`): most of the good images fit
the model, a fifth calibrate it and a fifth test it; each defect class gives two images to
outlier exposure and the rest half to calibration, half to the test. The seed protocol
(pillQC's SOURCE.md: 70 good to fit, 30 good and 15 per defect class to calibrate, 2 per defect
class for outlier exposure, the rest to test) is `SplitCounts(70, 30, 15, 2)`, `--split
70,30,15,2`. Either way the split is seeded and no file is in two sets.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, astuple, dataclass, field
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
class SplitFractions:
    """The default split, scaled to the data set. Why these numbers: a one-class detector learns
    the good parts' variety from what it is fitted on, so it gets most of them (a fixed 70 left
    900 of a 952-image set unused); calibration picks the score, the detector and the threshold,
    and the test reports on held-back images, so each keeps enough good images to measure a
    false-reject rate (at least `min_normal`). Defects are few and only calibrate or test."""

    train_normal: float = 0.6
    calib_normal: float = 0.2  # the rest of the good images (0.2) go to the test
    calib_anomaly: float = 0.5  # of each defect class, after outlier exposure; the rest to the test
    train_per_anomaly: int = 2  # outlier exposure (FCDD), taken only from classes of >= 10 images
    min_normal: int = 10  # good images kept back for calibration and for the test, each

    def counts(self, normal: int, per_anomaly: dict[str, int]) -> tuple[tuple[int, int], dict[str, tuple[int, int]]]:
        """((train, calibration) good images, {class: (outlier exposure, calibration)})."""
        floor = min(self.min_normal, normal // 4)  # a tiny set still fits on half its images
        calib = max(floor, int(round(normal * self.calib_normal)))
        test = max(floor, normal - int(round(normal * self.train_normal)) - calib)
        train = normal - calib - test
        defects = {}
        for cls, n in per_anomaly.items():
            oe = self.train_per_anomaly if n >= 10 else 0
            defects[cls] = (oe, max(1, int((n - oe) * self.calib_anomaly)) if n - oe >= 2 else 0)
        return (train, calib), defects

    def describe(self) -> str:
        return (f"auto: {self.train_normal:.0%} of the good images fit, {self.calib_normal:.0%} calibrate, "
                f"the rest test (at least {self.min_normal} each); each defect class: "
                f"{self.train_per_anomaly} for outlier exposure (classes of 10 or more), then "
                f"{self.calib_anomaly:.0%} calibrate, the rest test")


@dataclass
class Split:
    normal_class: str
    layout: str
    seed: int
    train: list[tuple[str, str]] = field(default_factory=list)  # (path, class)
    train_anomalous: list[tuple[str, str]] = field(default_factory=list)
    calibration: list[tuple[str, str]] = field(default_factory=list)
    test: list[tuple[str, str]] = field(default_factory=list)
    policy: str = ""  # how the counts were chosen (SplitFractions.describe or the fixed counts)

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
               counts: SplitCounts | SplitFractions | None = None) -> Split:
    """`counts`: fixed numbers (SplitCounts, the seed protocol) or fractions of the data set
    (SplitFractions, the default)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset {root}: no such folder")
    counts = counts or SplitFractions()
    rng = np.random.default_rng(seed)
    layout = detect_layout(root)
    split = Split(normal_class=normal_class, layout=layout, seed=seed)
    split.policy = counts.describe() if isinstance(counts, SplitFractions) else \
        "fixed: {0} good fit, {1} good and {2} per defect class calibrate, {3} per defect class for outlier " \
        "exposure, the rest test".format(*astuple(counts))

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
        if isinstance(counts, SplitFractions):
            normal_counts, defect_counts = counts.counts(
                len(classes[normal_class]), {c: len(f) for c, f in classes.items() if c != normal_class})
        else:
            normal_counts = (counts.train_normal, counts.calib_normal)
            defect_counts = {c: (counts.train_per_anomaly, counts.calib_per_anomaly) for c in classes}
        for cls, files in classes.items():
            if cls == normal_class:
                n_train, n_calib = _fit_counts(cls, len(files), list(normal_counts))
                train, rest = _take(rng, files, n_train)
                add(split.train, train, cls)
            else:
                n_oe, n_calib = _fit_counts(cls, len(files), list(defect_counts[cls]))
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
