"""The model bundle: the contract between training/export and the runtime.

A bundle is a directory with `model.onnx` (the FP32 graph), optionally reduced-precision
variants (`model.fp16.onnx`, `model.int8.onnx`) and TensorRT engines (`model.fp16.engine`,
...), and `manifest.json`. The manifest's `files` lists what the bundle holds: per file its
kind (onnx | tensorrt), precision (fp32 | fp16 | int8) and sha256; a variant adds its measured
deviation from FP32, an engine the facts it was built for (TensorRT version, GPU name and
compute capability, batch profile). Loading validates the manifest's keys and types and each
model file's sha256, and refuses a mismatch with a message that names the key or file and
says what to do. The threshold lives here, outside the graph, so it can be changed without
re-export. Bundles written before variants existed (only `model.onnx`) load unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .decision import aggregate_maps
from .images import INTERPOLATIONS
from .overlay import UPSAMPLES
from .tiling import Geometry, GeometryError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# dotted key -> accepted types; every one must be present in a valid manifest
REQUIRED: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "model_id": (str,),
    "detector": (str,),
    "input.name": (str,),
    "input.shape": (list,),
    "input.layout": (str,),
    "input.colour": (str,),
    "input.resize": (str,),
    "input.normalisation": (dict,),
    "outputs.score.name": (str,),
    "outputs.score.aggregate": (str,),
    "outputs.map.name": (str,),
    "outputs.map.shape": (list,),
    "decision.aggregate": (str,),
    "decision.threshold": (int, float),
    "decision.method": (str,),
    "decision.normalisation.min": (int, float),
    "decision.normalisation.max": (int, float),
    "display_range": (list,),
    "classes.normal": (str,),
    "classes.anomalous": (list,),
    "files": (dict,),
}


# dotted key -> the one value the runtime implements (edge.images, edge.decision)
RUNTIME_CONVENTIONS: dict[str, str] = {
    "input.colour": "RGB",
    "input.resize": "stretch",
    "input.normalisation.where": "in_graph",
    "decision.reject_if": "score >= threshold",
    "outputs.score.aggregate": "mean",  # every exported graph's score; DecisionRule relies on it
}

KINDS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
# keys every TensorRT engine entry carries: what it was built for, checked at load time
ENGINE_FACTS: dict[str, tuple[type, ...]] = {
    "tensorrt.version": (str,),
    "tensorrt.gpu": (str,),
    "tensorrt.compute_capability": (str,),
    "tensorrt.batch_profile.min": (int,),
    "tensorrt.batch_profile.opt": (int,),
    "tensorrt.batch_profile.max": (int,),
}


class BundleError(ValueError):
    """A bundle that cannot be used; the message says which file/key and what to do."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _get(manifest: dict, dotted: str) -> Any:
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def validate_manifest(manifest: Any, where: str = MANIFEST) -> None:
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: expected a JSON object at the top level")
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise BundleError(f"{where}: format_version {version} is newer than this linegate "
                          f"understands ({FORMAT_VERSION}); upgrade linegate on this box")
    for key, types in REQUIRED.items():
        try:
            value = _get(manifest, key)
        except KeyError:
            raise BundleError(f"{where}: key '{key}' is missing; re-export the bundle with "
                              "`linegate export onnx RUN`") from None
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in types)
            raise BundleError(f"{where}: key '{key}' should be {names}, got {type(value).__name__}")
    # json reads NaN and Infinity: a NaN threshold would accept every part.
    for key in ("decision.threshold", "decision.normalisation.min", "decision.normalisation.max"):
        if not math.isfinite(value := _get(manifest, key)):
            raise BundleError(f"{where}: key '{key}' is {value}; it must be a finite number "
                              "(re-calibrate with `linegate evaluate RUN` and re-export)")
    lo, hi = manifest["decision"]["normalisation"]["min"], manifest["decision"]["normalisation"]["max"]
    if not hi > lo:
        raise BundleError(f"{where}: 'decision.normalisation' needs max > min (got {lo}, {hi})")
    shown = manifest["display_range"]
    if (len(shown) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in shown) or not shown[1] > shown[0]):
        raise BundleError(f"{where}: key 'display_range' is {shown!r}; expected [low, high], two finite "
                          "numbers with high > low (re-export with `linegate export onnx RUN`)")
    shape = manifest["input"]["shape"]
    if len(shape) != 4 or manifest["input"]["layout"] != "NCHW" or shape[1] != 3:
        raise BundleError(f"{where}: 'input.shape' {shape} / layout {manifest['input']['layout']!r} "
                          "not supported: expected NCHW with 3 channels")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape[2:]):
        raise BundleError(f"{where}: 'input.shape' {shape}: height and width must be positive integers "
                          "(the runtime resizes every frame to them)")
    # What the runtime implements; a bundle that asks for anything else would run silently wrong.
    for key, supported in RUNTIME_CONVENTIONS.items():
        try:
            value = _get(manifest, key)
        except KeyError:
            continue  # written by older exporters, which always meant the supported value
        if value != supported:
            raise BundleError(f"{where}: key '{key}' is {value!r}; this runtime only implements "
                              f"{supported!r} (re-export with `linegate export onnx RUN`)")
    interpolation = manifest["input"].get("interpolation", "area")
    if interpolation not in INTERPOLATIONS:
        raise BundleError(f"{where}: key 'input.interpolation' is {interpolation!r}; expected one of "
                          f"{', '.join(INTERPOLATIONS)} (re-export with `linegate export onnx RUN`)")
    upsample = manifest["outputs"]["map"].get("upsample", "bilinear")
    if upsample not in UPSAMPLES:
        raise BundleError(f"{where}: key 'outputs.map.upsample' is {upsample!r}; expected one of "
                          f"{', '.join(UPSAMPLES)}")
    try:
        aggregate_maps(np.zeros((1, 1, 1), np.float32), manifest["decision"]["aggregate"])
    except ValueError as exc:
        raise BundleError(f"{where}: key 'decision.aggregate': {exc} (re-calibrate with "
                          "`linegate evaluate RUN --aggregate ...` and re-export)") from None
    try:  # optional: bundles without it stretch every frame to input.shape
        Geometry.from_manifest(manifest)
    except GeometryError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if not manifest["files"]:
        raise BundleError(f"{where}: key 'files' lists no model file; re-export the bundle with "
                          "`linegate export onnx RUN`")
    for name, facts in manifest["files"].items():
        _validate_file_entry(name, facts, where)


