"""Reduced-precision variants of a bundle's ONNX model: FP16 and INT8 (Q/DQ).

Precision lives in the ONNX graph, not in builder flags: TensorRT 11 removed weak typing
(`BuilderFlag.FP16/INT8`, the INT8 calibrators) and builds every network strongly typed,
so a TensorRT engine runs each layer in the type the graph gives it. The same files run on
ONNX Runtime, so one variant serves the CPU runtime and the TensorRT build alike.

- FP16 (`model.fp16.onnx`): the backbone in FP16 with FP32 at the graph boundary (inputs and
  outputs stay FP32, Casts inside). The detector head (head_nodes: everything after the
  backbone) stays FP32: squared Mahalanobis distances, and FCDD's squared features, exceed
  FP16's range (65504), and the whitening amplifies any rounding of (x - mean) by up to
  1/sqrt(0.01) = 10 (the covariance regulariser).
- INT8 (`model.int8.onnx`): explicit QuantizeLinear/DequantizeLinear nodes from ONNX
  Runtime's static quantization in QDQ format, calibrated on the run's calibration images
  (never test images). Symmetric INT8 activations and weights (zero point 0): the only
  quantization TensorRT takes. Weights per output channel with 7-bit range (reduce_range):
  ONNX Runtime's x86 kernels without VNNI multiply u8 x s8 pairs into int16 with saturation,
  which on this model wrecked the features (measured: 83% RMS error at the first tap with full
  8-bit weights, 12% with 7-bit). Biases stay float. The distance head stays FP32 here too, so
  do the layers up to the first feature tap (first_tap_nodes), and
  an affine correction fitted on the calibration images maps the scores back onto the FP32
  scale (quantization noise adds a near-constant amount to every distance), so the bundle's
  threshold applies to this file unchanged.

Every variant is validated on real images against the FP32 model before it enters the
bundle: its image scores (the calibrated aggregate), AUROC and accuracy on the calibration
set, and the decisions it changes at the bundle's threshold. A variant outside the tolerance
is refused and nothing is written; the measured deviation is recorded in manifest.json for
the ones that pass.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.bundle import Bundle, load_bundle, write_manifest
from edge.decision import DecisionRule
from edge.engine import OnnxRuntimeEngine
from export.scopes import in_backbone
from training.calibrate import binary_metrics
from training.data import LoadedImages, Split, load_images

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

# The distance head starts at the whitening product; it and everything after it stays FP32.
HEAD_START_OPS = {"MatMul", "Gemm", "Einsum"}
# Data movement and elementwise ops that feed the head (channel gather, reshape, x - mean):
# walking back through these from the head start collects the rest of the head.
HEAD_FEED_OPS = {"Gather", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Sub",
                 "Concat", "Resize", "Shape", "Slice", "Expand", "Identity"}
# Ops run in FP16 in the FP16 variant (a conv net's own); anything else stays FP32.
FP16_OPS = {"Conv", "Clip", "Relu", "Add", "Sub", "Mul", "Div", "Concat", "Resize", "Pad",
            "MaxPool", "AveragePool", "GlobalAveragePool", "Reshape", "Transpose", "Flatten",
            "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization", "Identity"}
# (op, input index) that keep their own float32 type even inside the FP16 region.
FP32_INPUTS = {("Resize", 1), ("Resize", 2)}
# Ops quantized to INT8 (the backbone's compute); the head is excluded by name.
INT8_OPS = ["Conv", "Clip", "Relu", "Add"]


class PrecisionError(RuntimeError):
    """A variant that cannot be made or that fails validation; the message says why."""


@dataclass
class Tolerance:
    """How far a variant may drift from FP32 on the calibration set and still ship."""

    max_flips: int = 1  # calibration decisions that differ from FP32's
    max_auroc_drop: float = 0.005


# ---------------------------------------------------------------- graph analysis

def head_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that form the detector head (kept FP32 in every variant); unnamed
    nodes of `model` are named first.

    The head is every node downstream of a MatMul/Gemm/Einsum, and every node downstream of
    the backbone that the exporter recorded outside the backbone module (a head made of
    convolutions and elementwise maths has no MatMul: FCDD's 1x1 convolutions and its
    pseudo-Huber map sqrt(x^2 + 1) - 1, whose square leaves FP16's range and whose INT8
    version put scores below zero). Plus the data-movement and elementwise nodes that feed
    it (channel selection, reshapes, x - mean). For PaDiM that is the upsampling and
    concatenation of the taps, the channel gather, the whitening MatMul and the distance,
    mean and score.
    """
    _unique_node_names(model)
    nodes = list(model.graph.node)
    producer = {out: n for n in nodes for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    backbone = {n.name for n in nodes if in_backbone(n)}
    after_backbone = [c for n in nodes if n.name in backbone for out in n.output
                      for c in consumers.get(out, []) if c.name not in backbone]
    head: dict[str, onnx.NodeProto] = {}
    stack = [n for n in nodes if n.op_type in HEAD_START_OPS] + after_backbone
    while stack:  # forward: everything after the head start
        n = stack.pop()
        if n.name in head:
            continue
        head[n.name] = n
        stack.extend(c for out in n.output for c in consumers.get(out, []))
    stack = [n for n in head.values()]
    seen = set(head)
    while stack:  # backward through data movement into the head
        n = stack.pop()
        for name in n.input:
            p = producer.get(name)
            if p is not None and p.name not in seen and p.op_type in HEAD_FEED_OPS:
                seen.add(p.name)
                head[p.name] = p
                stack.append(p)
    return set(head)


def first_tap_nodes(model: onnx.ModelProto, head: set[str]) -> set[str]:
    """The nodes that compute the earliest feature tap: everything upstream of the head input
    with the fewest ancestors (PaDiM: the stem and the stride-4 stage). INT8 leaves them FP32:
    the head reads that tap directly at the finest resolution, and noise quantization adds
    there reaches every later tap too (measured on pillQC, calibration set: 2 decisions
    changed with them in INT8, 1 with them in FP32; the INT8-vs-FP32 score residual 1.7 -> 0.4).
    """
    producer = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name for t in model.graph.initializer}
    taps = {i for n in model.graph.node if n.name in head for i in n.input
            if i in producer and producer[i].name not in head and i not in inits}
    best: set[str] | None = None
    for tap in taps:
        seen: set[str] = set()
        computed = False
        stack = [producer[tap]]
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            computed = computed or n.op_type == "Conv"
            stack.extend(producer[i] for i in n.input if i in producer)
        # a feature tap comes out of the backbone's convolutions; a node that computes a constant
        # (PatchCore's lifted bank, -2 x the stored bank) is not one, however few its ancestors
        if computed and (best is None or len(seen) < len(best)):
            best = seen
    return best or set()


