"""Reduced-precision ONNX variants: made from the bundle, validated on the run's real
calibration images against FP32, recorded in the manifest; refused when they drift."""
import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from conftest import linegate_cmd
from onnx import TensorProto

from edge.bundle import load_bundle, sha256_file
from edge.decision import DecisionRule
from edge.engine import OnnxRuntimeEngine, open_engine
from export.precision import (PrecisionError, Tolerance, add_variants, convert_fp16, deviation, first_tap_nodes,
                              head_nodes, image_scores)
from training.data import Split, load_images


def _io_types(model: onnx.ModelProto) -> set[int]:
    return {v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}


def _copy_bundle(run, tmp_path):
    """A copy of the session's pillQC bundle that a test may add variants to."""
    dst = tmp_path / "bundle"
    shutil.copytree(run / "bundle", dst)
    return dst


def _calibration(run, bundle):
    split = Split.from_json(json.loads((run / "split.json").read_text()))
    images = load_images(split.calibration, bundle.input_size)
    return images, np.array([c != bundle.manifest["classes"]["normal"] for c in images.classes])


def test_fp16_conversion_of_a_small_graph(tiny_bundle):
    """The pass on the hand-built graph: FP16 inside, FP32 at the boundary, same outputs."""
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    converted = convert_fp16(model, keep_fp32=set())
    assert _io_types(converted) == {TensorProto.FLOAT}
    halves = [n for n in converted.graph.node if any(o.endswith("__h") for o in n.output)]
    assert {n.op_type for n in halves} == {"Div", "AveragePool"}  # ReduceMean is not an FP16 op: stays FP32
    x = (np.random.default_rng(0).random((3, 3, 32, 32)) * 255).astype(np.float32)
    ref = OnnxRuntimeEngine(tiny_bundle / "model.onnx", "pixels", "score", "anomaly_map").infer(x)
    path = tiny_bundle / "half.onnx"
    onnx.save(converted, str(path))
    got = OnnxRuntimeEngine(path, "pixels", "score", "anomaly_map").infer(x)
    np.testing.assert_allclose(got[1], ref[1], rtol=2e-3)
    assert got[0].dtype == np.float32


def test_first_tap_is_the_earliest_conv_feature_not_a_constant():
    """INT8 keeps FP32 the nodes computing the head's earliest feature tap. A node that computes a
    constant (PatchCore's lifted bank, -2 x the stored bank) also feeds the head, with fewer
    ancestors; it is not a feature tap."""
    from onnx import helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 1, 1], [0.1] * 12)
    nodes = [
        helper.make_node("Conv", ["pixels", "w"], ["early"], name="conv_early"),
        helper.make_node("Relu", ["early"], ["early_r"], name="relu_early"),
        helper.make_node("Conv", ["early_r", "w2"], ["late"], name="conv_late"),
        helper.make_node("Concat", ["early_r", "late"], ["feats"], axis=1, name="concat"),
        helper.make_node("Flatten", ["feats"], ["flat"], name="flatten"),
        helper.make_node("Constant", [], ["bank"], name="bank_const",
                         value=helper.make_tensor("b", TensorProto.FLOAT, [8 * 16, 2], [0.5] * 256)),
        helper.make_node("Shape", ["pixels"], ["shape"], name="shape"),
        helper.make_node("MatMul", ["flat", "bank"], ["dist"], name="matmul"),
        helper.make_node("Reshape", ["dist", "shape2"], ["out"], name="reshape"),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Concat", ["batch_1d", "two"], ["shape2"], axis=0, name="concat_shape"),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch_1d"], name="unsqueeze"),
    ]
    graph = helper.make_graph(
        nodes, "taps", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [None, 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w, helper.make_tensor("w2", TensorProto.FLOAT, [4, 4, 1, 1], [0.1] * 16),
         helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("two", TensorProto.INT64, [1], [2]),
         helper.make_tensor("axes0", TensorProto.INT64, [1], [0])])
    model = helper.make_model(graph)
    head = head_nodes(model)
    assert {"matmul", "reshape", "concat", "flatten", "shape"} <= head and "bank_const" not in head
    # head inputs from outside it: the bank constant (1 ancestor), relu_early (2), late (3)
    assert first_tap_nodes(model, head) == {"conv_early", "relu_early"}


