"""What the bundle holds, and which engine runs it.

The choice needs to know what this box offers TensorRT. There is no GPU here, so where a
test needs "a box with a GPU" it passes a GpuStatus stand-in for the probe (and says so);
every other test uses the real probe, which finds no TensorRT on this machine.
"""
import json
import logging
import os
import shutil
import subprocess

import pytest
from conftest import edit_manifest, linegate_cmd

from edge.bundle import BundleError, ModelFile, load_bundle, write_manifest
from edge.engine import OnnxRuntimeEngine, choose_engine, open_engine
from edge.engine_tensorrt import GpuStatus, TensorRTUnavailable, check_facts, probe

ENGINE_FACTS = {"version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "strongly_typed": True,
                "batch_profile": {"min": 1, "opt": 8, "max": 8}}
# stand-ins for a box with a GPU (none here): one matching the engine's facts, one not
GPU_AS_BUILT = GpuStatus(True, "TensorRT 10.3.0 on Orin (compute capability 8.7)", "10.3.0", "Orin", "8.7")
OTHER_GPU = GpuStatus(True, "TensorRT 11.4.0 on H100 (compute capability 9.0)", "11.4.0", "NVIDIA H100", "9.0")
NO_GPU = GpuStatus(False, "no NVIDIA GPU found; run the bundle's ONNX model with `--engine onnxruntime`")


@pytest.fixture()
def rich_bundle(tiny_bundle):
    """The tiny bundle plus an FP16 ONNX entry and a TensorRT engine entry (an engine file
    that only this manifest describes: the choice reads facts, it never runs it)."""
    shutil.copy(tiny_bundle / "model.onnx", tiny_bundle / "model.fp16.onnx")
    (tiny_bundle / "model.fp16.engine").write_bytes(b"serialized engine stand-in")
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["files"]["model.fp16.onnx"] = {"kind": "onnx", "precision": "fp16", "source": "model.onnx",
                                           "deviation": {"decision_flips": 0}}
    manifest["files"]["model.fp16.engine"] = {"kind": "tensorrt", "precision": "fp16", "source": "model.fp16.onnx",
                                             "tensorrt": ENGINE_FACTS}
    write_manifest(tiny_bundle, manifest)
    return tiny_bundle


def test_bundle_lists_what_it_holds(rich_bundle):
    b = load_bundle(rich_bundle)
    assert [(m.name, m.kind, m.precision) for m in b.models()] == [
        ("model.onnx", "onnx", "fp32"), ("model.fp16.onnx", "onnx", "fp16"), ("model.fp16.engine", "tensorrt", "fp16")]
    assert b.model("tensorrt", "fp16").facts["tensorrt"]["gpu"] == "Orin"
    assert b.model("onnx", "int8") is None
    assert b.describe() == "onnx fp32, onnx fp16, tensorrt fp16"


def test_old_bundles_without_kinds_still_load(tiny_bundle):
    edit_manifest(tiny_bundle, lambda m: m["files"]["model.onnx"].pop("kind") and m["files"]["model.onnx"].pop("precision"))
    b = load_bundle(tiny_bundle)
    assert [(m.kind, m.precision) for m in b.models()] == [("onnx", "fp32")]


@pytest.mark.parametrize("change, message", [
    (lambda f: f["tensorrt"].pop("gpu"), r"'files.model.fp16.engine.tensorrt.gpu' is missing; rebuild the engine"),
    (lambda f: f["tensorrt"]["batch_profile"].update(min=4, opt=2), r"needs 1 <= min <= opt <= max"),
    (lambda f: f["tensorrt"].update(compute_capability=8.7), r"compute_capability' should be str"),
    (lambda f: f.update(precision="int4"), r"'files.model.fp16.engine.precision' is 'int4'"),
    (lambda f: f.update(kind="openvino"), r"'files.model.fp16.engine.kind' is 'openvino'"),
])
def test_engine_entries_are_validated(rich_bundle, change, message):
    edit_manifest(rich_bundle, lambda m: change(m["files"]["model.fp16.engine"]))
    with pytest.raises(BundleError, match=message):
        load_bundle(rich_bundle)


def test_auto_without_a_gpu_runs_onnx_runtime_and_says_why(rich_bundle):
    choice = choose_engine(load_bundle(rich_bundle), "auto", probe=lambda: NO_GPU)
    assert (choice.kind, choice.model.name) == ("onnxruntime", "model.onnx")
    assert "no NVIDIA GPU found" in choice.reason


def test_auto_picks_tensorrt_where_the_engine_fits_the_gpu(rich_bundle):
    # stand-in probe: a box with the GPU and TensorRT the engine was built for (none here)
    choice = choose_engine(load_bundle(rich_bundle), "auto", probe=lambda: GPU_AS_BUILT)
    assert (choice.kind, choice.model.name, choice.model.precision) == ("tensorrt", "model.fp16.engine", "fp16")