def _unique_node_names(model: onnx.ModelProto) -> None:
    """Name every node uniquely (some exporters leave names empty); names key the head set."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            out.add(vi.name)
    return out


def convert_fp16(model: onnx.ModelProto, keep_fp32: set[str]) -> onnx.ModelProto:
    """FP16 copy of `model`: nodes of FP16_OPS outside `keep_fp32` compute in FP16, graph
    inputs and outputs stay FP32, and a Cast sits on every edge between the two regions.

    (ModelOpt AutoCast does this for TensorRT 11's strong typing; this pass is small, has no
    dependency beyond onnx, and is validated against FP32 on real images like any variant.)
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    _unique_node_names(model)  # unnamed nodes get names (head_nodes() names them the same way)
    g = model.graph
    floats = _float_tensors(model)
    fp16_nodes = {n.name for n in g.node if n.op_type in FP16_OPS and n.name not in keep_fp32}
    producer = {out: n for n in g.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}

    def is_fp16_input(node: onnx.NodeProto, index: int) -> bool:
        return node.name in fp16_nodes and (node.op_type, index) not in FP32_INPUTS

    new_inits: list[TensorProto] = []
    casts: list[onnx.NodeProto] = []
    to_fp16: dict[str, str] = {}

    def fp16_name(tensor: str) -> str:
        """The FP16 version of an FP32 tensor, made once: an initializer copy or a Cast."""
        if tensor not in to_fp16:
            name = f"{tensor}__fp16"
            if tensor in inits:
                new_inits.append(numpy_helper.from_array(
                    numpy_helper.to_array(inits[tensor]).astype(np.float16), name))
            else:
                casts.append(helper.make_node("Cast", [tensor], [name], name=f"{name}_cast",
                                              to=TensorProto.FLOAT16))
            to_fp16[tensor] = name
        return to_fp16[tensor]

    # FP16 nodes read FP16: inputs made outside the FP16 region get an FP16 version.
    for n in g.node:
        for i, name in enumerate(n.input):
            if name and name in floats and is_fp16_input(n, i):
                p = producer.get(name)
                if p is None or p.name not in fp16_nodes:
                    n.input[i] = fp16_name(name)
    # FP16 nodes' float outputs: renamed to X__h; FP16 readers take X__h, every FP32 reader
    # and the graph output get X back through a Cast to FP32.
    for n in g.node:
        if n.name not in fp16_nodes:
            continue
        for j, name in enumerate(n.output):
            if name not in floats:
                continue
            half = f"{name}__h"
            n.output[j] = half
            needs_fp32 = name in graph_outputs
            for c in consumers.get(name, []):
                for i, inp in enumerate(c.input):
                    if inp == name:
                        if is_fp16_input(c, i):
                            c.input[i] = half
                        else:
                            needs_fp32 = True
            if needs_fp32:
                casts.append(helper.make_node("Cast", [half], [name], name=f"{name}_to_fp32",
                                              to=TensorProto.FLOAT))
    # Initializers that no node reads any more (all readers now take the FP16 copy) go.
    g.initializer.extend(new_inits)
    g.node.extend(casts)
    used = {name for n in g.node for name in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    _toposort(g)
    del g.value_info[:]
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _toposort(g: onnx.GraphProto) -> None:
    available = {t.name for t in g.initializer} | {i.name for i in g.input} | {""}
    pending, ordered = list(g.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise PrecisionError("FP16 conversion left a cycle or a dangling input in the graph")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    del g.node[:]
    g.node.extend(ordered)


# ---------------------------------------------------------------- making variants

def make_fp16(src: Path, dst: Path) -> dict:
    model = onnx.load(str(src))
    head = head_nodes(model)
    converted = convert_fp16(model, head)
    onnx.save(converted, str(dst))
    fp16 = sum(1 for n in converted.graph.node
               if any(o.endswith("__h") for o in n.output))
    return {"fp32_nodes": sorted(head), "fp16_nodes": fp16,
            "fp32_reason": "detector head (every node after the backbone): squared distances and "
                           "squared features exceed the FP16 range, and PaDiM's whitening amplifies "
                           "rounding of (x - mean)"}


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over calibration images."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 4):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.i = 0

            def get_next(self):
                if self.i >= len(images):
                    return None
                chunk = images[self.i:self.i + batch]
                self.i += batch
                return {input_name: chunk}

            def rewind(self):
                self.i = 0

        self.reader = Reader()


def make_int8(src: Path, dst: Path, calibration: np.ndarray, input_name: str, activations: str = "s8",
              outputs: tuple[str, str] = ("score", "anomaly_map"), correct: bool = True,
              extra_fp32: tuple[str, ...] = ()) -> dict:
    """Static QDQ INT8 calibrated on `calibration` images (N, 3, H, W), head kept FP32.

    activations "s8" (symmetric, what TensorRT takes: the bundle's variant) or "u8"
    (asymmetric uint8: ONNX Runtime's fast x86 path, not TensorRT-compatible; for benchmarks).
    correct: quantization noise in the features adds a near-constant amount to every
    Mahalanobis distance (measured on pillQC: INT8 score = 0.91 x FP32 + 22, correlation
    0.997), which moves scores across the calibrated threshold. The affine map back onto the
    FP32 scale is fitted on the calibration images and appended to the graph's outputs, so the
    bundle's threshold, normalisation and display range hold for this file as they are.
    """
    if activations not in ("s8", "u8"):
        raise ValueError(f"activations {activations!r}: s8 or u8")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(calibration) == 0:
        raise PrecisionError("INT8 needs calibration images; the run's calibration set is empty")
    model = onnx.load(str(src))
    head = head_nodes(model)
    early = first_tap_nodes(model, head)
    named = dst.with_name(dst.name + ".named.onnx")
    onnx.save(model, str(named))
    root = logging.getLogger()  # quantize_static warns through the root logger about pre-processing
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(str(named), str(dst), _Batches(input_name, calibration).reader,
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=INT8_OPS,
                        nodes_to_exclude=sorted(head | early | set(extra_fp32)), per_channel=True,
                        reduce_range=True,
                        activation_type=QuantType.QInt8 if activations == "s8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": activations == "s8", "WeightSymmetric": True,
                                       # biases stay float: TensorRT takes Q/DQ of 8-bit (and smaller)
                                       # types only, and folds a float bias into its INT8 kernels
                                       "QuantizeBias": False})
    finally:
        root.setLevel(level)
        named.unlink(missing_ok=True)
    facts: dict = {}
    if correct:
        facts["score_correction"] = _correct_scores(src, dst, calibration, input_name, outputs)
    q = onnx.load(str(dst), load_external_data=False)
    counts = {op: sum(1 for n in q.graph.node if n.op_type == op)
              for op in ("QuantizeLinear", "DequantizeLinear")}
    return {"fp32_nodes": sorted(head | early), "qdq_nodes": counts["QuantizeLinear"] + counts["DequantizeLinear"],
            "quantization": {"format": "QDQ", "activations": ("int8 symmetric" if activations == "s8"
                                                              else "uint8 asymmetric") + " per tensor",
                             "weights": "int8 symmetric per channel, 7-bit range (reduce_range)",
                             "biases": "float", "calibration": "minmax",
                             "calibration_images": int(len(calibration)), "ops": INT8_OPS},
            "fp32_reason": "detector head (every node after the backbone): int8 (x - mean) loses the "
                           "precision distances need; first feature tap (stem and stride-4 stage): its "
                           "quantization noise reaches every tap",
            **facts}


def _graph_scores(path: Path, input_name: str, score_name: str, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([score_name], {input_name: images[i:i + 8]})[0]
                           for i in range(0, len(images), 8)]).astype(np.float64)


