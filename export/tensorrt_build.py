"""`linegate export tensorrt BUNDLE --precision fp32|fp16|int8`: a TensorRT engine for this GPU.

One build path for TensorRT 11 and 10.x (Jetson): precision comes from the ONNX graph
(`model.fp16.onnx` with FP16 layers, `model.int8.onnx` with Q/DQ nodes, see precision.py) and
the network is strongly typed. TensorRT 11 removed weak typing (BuilderFlag.FP16/INT8, the INT8
calibrators) and builds every network strongly typed, accepting the STRONGLY_TYPED creation
flag and ignoring it; TensorRT 10.x needs the flag. So the flag is always set, and no
precision builder flag is ever used.

The build: ONNX parser (errors reported with the node's name and operator), one optimisation
profile for the batch axis (min 1, opt and max from the flags), a workspace limit, a timing
cache kept on disk between builds (rebuilds and other precisions reuse the tactic timings),
progress through IProgressMonitor where the TensorRT version has it. The engine and the facts
it is bound to (TensorRT version, GPU name and compute capability, precision, batch profile)
go into the bundle; where the run's calibration images are at hand, the engine's scores are
first compared with ONNX Runtime's on the same ONNX file (FP32 within 1e-3 relative, FP16
within 1e-2, INT8 by decisions), as the ONNX variants are compared with FP32.

Without TensorRT, pycuda or a GPU it stops at once and says to run the ONNX model instead.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edge.bundle import Bundle, ModelFile, load_bundle, sha256_file, write_manifest
from edge.decision import DecisionRule
from edge.engine_tensorrt import TensorRTEngine, TensorRTUnavailable, device_facts, require_tensorrt

from .precision import (PRECISIONS, PrecisionError, Tolerance, calibration_images, deviation,
                        image_scores, onnx_infer)

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_GIB = 2.0
# engine vs ONNX Runtime on the same ONNX file: relative score error allowed per precision
SCORE_RTOL = {"fp32": 1e-3, "fp16": 1e-2, "int8": None}  # int8: judged by decisions (Tolerance)


class TensorRTBuildError(RuntimeError):
    """The ONNX parser or the builder refused the model; the message names the node."""


def engine_file(precision: str) -> str:
    return f"model.{precision}.engine"


def default_timing_cache(tensorrt_version: str, compute_capability: str) -> Path:
    """One cache per TensorRT version and GPU architecture: a cache from another is refused by
    TensorRT (or not even readable), so sharing one file would throw the timings away."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "linegate" / f"tensorrt-{tensorrt_version}-sm{compute_capability.replace('.', '')}.timing-cache"


def parser_errors(parser: Any) -> str:
    """The ONNX parser's errors, each with the node's name and operator where TensorRT gives them."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = []
        for label, method in (("node", "node_name"), ("operator", "node_operator")):
            try:
                value = getattr(err, method)()
            except Exception:  # older bindings lack the accessor
                value = None
            if value:
                where.append(f"{label} {value!r}")
        if not where and err.node() >= 0:
            where.append(f"node #{err.node()}")
        lines.append(f"{', '.join(where) or 'graph'}: {err.desc()} ({err.code()})")
    return "; ".join(lines)


def _progress_monitor(trt: Any) -> Any | None:
    """A tqdm bar per build phase, where this TensorRT has IProgressMonitor (10.0+)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, tqdm] = {}
            self._lock = threading.Lock()  # TensorRT calls back from its own threads

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                depth = 0 if parent_phase is None else 1
                self._bars[phase_name] = tqdm(total=num_steps, desc=("  " * depth) + phase_name,
                                              unit="step", leave=depth == 0)

        def step_complete(self, phase_name, step):
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.n = step + 1
                    bar.refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return Monitor()