def test_auto_falls_back_when_the_engine_was_built_elsewhere(rich_bundle):
    # stand-in probe: a box with another GPU and TensorRT version
    choice = choose_engine(load_bundle(rich_bundle), "auto", probe=lambda: OTHER_GPU)
    assert choice.kind == "onnxruntime"
    assert "TensorRT 10.3.0" in choice.reason and "linegate export tensorrt" in choice.reason


def test_auto_without_an_engine_of_the_precision(rich_bundle):
    b = load_bundle(rich_bundle)
    choice = choose_engine(b, "auto", "fp32", probe=lambda: GPU_AS_BUILT)  # stand-in GPU probe
    assert (choice.kind, choice.model.name) == ("onnxruntime", "model.onnx")
    assert "no fp32 TensorRT engine" in choice.reason
    choice = choose_engine(b, "auto", "fp16", probe=lambda: NO_GPU)
    assert (choice.kind, choice.model.name) == ("onnxruntime", "model.fp16.onnx")


def test_explicit_tensorrt_errors_name_the_fix(rich_bundle, tiny_bundle):
    b = load_bundle(rich_bundle)
    with pytest.raises(TensorRTUnavailable, match=r"--engine tensorrt: no NVIDIA GPU found.*--engine onnxruntime"):
        choose_engine(b, "tensorrt", probe=lambda: NO_GPU)
    with pytest.raises(BundleError, match=r"rebuild it on this box with `linegate export tensorrt BUNDLE --precision fp16`"):
        choose_engine(b, "tensorrt", probe=lambda: OTHER_GPU)  # stand-in probe: another GPU
    with pytest.raises(BundleError, match=r"no int8 TensorRT engine .*linegate export tensorrt"):
        choose_engine(b, "tensorrt", "int8", probe=lambda: GPU_AS_BUILT)
    with pytest.raises(BundleError, match=r"no int8 ONNX model .*linegate export quantize"):
        choose_engine(b, "onnxruntime", "int8")
    with pytest.raises(ValueError, match="choose from auto, onnxruntime, tensorrt"):
        choose_engine(b, "openvino")


def test_check_facts_names_both_sides():
    model = ModelFile("model.int8.engine", "tensorrt", "int8", {"tensorrt": ENGINE_FACTS})
    check_facts(model, GPU_AS_BUILT)  # same TensorRT, same GPU: fine
    with pytest.raises(BundleError) as err:
        check_facts(model, OTHER_GPU)
    text = str(err.value)
    assert "TensorRT 10.3.0 (this box runs 11.4.0)" in text and "Orin with compute capability 8.7" in text
    assert "--precision int8" in text


def test_real_probe_and_open_engine_on_this_box(rich_bundle, caplog):
    status = probe()
    if status.usable:
        pytest.skip(f"this box has a GPU ({status.reason}); the no-GPU path is what this test checks")
    assert "--engine onnxruntime" in status.reason
    with caplog.at_level(logging.INFO, logger="edge.engine"):
        engine = open_engine(load_bundle(rich_bundle), "auto", threads=1)
    assert isinstance(engine, OnnxRuntimeEngine) and engine.precision == "fp32"
    assert any("using ONNX Runtime" in r.getMessage() and "model.onnx" in r.getMessage() for r in caplog.records)
    engine = open_engine(load_bundle(rich_bundle), "onnxruntime", "fp16")
    assert engine.precision == "fp16" and engine.model_path.name == "model.fp16.onnx"


def _cpu_ms_after_calls(engine, batch) -> float:
    """Median CPU time the whole process used in the 100 ms after each of 5 engine calls."""
    import time

    import numpy as np

    engine.infer(batch)
    used = []
    for _ in range(5):
        engine.infer(batch)
        started = time.process_time()
        time.sleep(0.1)
        used.append((time.process_time() - started) * 1000)
    return float(np.median(used))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: ONNX Runtime starts no worker thread to spin")
def test_onnx_runtime_workers_stop_spinning_when_a_call_returns(tiny_bundle):
    """Between calls the pipeline's own threads need the cores, so ONNX Runtime's workers stop
    spinning when a call returns; `spin_between_calls` keeps ONNX Runtime's default, where a
    worker goes on burning a core after every call (about half of the next 100 ms here)."""
    import numpy as np

    bundle = load_bundle(tiny_bundle)
    h, w = bundle.input_size
    batch = np.zeros((8, 3, h, w), np.float32)
    assert _cpu_ms_after_calls(OnnxRuntimeEngine.from_bundle(bundle), batch) < 10
    spinning = open_engine(bundle, "onnxruntime", spin_between_calls=True)  # the config key's way in
    assert _cpu_ms_after_calls(spinning, batch) > 10


def test_linegate_run_engine_tensorrt_without_gpu(rich_bundle, tmp_path):
    if probe().usable:
        pytest.skip("this box has a GPU")
    proc = subprocess.run(linegate_cmd("run", "--bundle", str(rich_bundle), "--source", "synthetic:count=2",
                                       "--engine", "tensorrt", "--publish", "tcp://127.0.0.1:0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--engine tensorrt" in proc.stderr and "--engine onnxruntime" in proc.stderr
