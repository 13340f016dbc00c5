"""The detectors `linegate train --model NAME` knows, in one place.

Each entry says how to fit the detector on a split's training images, which numbers describe
its shape (written to run.json), and how to rebuild an empty module of that shape from run.json
so that `load_state_dict(model.pt)` restores it without refitting. Every detector is a plain
nn.Module whose forward(pixels 0..255, NCHW) returns (score (B,) = mean of the map,
anomaly_map (B, h, w)) and which has a `map_size`; training, export and the runtime need
nothing else. A new detector is one more entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .backbone import EfficientNetLite0, load_backbone
from .coreset import DEFAULT_BANK_SIZE, DEFAULT_CORESET_RATIO, DEFAULT_PROJECTION_DIMS, fit_patchcore
from .fcdd import FCDDHead, FCDDModel
from .fcdd_train import DEFAULT_EPOCHS, train_fcdd
from .padim import DEFAULT_DIMS, DEFAULT_NEIGHBOURHOOD, PaDiMModel, check_neighbourhood, fit_padim, select_channels
from .patchcore import PATCH_STAGES_BEFORE, PatchCoreModel, patch_stages_of


@dataclass
class FitInput:
    """What a detector may learn from: the split's training images and the run's options."""

    backbone: EfficientNetLite0
    normal: torch.Tensor  # (N, 3, H, W) pixels 0..255
    outliers: torch.Tensor  # the split's train_anomalous images (outlier exposure), maybe empty
    seed: int = 0
    batch_size: int = 16
    options: dict = field(default_factory=dict)  # detector-specific, e.g. epochs, coreset_ratio


@dataclass(frozen=True)
class Detector:
    name: str
    fit: Callable[[FitInput], nn.Module]
    shape: Callable[[nn.Module], dict]  # the numbers build() needs, stored in run.json
    build: Callable[[dict, EfficientNetLite0], nn.Module]  # (run.json, empty backbone) -> module
    options: dict  # option name -> default (the CLI flags that apply to this detector)
    keys: tuple[str, ...] = ()  # run.json keys build() cannot do without (checked on load)
    uses_outliers: bool = False
    # whether `--augment` (mirrored normal training images, training/augment.py) applies
    mirrors: bool = True
    # how an overlay brings the feature-resolution map to the image: "bilinear", or FCDD's
    # "gaussian" (edge.overlay.gaussian_upsample)
    upsample: str = "bilinear"


def _padim_shape(model: PaDiMModel) -> dict:
    # The channel list itself, not just the seed: torch.randperm need not give the same
    # permutation in another PyTorch version, and the head's index buffers are built from it.
    return {"map_size": list(model.map_size), "dims": int(model.channels.numel()),
            "channels": model.channels.tolist(), "neighbourhood": model.neighbourhood}


def _padim_build(meta: dict, backbone: EfficientNetLite0) -> PaDiMModel:
    neighbourhood = meta.get("neighbourhood", 1)  # runs from before the key were fitted on raw features
    check_neighbourhood(neighbourhood, "run.json: 'neighbourhood'",
                        "put back the value the run was trained with, or re-train the run")
    if "channels" not in meta:  # runs from before the key: the seed's choice, checked on load
        return PaDiMModel(backbone, select_channels(meta["seed"], meta["dims"]), neighbourhood=neighbourhood)
    channels, total = meta["channels"], sum(backbone.tap_channels.values())
    if not (isinstance(channels, list) and channels and all(type(c) is int and 0 <= c < total for c in channels)
            and channels == sorted(set(channels)) and len(channels) == meta["dims"]):
        raise ValueError(f"run.json: 'channels' must be {meta['dims']} (dims) sorted distinct integers in "
                         f"0..{total - 1}; re-train the run")
    return PaDiMModel(backbone, torch.tensor(channels), neighbourhood=neighbourhood)


def _fcdd_build(meta: dict, backbone: EfficientNetLite0) -> FCDDModel:
    return FCDDModel(backbone, FCDDHead(meta["channels"], meta["hidden"]), tuple(meta["map_size"]))


def _patchcore_build(meta: dict, backbone: EfficientNetLite0) -> PatchCoreModel:
    k = meta["feature_dims"]
    projection = offset = None
    if meta.get("patch_dims") is not None:  # a projected bank (runs from before the key: raw features)
        projection, offset = torch.zeros(meta["patch_dims"], k), torch.zeros(k)
    stages = patch_stages_of(meta["patch_stages"], "run.json: 'patch_stages'") if "patch_stages" in meta \
        else PATCH_STAGES_BEFORE
    return PatchCoreModel(backbone, torch.zeros(meta["bank_size"], k), tuple(meta["map_size"]), meta["chunk"],
                          projection=projection, offset=offset, stages=stages)


def _patchcore_fit(f: FitInput) -> PatchCoreModel:
    """0 turns the bank cap or the projection off (the options' None means "not given")."""
    cap, dims = f.options.get("bank_size", DEFAULT_BANK_SIZE), f.options.get("projection_dims", DEFAULT_PROJECTION_DIMS)
    return fit_patchcore(f.backbone, f.normal, seed=f.seed, batch_size=f.batch_size,
                         coreset_ratio=f.options.get("coreset_ratio", DEFAULT_CORESET_RATIO),
                         max_bank=cap or None, projection_dims=dims or None)


DETECTORS: dict[str, Detector] = {
    "padim": Detector(
        "padim",
        fit=lambda f: fit_padim(f.backbone, f.normal, seed=f.seed, batch_size=f.batch_size,
                                dims=DEFAULT_DIMS if f.options.get("dims") is None else f.options["dims"],
                                neighbourhood=DEFAULT_NEIGHBOURHOOD if f.options.get("neighbourhood") is None
                                else f.options["neighbourhood"]),
        shape=_padim_shape, build=_padim_build, options={"dims": None, "neighbourhood": None},
        keys=("seed", "dims", "map_size")),
    "fcdd": Detector(
        "fcdd",
        fit=lambda f: train_fcdd(f.backbone, f.normal, f.outliers, seed=f.seed,
                                 epochs=f.options.get("epochs", DEFAULT_EPOCHS), feature_batch=f.batch_size),
        shape=lambda m: {"map_size": list(m.map_size), "channels": m.head.conv1.in_channels,
                         "hidden": m.head.conv1.out_channels},
        build=_fcdd_build, options={"epochs": DEFAULT_EPOCHS}, uses_outliers=True, upsample="gaussian",
        keys=("channels", "hidden", "map_size"), mirrors=False),
    "patchcore": Detector(
        "patchcore",
        fit=_patchcore_fit,
        shape=lambda m: {"map_size": list(m.map_size), "bank_size": int(m.bank.shape[0]),
                         "feature_dims": int(m.bank.shape[1]), "chunk": m.chunk,
                         # the backbone's patch dims the graph projects from (None: not projected)
                         "patch_dims": None if m.projection is None else int(m.projection.shape[0]),
                         "patch_stages": list(m.stages)},
        build=_patchcore_build, options={"coreset_ratio": DEFAULT_CORESET_RATIO, "bank_size": DEFAULT_BANK_SIZE,
                                         "projection_dims": DEFAULT_PROJECTION_DIMS},
        keys=("bank_size", "feature_dims", "map_size", "chunk")),
}


def get_detector(name: str) -> Detector:
    try:
        return DETECTORS[name]
    except KeyError:
        raise ValueError(f"detector {name!r}: use one of {', '.join(DETECTORS)}") from None


def build_model(meta: dict) -> nn.Module:
    """An empty detector of the run's shape, ready for load_state_dict (no weights file read)."""
    detector = get_detector(meta.get("detector", "padim"))
    # runs from before the key were Lite0's
    backbone = load_backbone(weights=None, image_size=tuple(meta["image_size"]), variant=meta.get("backbone", "lite0"))
    return detector.build(meta, backbone)
