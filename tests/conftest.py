"""Shared fixtures: the real pillQC data (a failure when ../shared is absent, unless
LINEGATE_SKIP_PILLQC=1), a trained pillQC run (trained once per session), and a tiny
hand-built ONNX bundle for fast runtime tests."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PILLQC = Path(os.environ.get("LINEGATE_PILLQC", REPO.parent / "shared" / "datasets" / "pillqc"))


@pytest.fixture(scope="session")
def pillqc() -> Path:
    """The dataset, or a failure: CI has ../shared beside the clone, and a missing dataset must
    not pass as a green run with the pillQC tests quietly skipped. LINEGATE_SKIP_PILLQC=1 (a
    box without the dataset, e.g. a GPU box) skips them instead, saying so."""
    if not (PILLQC / "normal").is_dir():
        where = (f"pillQC not found at {PILLQC} (it lives in ../shared/datasets/pillqc beside the "
                 "repository; set LINEGATE_PILLQC to point elsewhere)")
        if os.environ.get("LINEGATE_SKIP_PILLQC") == "1":
            pytest.skip(f"{where}; skipped: LINEGATE_SKIP_PILLQC=1")
        pytest.fail(f"{where}; to run without the dataset, set LINEGATE_SKIP_PILLQC=1 and the pillQC "
                    "tests are skipped", pytrace=False)
    return PILLQC


@pytest.fixture(scope="session")
def pillqc_run(pillqc, tmp_path_factory) -> Path:
    """PaDiM trained on pillQC with the seed protocol, --seed 0, exported to RUN/bundle."""
    from export.onnx_export import export_onnx
    from training.train import train

    run = tmp_path_factory.mktemp("pillqc") / "run"
    from training.data import SplitCounts

    train(pillqc, run, "normal", "padim", seed=0, counts=SplitCounts())  # the seed protocol, 70,30,15,2
    export_onnx(run)
    return run


@pytest.fixture(scope="session")
def pillqc_small(pillqc, tmp_path_factory) -> Path:
    """A small pillQC subset (24 normal, 8 chip, 12 dirt), linked (never copied), for tests
    that train a detector end to end in seconds; use with SMALL_SPLIT and a small image size."""
    root = tmp_path_factory.mktemp("pillqc_small")
    for cls, n in (("normal", 24), ("chip", 8), ("dirt", 12)):
        (root / cls).mkdir()
        for f in sorted((pillqc / cls).iterdir())[:n]:
            os.symlink(f, root / cls / f.name)
    return root


def small_split():
    """For pillqc_small: 12 normal to train, 6 normal + 3 per defect to calibrate, 1 per defect
    for outlier exposure, the rest (6 normal, 4 chip, 8 dirt) to test."""
    from training.data import SplitCounts

    return SplitCounts(train_normal=12, calib_normal=6, calib_per_anomaly=3, train_per_anomaly=1)


SMALL_IMAGE_SIZE = 64  # small real runs: seconds per detector


@pytest.fixture(scope="session")
def small_runs(pillqc_small, tmp_path_factory):
    """small_runs(detector) -> a run dir trained on pillqc_small at 64 px (aggregate auto, few
    FCDD epochs) and exported to RUN/bundle; each detector is trained once per session."""
    from export.onnx_export import export_onnx
    from training.train import train

    root, done = tmp_path_factory.mktemp("small_runs"), {}

    def get(detector: str) -> Path:
        if detector not in done:
            run = root / detector
            options = {"fcdd": {"epochs": 30}, "patchcore": {"coreset_ratio": 0.25}}.get(detector, {})
            train(pillqc_small, run, "normal", detector, seed=0, image_size=SMALL_IMAGE_SIZE,
                  counts=small_split(), aggregate="auto", **options)
            export_onnx(run)
            done[detector] = run
        return done[detector]

    return get


def linegate_cmd(*args: str) -> list[str]:
    """The installed console script's entry point, run with this interpreter."""
    return [sys.executable, "-m", "linegate.cli", *args]


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def make_tiny_bundle(path: Path, size: int = 32, threshold: float = 0.5) -> Path:
    """A real ONNX bundle without torch: anomaly_map = mean over channels of pixels / 255
    at half resolution, score = mean of the map. Bright parts score high (rejects)."""
    import onnx
    from onnx import TensorProto, helper

    from edge.bundle import FORMAT_VERSION, write_manifest

    half = size // 2
    nodes = [
        helper.make_node("Div", ["pixels", "k255"], ["scaled"]),
        helper.make_node("AveragePool", ["scaled"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ReduceMean", ["pooled", "axis1"], ["anomaly_map"], keepdims=0),
        helper.make_node("ReduceMean", ["anomaly_map", "axes12"], ["score"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", half, half])],
        [helper.make_tensor("k255", TensorProto.FLOAT, [], [255.0]),
         helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
         helper.make_tensor("axes12", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "model.onnx")
    manifest = {
        "format_version": FORMAT_VERSION, "model_id": "tiny-test", "detector": "tiny",
        "input": {"name": "pixels", "shape": [-1, 3, size, size], "layout": "NCHW", "dtype": "float32",
                  "colour": "RGB", "resize": "stretch", "range": [0, 255],
                  "normalisation": {"where": "in_graph", "mean": 0.0, "std": 255.0}},
        "outputs": {"score": {"name": "score", "shape": [-1], "aggregate": "mean"},
                    "map": {"name": "anomaly_map", "shape": [-1, half, half]}},
        "decision": {"aggregate": "mean", "threshold": threshold, "method": "youden",
                     "normalisation": {"min": 0.0, "max": 1.0}},
        "display_range": [0.0, 1.0],
        "classes": {"normal": "normal", "anomalous": ["bright"]},
        "files": {"model.onnx": {"kind": "onnx", "precision": "fp32"}},
    }
    write_manifest(path, manifest)
    return path


@pytest.fixture()
def tiny_bundle(tmp_path) -> Path:
    return make_tiny_bundle(tmp_path / "bundle")


def write_grey_images(folder: Path, levels: list[int], size: int = 40) -> list[str]:
    """PNG files of uniform grey levels, named in order; returns the names."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, level in enumerate(levels):
        name = f"part{i:03d}.png"
        cv2.imwrite(str(folder / name), np.full((size, size + 6, 3), level, np.uint8))
        names.append(name)
    return names


def edit_manifest(bundle: Path, change) -> None:
    """Apply change(manifest_dict) to a bundle's manifest.json in place (no checksum update)."""
    path = Path(bundle) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