def test_variants_need_the_runs_calibration_images(tiny_bundle):
    with pytest.raises(FileNotFoundError, match="pass the training run with --run RUN"):
        add_variants(tiny_bundle, ["fp16"])
    proc = subprocess.run(linegate_cmd("export", "quantize", str(tiny_bundle), "--precision", "fp16"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--run RUN" in proc.stderr
    proc = subprocess.run(linegate_cmd("export", "quantize", str(tiny_bundle), "--precision", "fp8"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "a comma list of fp32, fp16, int8" in proc.stderr


@pytest.mark.pillqc
def test_fp16_variant_on_real_images(pillqc_run, tmp_path):
    bundle_dir = _copy_bundle(pillqc_run, tmp_path)
    written = add_variants(bundle_dir, ["fp16"], run_dir=pillqc_run)
    bundle = load_bundle(bundle_dir)  # checksums of every file, new entries validated
    entry = bundle.manifest["files"]["model.fp16.onnx"]
    assert written["fp16"] == entry and entry["precision"] == "fp16" and entry["kind"] == "onnx"
    assert entry["sha256"] == sha256_file(bundle_dir / "model.fp16.onnx")
    dev = entry["deviation"]
    assert dev["set"] == "calibration" and dev["images"] == 60
    assert dev["decision_flips"] <= 1 and dev["auroc_fp32"] - dev["auroc"] <= 0.005
    assert dev["max_rel_score_error"] < 1e-2

    model = onnx.load(str(bundle_dir / "model.fp16.onnx"))
    assert _io_types(model) == {TensorProto.FLOAT}  # FP32 at the graph boundary
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert TensorProto.FLOAT16 in weights.values()  # the backbone's weights are FP16
    head_weights = [i for n in model.graph.node if n.op_type == "MatMul" for i in n.input if i in weights]
    assert head_weights and all(weights[i] == TensorProto.FLOAT for i in head_weights)  # the head stays FP32
    assert entry["fp32_nodes"] == len(head_nodes(onnx.load(str(bundle_dir / "model.onnx"))))

    # the recorded deviation is what the runtime's own engines measure
    images, anomalous = _calibration(pillqc_run, bundle)
    rule = DecisionRule.from_bundle(bundle)
    fp32 = image_scores(open_engine(bundle, "onnxruntime", "fp32").infer, rule, images.tensors)
    fp16 = image_scores(open_engine(bundle, "onnxruntime", "fp16").infer, rule, images.tensors)
    again = deviation(fp32, fp16, anomalous, rule.threshold)
    assert again["decision_flips"] == dev["decision_flips"] and again["auroc"] == pytest.approx(dev["auroc"])
    assert again["max_abs_score_error"] == pytest.approx(dev["max_abs_score_error"], rel=1e-3, abs=1e-4)


@pytest.mark.pillqc
def test_int8_variant_is_qdq_measured_and_gated(pillqc_run, tmp_path):
    bundle_dir = _copy_bundle(pillqc_run, tmp_path)
    # a strict gate (no deviation at all allowed): refused, and nothing reaches the bundle
    before = (bundle_dir / "manifest.json").read_text()
    with pytest.raises(PrecisionError, match=r"int8 variant refused: .*Nothing was written"):
        add_variants(bundle_dir, ["int8"], run_dir=pillqc_run, tolerance=Tolerance(max_flips=-1))
    assert (bundle_dir / "manifest.json").read_text() == before
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["manifest.json", "model.onnx"]

    # a gate wide open: written with its measured deviation
    add_variants(bundle_dir, ["int8"], run_dir=pillqc_run, tolerance=Tolerance(max_flips=60, max_auroc_drop=1.0))
    bundle = load_bundle(bundle_dir)
    entry = bundle.manifest["files"]["model.int8.onnx"]
    assert entry["precision"] == "int8" and entry["tolerance"]["max_flips"] == 60
    model = onnx.load(str(bundle_dir / "model.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and _io_types(model) == {TensorProto.FLOAT}
    # what TensorRT takes: signed 8-bit Q/DQ, symmetric (zero point 0), float biases
    zero_points = [t for t in model.graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points and all(t.data_type == TensorProto.INT8 for t in zero_points)
    assert all(not np.any(onnx.numpy_helper.to_array(t)) for t in zero_points)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(producers.get(i) != "DequantizeLinear" for n in matmuls for i in n.input)  # head: FP32
    # the scores are mapped back onto the FP32 scale by a correction fitted on calibration images
    correction = entry["score_correction"]
    assert correction["fitted_on"] == "calibration images" and correction["images"] == 60
    assert producers["score"] == "Div" and producers["anomaly_map"] == "Div"

    # the same file runs on ONNX Runtime CPU; the recorded figures are what it scores
    images, anomalous = _calibration(pillqc_run, bundle)
    rule = DecisionRule.from_bundle(bundle)
    fp32 = image_scores(open_engine(bundle, "onnxruntime").infer, rule, images.tensors)
    int8 = image_scores(open_engine(bundle, "onnxruntime", "int8").infer, rule, images.tensors)
    again = deviation(fp32, int8, anomalous, rule.threshold)
    dev = entry["deviation"]
    assert again["decision_flips"] == dev["decision_flips"] and again["auroc"] == pytest.approx(dev["auroc"])
    assert dev["max_abs_score_error"] > 0  # it is a different computation, and the record says by how much


def test_a_convolutional_head_stays_fp32_too(small_runs, tmp_path):
    """FCDD's head has no MatMul: 1x1 convolutions, then sqrt(x^2 + 1) - 1. The exporter's
    module scopes mark it, so FP16 and INT8 keep it FP32 like PaDiM's (the square leaves
    FP16's range; in INT8 the corrected scores went below zero, 191% off on pillQC)."""
    run = small_runs("fcdd")
    model = onnx.load(str(run / "bundle" / "model.onnx"))
    head = head_nodes(model)
    scope = {n.name: [p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"] for n in model.graph.node}
    head_convs = {n.name for n in model.graph.node if n.op_type == "Conv" and "'head'" in str(scope[n.name])}
    backbone = {n.name for n in model.graph.node if "'backbone" in str(scope[n.name])}
    assert len(head_convs) == 3 and head_convs <= head
    assert {n.name for n in model.graph.node if n.op_type in ("Sqrt", "ReduceMean")} <= head
    assert backbone and not head & backbone

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(run / "bundle", bundle_dir)
    wide_open = Tolerance(max_flips=100, max_auroc_drop=1.0)  # the gate is not under test here
    add_variants(bundle_dir, ["fp16"], run_dir=run, tolerance=wide_open)
    fp16 = onnx.load(str(bundle_dir / "model.fp16.onnx"))
    weights = {t.name: t.data_type for t in fp16.graph.initializer}
    head_weights = [n.input[1] for n in fp16.graph.node if n.name in head_convs]
    assert all(weights[w] == TensorProto.FLOAT for w in head_weights)
    assert TensorProto.FLOAT16 in weights.values()  # the backbone did go to FP16