def _correct_scores(src: Path, dst: Path, images: np.ndarray, input_name: str, outputs: tuple[str, str]) -> dict:
    """Fit variant = k * fp32 + c on the calibration images' graph scores and append
    (output - c) / k to the score and map outputs of `dst` (FP32 nodes, after the head)."""
    score_name, map_name = outputs
    reference = _graph_scores(src, input_name, score_name, images)
    raw = _graph_scores(dst, input_name, score_name, images)
    k, c = np.polyfit(reference, raw, 1)
    if not k > 0:
        raise PrecisionError(f"INT8 scores do not follow FP32's on the calibration images (fit slope {k:.3g}); "
                             "the quantized model is unusable")
    model = onnx.load(str(dst))
    g = model.graph
    for name in (score_name, map_name):
        raw_name = f"{name}__uncorrected"
        for n in g.node:
            n.output[:] = [raw_name if o == name else o for o in n.output]
            n.input[:] = [raw_name if i == name else i for i in n.input]
        g.initializer.extend([numpy_helper.from_array(np.array(c, np.float32), f"{name}__offset"),
                              numpy_helper.from_array(np.array(k, np.float32), f"{name}__scale")])
        g.node.extend([helper.make_node("Sub", [raw_name, f"{name}__offset"], [f"{name}__centred"],
                                        name=f"{name}_correction_sub"),
                       helper.make_node("Div", [f"{name}__centred", f"{name}__scale"], [name],
                                        name=f"{name}_correction_div")])
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    residual = raw - (k * reference + c)
    return {"fitted_on": "calibration images", "images": int(len(images)), "variant_vs_fp32_slope": float(k),
            "variant_vs_fp32_offset": float(c), "fit_residual_std": float(residual.std()),
            "applied": "(output - offset) / slope on score and map"}