def file_kind(name: str, facts: dict) -> str:
    """The entry's kind; bundles from before kinds were written have only ONNX files."""
    return facts.get("kind") or ("tensorrt" if name.endswith((".engine", ".plan")) else "onnx")


def _validate_file_entry(name: str, facts: Any, where: str) -> None:
    key = f"files.{name}"
    if not isinstance(facts, dict):
        raise BundleError(f"{where}: key '{key}' should be an object with the file's sha256 and facts")
    kind = file_kind(name, facts)
    if kind not in KINDS:
        raise BundleError(f"{where}: key '{key}.kind' is {kind!r}; expected one of {', '.join(KINDS)}")
    precision = facts.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise BundleError(f"{where}: key '{key}.precision' is {precision!r}; expected one of "
                          f"{', '.join(PRECISIONS)}")
    if "deviation" in facts and not isinstance(facts["deviation"], dict):
        raise BundleError(f"{where}: key '{key}.deviation' should be an object (the measured "
                          "deviation from FP32)")
    if kind != "tensorrt":
        return
    for dotted, types in ENGINE_FACTS.items():
        try:
            value = _get(facts, dotted)
        except KeyError:
            raise BundleError(f"{where}: key '{key}.{dotted}' is missing; rebuild the engine with "
                              f"`linegate export tensorrt BUNDLE --precision {precision}`") from None
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in types)
            raise BundleError(f"{where}: key '{key}.{dotted}' should be {names}, got {type(value).__name__}")
    profile = facts["tensorrt"]["batch_profile"]
    if not 1 <= profile["min"] <= profile["opt"] <= profile["max"]:
        raise BundleError(f"{where}: key '{key}.tensorrt.batch_profile' needs 1 <= min <= opt <= max "
                          f"(got {profile})")


@dataclass(frozen=True)
class ModelFile:
    """One model file of a bundle, as the manifest lists it."""

    name: str
    kind: str  # onnx | tensorrt
    precision: str  # fp32 | fp16 | int8
    facts: dict


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def input_name(self) -> str:
        return self.manifest["input"]["name"]

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        _, _, h, w = self.manifest["input"]["shape"]
        return int(h), int(w)

    @property
    def interpolation(self) -> str:
        """How frames are shrunk to the input size (edge.images.INTERPOLATIONS); bundles
        written before the key existed were trained with "area"."""
        return self.manifest["input"].get("interpolation", "area")

    @property
    def map_upsample(self) -> str:
        """How overlays bring the map to the frame (edge.overlay.UPSAMPLES)."""
        return self.manifest["outputs"]["map"].get("upsample", "bilinear")

    @property
    def geometry(self) -> Geometry:
        """What the detector sees of a frame (edge/tiling.py): stretch to input.shape for
        bundles without a `geometry` block."""
        return Geometry.from_manifest(self.manifest)

    @property
    def decision(self) -> dict:
        return self.manifest["decision"]

    @property
    def display_range(self) -> tuple[float, float]:
        lo, hi = self.manifest["display_range"]
        return float(lo), float(hi)

    def models(self, kind: str | None = None) -> list[ModelFile]:
        """What the bundle holds: every model file (of one kind), in manifest order."""
        out = [ModelFile(name, file_kind(name, facts), facts.get("precision", "fp32"), facts)
               for name, facts in self.manifest["files"].items()]
        return [m for m in out if kind is None or m.kind == kind]

    def model(self, kind: str, precision: str) -> ModelFile | None:
        return next((m for m in self.models(kind) if m.precision == precision), None)

    def describe(self) -> str:
        """e.g. 'onnx fp32, onnx fp16, tensorrt fp16' for messages and logs."""
        return ", ".join(f"{m.kind} {m.precision}" for m in self.models()) or "nothing"

    def file(self, name: str) -> Path:
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: the bundle has no {name}; it holds "
                              f"{sorted(self.manifest['files'])}")
        return self.path / name


