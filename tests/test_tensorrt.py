"""TensorRT: building engines from the bundle's ONNX models and running them with pycuda.

Tests marked `gpu` build and run real engines; they skip, with the reason, where there is no
NVIDIA GPU with TensorRT and pycuda (as on the CPU machines the suite usually runs on). The
other tests check what such a machine says and does: it stops at once and names the ONNX
Runtime engine.
"""
import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from conftest import linegate_cmd, make_tiny_bundle
from onnx import TensorProto, helper

from edge.bundle import ModelFile, load_bundle, write_manifest
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.engine_tensorrt import PinnedIO, TensorRTEngine, TensorRTUnavailable, probe, require_pycuda
from export.precision import Tolerance, add_variants, image_scores, onnx_infer
from export.tensorrt_build import TensorRTBuildError, build_engine, parser_errors
from training.data import Split, load_images

STATUS = probe()
needs_gpu = pytest.mark.skipif(not STATUS.usable, reason=f"needs an NVIDIA GPU with TensorRT and pycuda: "
                                                         f"{STATUS.reason}")


def _pycuda_reason() -> str | None:
    try:
        require_pycuda()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


PYCUDA_MISSING = _pycuda_reason()
no_gpu_only = pytest.mark.skipif(STATUS.usable, reason=f"this box has a GPU ({STATUS.reason})")


@no_gpu_only
def test_export_tensorrt_without_gpu_stops_at_once(tiny_bundle):
    before = sorted(p.name for p in tiny_bundle.iterdir())
    with pytest.raises(TensorRTUnavailable, match=r"cannot build a TensorRT engine here: .*--engine onnxruntime"):
        build_engine(tiny_bundle, "fp32")
    assert sorted(p.name for p in tiny_bundle.iterdir()) == before
    proc = subprocess.run(linegate_cmd("export", "tensorrt", str(tiny_bundle), "--precision", "fp16"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "TensorRT" in proc.stderr and "--engine onnxruntime" in proc.stderr and "Traceback" not in proc.stderr


@no_gpu_only
def test_tensorrt_engine_without_gpu_names_the_fallback(tiny_bundle):
    model = ModelFile("model.fp16.engine", "tensorrt", "fp16",
                      {"tensorrt": {"version": "11.4.0", "gpu": "x", "compute_capability": "9.0",
                                    "batch_profile": {"min": 1, "opt": 8, "max": 8}}})
    with pytest.raises(TensorRTUnavailable, match="--engine onnxruntime"):
        TensorRTEngine(tiny_bundle / "model.onnx", model, "pixels", "score", "anomaly_map")


def test_parser_errors_name_the_node():
    # stand-ins for TensorRT's OnnxParser / ParserError (TensorRT is absent here): the accessors
    # are those of the TensorRT 10/11 Python API (node_name, node_operator, node, desc, code)
    class Err:
        def __init__(self, name, op, index, desc):
            self.values = (name, op, index, desc)

        def node_name(self):
            return self.values[0]

        def node_operator(self):
            return self.values[1]

        def node(self):
            return self.values[2]

        def desc(self):
            return self.values[3]

        def code(self):
            return "ErrorCode.UNSUPPORTED_NODE"

    class Parser:
        errors = [Err("node_whiten", "NoSuchOp", 7, "no importer for op NoSuchOp"), Err("", "", -1, "bad graph")]
        num_errors = 2

        def get_error(self, i):
            return self.errors[i]

    text = parser_errors(Parser())
    assert text == ("node 'node_whiten', operator 'NoSuchOp': no importer for op NoSuchOp "
                    "(ErrorCode.UNSUPPORTED_NODE); graph: bad graph (ErrorCode.UNSUPPORTED_NODE)")


# ---------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(PYCUDA_MISSING is not None, reason=f"needs an NVIDIA GPU with pycuda: {PYCUDA_MISSING}")
def test_pinned_io_round_trip_on_the_gpu():
    """The engine's pycuda half, without TensorRT: page-locked and device buffers for the max
    batch, partial batches up and down on one stream. A device-to-device copy on the same
    stream stands where execute_async_v3 runs in the engine."""
    cuda = require_pycuda()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        io = PinnedIO(cuda, {"pixels": ((3, 8, 8), np.dtype(np.float32)),
                             "map": ((2, 8), np.dtype(np.float32))}, max_batch=4)
        assert io.host["pixels"].shape == (4, 3, 8, 8) and io.host["map"].shape == (4, 2, 8)
        rng = np.random.default_rng(0)
        previous = None
        for n in (4, 1, 3):  # a full batch, then partial ones through the same buffers
            x = rng.random((n, 3, 8, 8), dtype=np.float32)
            io.upload("pixels", x)
            cuda.memcpy_dtod_async(io.device["map"], io.device["pixels"], n * 2 * 8 * 4, io.stream)
            back, head = io.download(["pixels", "map"], n)
            np.testing.assert_array_equal(back, x)
            np.testing.assert_array_equal(head, x.reshape(-1)[:n * 16].reshape(n, 2, 8))
            assert not np.shares_memory(back, io.host["pixels"])  # results outlive the next batch
            if previous is not None:
                np.testing.assert_array_equal(previous[1], previous[0])
            previous = (back, x)
        io.free()
        assert io.device == {}
    finally:
        ctx.pop()
        ctx.detach()


def _images(run, bundle):
    split = Split.from_json(json.loads((run / "split.json").read_text()))
    return load_images(split.calibration + split.test, bundle.input_size)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.pillqc
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_matches_onnx_runtime_on_real_images(pillqc_run, tmp_path, precision):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(pillqc_run / "bundle", bundle_dir)
    if precision != "fp32":  # INT8's drift from FP32 is gated at quantize time; here: engine vs its own file
        add_variants(bundle_dir, [precision], run_dir=pillqc_run, tolerance=Tolerance(60, 1.0))
    cache = tmp_path / "timing.cache"
    build_engine(bundle_dir, precision, max_batch=8, opt_batch=4, timing_cache=cache, run_dir=pillqc_run,
                 tolerance=Tolerance(60, 1.0))
    bundle = load_bundle(bundle_dir)
    facts = bundle.manifest["files"][f"model.{precision}.engine"]
    trt_facts = facts["tensorrt"]
    assert (trt_facts["version"], trt_facts["gpu"], trt_facts["compute_capability"]) == \
        (STATUS.tensorrt, STATUS.gpu, STATUS.compute_capability)
    assert trt_facts["batch_profile"] == {"min": 1, "opt": 4, "max": 8} and trt_facts["strongly_typed"]
    assert facts["precision"] == precision and cache.stat().st_size > 0

    engine = open_engine(bundle, "tensorrt", precision)
    assert isinstance(engine, TensorRTEngine)
    images = _images(pillqc_run, bundle)
    rule = DecisionRule.from_bundle(bundle)
    got = image_scores(engine.infer, rule, images.tensors)
    if precision == "int8":  # the same Q/DQ file on ONNX Runtime
        ref = image_scores(onnx_infer(bundle.file("model.int8.onnx"), bundle), rule, images.tensors)
        same = np.mean((got >= rule.threshold) == (ref >= rule.threshold))
        assert same >= 0.99, f"INT8 engine and ONNX Runtime agree on {same:.1%} of {len(got)} images"
    else:  # against the ONNX file it was built from (the FP16 file's own drift from FP32 was gated apart)
        source = "model.onnx" if precision == "fp32" else f"model.{precision}.onnx"
        ref = image_scores(onnx_infer(bundle.file(source), bundle), rule, images.tensors)
        rel = np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12))
        assert rel <= {"fp32": 1e-3, "fp16": 1e-2}[precision], f"max relative score error {rel:.2e}"
    # batches above the profile's max run in chunks, with the same results
    big = engine.infer(images.tensors[:11])
    np.testing.assert_allclose(big[0], np.concatenate([engine.infer(images.tensors[i:i + 1])[0] for i in range(11)]),
                               rtol=1e-3 if precision == "fp32" else 1e-2)
    assert big[1].shape == (11, *bundle.manifest["outputs"]["map"]["shape"][1:])