# ---------------------------------------------------------------- validation

Infer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def image_scores(infer: Infer, rule: DecisionRule, tensors: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([rule.scores(*infer(tensors[i:i + batch])) for i in range(0, len(tensors), batch)])


def deviation(reference: np.ndarray, scores: np.ndarray, anomalous: np.ndarray, threshold: float) -> dict:
    """How `scores` differ from the FP32 `reference` on the same images: score error, AUROC
    and accuracy at the bundle's threshold (both models'), decisions changed."""
    ref_m = binary_metrics(reference, anomalous, threshold)
    var_m = binary_metrics(scores, anomalous, threshold)
    err = np.abs(scores.astype(np.float64) - reference)
    return {
        "images": int(len(scores)),
        "max_abs_score_error": float(err.max()) if len(err) else 0.0,
        "max_rel_score_error": float((err / np.maximum(np.abs(reference), 1e-12)).max()) if len(err) else 0.0,
        "auroc": var_m["auroc"], "auroc_fp32": ref_m["auroc"],
        "accuracy": var_m["accuracy"], "accuracy_fp32": ref_m["accuracy"],
        "decision_flips": int(np.sum((scores >= threshold) != (reference >= threshold))),
        "threshold": float(threshold),
    }


def summary(dev: dict) -> str:
    """One line for logs and the CLI."""
    def auroc(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    return (f"max score error {dev['max_abs_score_error']:.4g} ({dev['max_rel_score_error']:.2%}), "
            f"{dev['decision_flips']} of {dev['images']} calibration decisions changed, AUROC "
            f"{auroc(dev['auroc'])} (FP32 {auroc(dev['auroc_fp32'])})")


def check_tolerance(precision: str, dev: dict, tolerance: Tolerance) -> None:
    drop = (dev["auroc_fp32"] or 0.0) - (dev["auroc"] or 0.0)
    problems = []
    if dev["decision_flips"] > tolerance.max_flips:
        problems.append(f"{dev['decision_flips']} of {dev['images']} calibration decisions differ from "
                        f"FP32 (allowed {tolerance.max_flips})")
    if drop > tolerance.max_auroc_drop:
        problems.append(f"calibration AUROC drops by {drop:.4f} (allowed {tolerance.max_auroc_drop})")
    if problems:
        raise PrecisionError(f"{precision} variant refused: {'; '.join(problems)} [{summary(dev)}]. "
                             "Nothing was written; keep FP32, or accept the drift with --max-flips / "
                             "--max-auroc-drop")


# ---------------------------------------------------------------- bundle level

def find_run(bundle_dir: Path, run_dir: str | Path | None) -> Path:
    """The run whose calibration images validate the variants: given, or the bundle's parent."""
    run = Path(run_dir) if run_dir else bundle_dir.resolve().parent
    if not (run / "split.json").is_file():
        hint = "" if run_dir else f" (the bundle's parent {run} is not one)"
        raise FileNotFoundError(f"{run}: no split.json, so no calibration images to validate the variants "
                                f"against{hint}; pass the training run with --run RUN")
    return run


def calibration_images(bundle: Bundle, run_dir: Path) -> LoadedImages:
    split = Split.from_json(json.loads((run_dir / "split.json").read_text()))
    images = load_images(split.calibration, bundle.input_size, bundle.interpolation)
    if len(images.tensors) == 0:
        raise PrecisionError(f"{run_dir}: the run's calibration set has no readable images")
    return images


def onnx_infer(path: Path, bundle: Bundle) -> Infer:
    m = bundle.manifest
    engine = OnnxRuntimeEngine(path, m["input"]["name"], m["outputs"]["score"]["name"],
                               m["outputs"]["map"]["name"], providers=["CPUExecutionProvider"])
    return engine.infer


def add_variants(bundle_dir: str | Path, precisions: list[str], run_dir: str | Path | None = None,
                 tolerance: Tolerance | None = None) -> dict[str, dict]:
    """Make, validate and add each precision's ONNX variant to the bundle.

    Returns {precision: manifest entry} for the variants written. A refused variant does not
    stop the others: the accepted ones are written first, then PrecisionError names the rest.
    """
    bundle_dir = Path(bundle_dir)
    tolerance = tolerance or Tolerance()
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ValueError(f"--precision {','.join(unknown)}: choose from {', '.join(PRECISIONS)}")
    bundle = load_bundle(bundle_dir)
    wanted = [p for p in precisions if p != "fp32"]  # model.onnx is the FP32 model
    if not wanted:
        return {}
    run = find_run(bundle_dir, run_dir)
    images = calibration_images(bundle, run)
    anomalous = np.array([c != bundle.manifest["classes"]["normal"] for c in images.classes])
    rule = DecisionRule.from_bundle(bundle)
    fp32_path = bundle.file("model.onnx")
    reference = image_scores(onnx_infer(fp32_path, bundle), rule, images.tensors)

    written: dict[str, dict] = {}
    refused: list[str] = []
    for precision in wanted:
        name = VARIANT_FILES[precision]
        tmp = bundle_dir / f".{name}.tmp"
        try:
            log.info("%s: making %s from %s", precision, name, fp32_path.name)
            if precision == "fp16":
                facts = make_fp16(fp32_path, tmp)
            else:
                m = bundle.manifest["outputs"]
                facts = make_int8(fp32_path, tmp, images.tensors, bundle.input_name,
                                  outputs=(m["score"]["name"], m["map"]["name"]))
            scores = image_scores(onnx_infer(tmp, bundle), rule, images.tensors)
            dev = deviation(reference, scores, anomalous, rule.threshold)
            log.info("%s: %s", precision, summary(dev))
            check_tolerance(precision, dev, tolerance)
        except PrecisionError as exc:
            tmp.unlink(missing_ok=True)
            refused.append(str(exc))
            log.error("%s", exc)
            continue
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, bundle_dir / name)
        entry = {"kind": "onnx", "precision": precision, "source": "model.onnx",
                 "deviation": {"set": "calibration", **dev},
                 "tolerance": {"max_flips": tolerance.max_flips, "max_auroc_drop": tolerance.max_auroc_drop},
                 **facts}
        entry["fp32_nodes"] = len(facts["fp32_nodes"])  # the count; names are in the graph
        bundle.manifest["files"][name] = entry
        write_manifest(bundle_dir, bundle.manifest)  # one variant at a time: nothing accepted is lost
        written[precision] = bundle.manifest["files"][name]
        log.info("%s: %s written (sha256 %s)", precision, name, written[precision]["sha256"][:12])
    if refused:
        raise PrecisionError("; ".join(refused))
    return written