def _user() -> str:
    """The user this process runs as (the service user), for messages about access."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _unreadable(path: Path) -> BundleError:
    # a folder above it that this user may not enter is the one to fix: name it
    closed = next((p for p in reversed(Path(os.path.abspath(path)).parents) if not os.access(p, os.X_OK)), None)
    where = f" ({closed} does not let that user in)" if closed is not None else ""
    return BundleError(f"{path}: not readable by user {_user()}, which runs linegate{where}; give that user read "
                       "access to the bundle (e.g. chgrp -R linegate BUNDLE && chmod -R g+rX BUNDLE)")


def load_bundle(path: str | Path, verify_checksums: bool = True) -> Bundle:
    """The bundle at ``path``, validated (manifest, files, checksums); BundleError otherwise."""
    try:
        return _load_bundle(Path(path), verify_checksums)
    except PermissionError as exc:  # whatever stat or open was refused: a setting to fix
        raise _unreadable(Path(exc.filename or path)) from None


def _load_bundle(path: Path, verify_checksums: bool) -> Bundle:
    manifest_path = path / MANIFEST
    # An unreadable bundle is a setting to fix (exit 2), not a crash: check access first
    # (is_file() alone says "no manifest" for a folder this user may not enter).
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise _unreadable(path)
    if not manifest_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no {MANIFEST}); create one with "
                          "`linegate export onnx RUN`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except PermissionError:
        raise _unreadable(manifest_path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc}); re-export the bundle") from exc
    validate_manifest(manifest, str(manifest_path))
    for name, facts in manifest["files"].items():
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"{file_path}: listed in the manifest but missing; copy the whole "
                              "bundle directory or re-export it")
        if not os.access(file_path, os.R_OK):
            raise _unreadable(file_path)
        expected = facts.get("sha256") if isinstance(facts, dict) else None
        if not isinstance(expected, str):
            raise BundleError(f"{manifest_path}: key 'files.{name}.sha256' is missing")
        try:
            if verify_checksums and sha256_file(file_path) != expected:
                raise BundleError(f"{file_path}: sha256 does not match the manifest (file corrupt or "
                                  "replaced); copy the bundle again or re-export it")
        except PermissionError:
            raise _unreadable(file_path) from None
    return Bundle(path, manifest)


def _dims_agree(model: list, manifest: list) -> bool:
    """Shapes agree where both give a fixed size: a symbolic or -1 dimension (the batch) is any."""
    if len(model) != len(manifest):
        return False
    fixed = lambda d: isinstance(d, int) and not isinstance(d, bool) and d > 0  # noqa: E731
    return all(a == b for a, b in zip(model, manifest) if fixed(a) and fixed(b))


def check_model_io(bundle: Bundle, model_name: str, inputs: dict[str, list], outputs: dict[str, list]) -> None:
    """Refuse a model whose input and output names and shapes are not the manifest's.

    ``inputs``/``outputs``: name -> shape as the engine reports them (symbolic dimensions as
    strings or None). A manifest that says 128 x 128 over a graph built for 224 x 224 would
    otherwise load, fail on every frame and have the service restarted for ever.
    """
    m = bundle.manifest
    where = f"{bundle.path / model_name} and {bundle.path / MANIFEST}"
    fix = "the manifest does not belong to this model; re-export the bundle with `linegate export onnx RUN`"
    wanted = [("input", m["input"]["name"], m["input"]["shape"], inputs),
              ("outputs.score", m["outputs"]["score"]["name"], m["outputs"]["score"].get("shape"), outputs),
              ("outputs.map", m["outputs"]["map"]["name"], m["outputs"]["map"]["shape"], outputs)]
    for key, name, shape, actual in wanted:
        if name not in actual:
            side = "inputs" if actual is inputs else "outputs"
            raise BundleError(f"{where} disagree: the manifest's {key}.name is {name!r} but the model's "
                              f"{side} are {sorted(actual)}; {fix}")
        if shape is not None and not _dims_agree(list(actual[name]), list(shape)):
            raise BundleError(f"{where} disagree: the manifest's {key}.shape is {list(shape)} but the model's "
                              f"{name!r} is {list(actual[name])}; {fix}")


def write_manifest(bundle_dir: str | Path, manifest: dict) -> Path:
    """Fill in each listed file's sha256, validate, and write manifest.json."""
    bundle_dir = Path(bundle_dir)
    for name, facts in manifest["files"].items():
        facts["sha256"] = sha256_file(bundle_dir / name)
    validate_manifest(manifest)
    out = bundle_dir / MANIFEST
    tmp = out.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out)  # a reader never sees a half-written manifest
    return out