@needs_gpu
@pytest.mark.gpu
@pytest.mark.pillqc
def test_auto_runs_the_engine_where_it_fits(pillqc_run, tmp_path):
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(pillqc_run / "bundle", bundle_dir)
    build_engine(bundle_dir, "fp32", max_batch=4, timing_cache=tmp_path / "cache", run_dir=pillqc_run)
    assert isinstance(open_engine(load_bundle(bundle_dir), "auto"), TensorRTEngine)


@needs_gpu
@pytest.mark.gpu
def test_parser_error_names_the_node_on_a_real_parser(tmp_path):
    bundle_dir = make_tiny_bundle(tmp_path / "bundle")
    model = onnx.load(str(bundle_dir / "model.onnx"))
    model.graph.node.insert(0, helper.make_node("NoSuchOp", ["pixels"], ["odd"], name="the_odd_node",
                                                domain="linegate.test"))
    model.graph.output.append(helper.make_tensor_value_info("odd", TensorProto.FLOAT, None))
    model.opset_import.append(helper.make_opsetid("linegate.test", 1))
    onnx.save(model, str(bundle_dir / "model.onnx"))
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    write_manifest(bundle_dir, manifest)
    with pytest.raises(TensorRTBuildError, match="the_odd_node"):
        build_engine(bundle_dir, "fp32", timing_cache=tmp_path / "cache", validate=False)