def build_engine(bundle_dir: str | Path, precision: str = "fp16", max_batch: int = 8, opt_batch: int | None = None,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB, timing_cache: str | Path | None = None,
                 run_dir: str | Path | None = None, tolerance: Tolerance | None = None,
                 validate: bool = True) -> Path:
    """Build model.<precision>.engine from the bundle's ONNX model of that precision."""
    bundle_dir = Path(bundle_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    opt_batch = opt_batch or max_batch
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"batch profile needs 1 <= --opt-batch ({opt_batch}) <= --max-batch ({max_batch})")
    try:
        trt, cuda = require_tensorrt()  # first: no GPU means no build, and the message names the fallback
    except TensorRTUnavailable as exc:
        raise TensorRTUnavailable(f"cannot build a TensorRT engine here: {exc}") from None
    bundle = load_bundle(bundle_dir)
    source = bundle.model("onnx", precision)
    if source is None:
        raise FileNotFoundError(f"{bundle_dir}: no {precision} ONNX model to build from (the bundle holds "
                                f"{bundle.describe()}); make it first with `linegate export quantize {bundle_dir} "
                                f"--precision {precision}`")
    cuda_ctx = cuda.Device(0).retain_primary_context()
    cuda_ctx.push()
    try:
        gpu, cc = device_facts(cuda)
        log.info("building a %s TensorRT %s engine for %s (compute capability %s) from %s, batch 1..%d (opt %d)",
                 precision, trt.__version__, gpu, cc, source.name, max_batch, opt_batch)
        cache = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, cc)
        plan, cache_path = _build(trt, bundle, source, max_batch, opt_batch, workspace_gib, cache)
    finally:
        cuda_ctx.pop()
        cuda_ctx.detach()

    name = engine_file(precision)
    tmp = bundle_dir / f".{name}.tmp"
    tmp.write_bytes(plan)
    facts = {
        "kind": "tensorrt", "precision": precision, "source": source.name,
        "source_sha256": source.facts.get("sha256") or sha256_file(bundle.file(source.name)),
        "tensorrt": {"version": trt.__version__, "gpu": gpu, "compute_capability": cc, "strongly_typed": True,
                     "batch_profile": {"min": 1, "opt": opt_batch, "max": max_batch},
                     "workspace_bytes": int(workspace_gib * (1 << 30)), "timing_cache": str(cache_path)},
    }
    try:
        if validate:
            facts["deviation"] = _validate(bundle, tmp, ModelFile(name, "tensorrt", precision, facts), run_dir,
                                           tolerance or Tolerance())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, bundle_dir / name)
    bundle.manifest["files"][name] = facts
    write_manifest(bundle_dir, bundle.manifest)
    log.info("engine: %s (%.1f MB) in %s", name, len(plan) / 1e6, bundle_dir)
    return bundle_dir / name


def _build(trt: Any, bundle: Bundle, source: ModelFile, max_batch: int, opt_batch: int, workspace_gib: float,
           cache_path: Path) -> tuple[bytes, Path]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: required on TensorRT 10.x for Q/DQ and FP16 graphs, the only mode on 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    path = bundle.file(source.name)
    if not parser.parse_from_file(str(path)):
        raise TensorRTBuildError(f"{path}: the TensorRT ONNX parser refused the model: {parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        item = tuple(tensor.shape)[1:]
        if any(d < 0 for d in item):
            raise TensorRTBuildError(f"{path}: input {tensor.name!r} has dynamic axes {tuple(tensor.shape)} beyond "
                                     "the batch axis; export the bundle with a fixed image size")
        profile.set_shape(tensor.name, (1, *item), (opt_batch, *item), (max_batch, *item))
    config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    # create_timing_cache may return None for bytes it cannot read (a truncated file, another
    # version's format): then a fresh cache, not a failed build
    cache = config.create_timing_cache(cache_bytes) if cache_bytes else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if cache_bytes:
            log.warning("timing cache %s is unreadable or from another TensorRT or GPU; starting a new one",
                        cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTBuildError(f"{path}: TensorRT could not build an engine (see its log above)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")  # two builds at once: own files
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, cache_path)
    return bytes(plan), cache_path


def _validate(bundle: Bundle, engine_path: Path, model: ModelFile, run_dir: str | Path | None,
              tolerance: Tolerance) -> dict | None:
    """The engine's scores vs ONNX Runtime running the ONNX file it was built from, on the run's
    calibration images. (That file's own deviation from FP32 was gated when it was made.)"""
    from .precision import find_run

    try:
        run = find_run(bundle.path, run_dir)
    except FileNotFoundError as exc:
        log.warning("engine not validated on images: %s", exc)
        return None
    images = calibration_images(bundle, run)
    anomalous = np.array([c != bundle.manifest["classes"]["normal"] for c in images.classes])
    rule = DecisionRule.from_bundle(bundle)
    source = model.facts["source"]
    reference = image_scores(onnx_infer(bundle.file(source), bundle), rule, images.tensors)
    m = bundle.manifest
    engine = TensorRTEngine(engine_path, model, m["input"]["name"], m["outputs"]["score"]["name"],
                            m["outputs"]["map"]["name"])
    try:
        scores = image_scores(engine.infer, rule, images.tensors, batch=model.facts["tensorrt"]["batch_profile"]["max"])
    finally:
        engine.close()
    dev = deviation(reference, scores, anomalous, rule.threshold)
    rtol = SCORE_RTOL[model.precision]
    log.info("engine vs ONNX Runtime on %s, %d calibration images: max relative score error %.2e, %d decision(s) "
             "changed", source, dev["images"], dev["max_rel_score_error"], dev["decision_flips"])
    if rtol is not None and dev["max_rel_score_error"] > rtol:
        raise PrecisionError(f"{model.name}: scores differ from ONNX Runtime on {source} by up to "
                             f"{dev['max_rel_score_error']:.2e} relative (allowed {rtol:g}); not written")
    if dev["decision_flips"] > tolerance.max_flips:
        raise PrecisionError(f"{model.name}: {dev['decision_flips']} calibration decisions differ from ONNX Runtime "
                             f"on {source} (allowed {tolerance.max_flips}); not written")
    return {"set": "calibration", "reference": f"onnxruntime {source}", **dev}
