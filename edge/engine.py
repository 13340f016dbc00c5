"""Inference engines behind one small interface: `infer(batch) -> (scores, maps)`, and the
choice between them.

The ONNX Runtime engine lives here; the TensorRT engine (pycuda) is in engine_tensorrt.py and
gives the same outputs. `open_engine` picks one from what the bundle holds and what this box
offers, and logs which and why:
- `tensorrt`: the bundle's TensorRT engine (of `precision`, or its best: fp16, int8, fp32);
  no GPU/TensorRT here, or an engine built for another GPU or TensorRT, is an error that says
  what to do.
- `onnxruntime`: the bundle's ONNX model of `precision` (default fp32: on an AVX2 CPU without
  FP16 or VNNI units the FP32 graph outran the FP16 and INT8 variants,
  benchmarks/results/precision_throughput_padim.md).
- `auto`: TensorRT where the bundle has a usable engine and this box has a GPU for it, else
  ONNX Runtime.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError, ModelFile, check_model_io
from .engine_tensorrt import GpuStatus, TensorRTEngine, TensorRTUnavailable, check_facts
from .engine_tensorrt import probe as probe_gpu

log = logging.getLogger(__name__)


class Engine(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 pixels -> (scores (B,), anomaly maps (B, h, w)), float32."""


def session_options(threads: int | None = None, spin_between_calls: bool = False) -> ort.SessionOptions:
    """ONNX Runtime's session options as linegate runs its models (the bench builds its own
    sessions with these too, so that what it compares runs alike).

    ONNX Runtime's worker threads spin while waiting for work, inside a call (where one
    parallel section follows another closely, so waking them would cost more) and, by
    default, for tens of milliseconds after the call returns too: half a core burnt after
    every call, at any frame rate. Here they stop when the call returns, so that between
    calls the pipeline's own threads (the source waking for the next frame, the publisher)
    find the cores free, and a box below full load does not burn half a core between frames.
    On 2 cores the median latency at 60 img/s fell by 1.3-3.2 ms, for 2-5% of closed-loop throughput
    (benchmarks/results/spin_ab_padim.md). `spin_between_calls` restores ONNX Runtime's
    default: for a box that runs flat out.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin_between_calls:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OnnxRuntimeEngine:
    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, model_path: str | Path, input_name: str, score_name: str, map_name: str,
                 providers: list[str] | None = None, threads: int | None = None,
                 spin_between_calls: bool = False):
        options = session_options(threads, spin_between_calls)
        available = ort.get_available_providers()
        if providers is None:  # CUDA where this onnxruntime build has it, else the CPU
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"{model_path}: ONNX Runtime cannot load the model ({exc}); "
                              "re-export the bundle with `linegate export onnx RUN`") from exc
        self.providers = self.session.get_providers()
        self._run_options = ort.RunOptions()  # its terminate flag ends a call in progress
        self.model_path = Path(model_path)
        self.input_name = input_name
        self.outputs = [score_name, map_name]

    @classmethod
    def from_bundle(cls, bundle: Bundle, model_file: str = "model.onnx", **kwargs) -> "OnnxRuntimeEngine":
        m = bundle.manifest
        engine = cls(bundle.file(model_file), m["input"]["name"], m["outputs"]["score"]["name"],
                     m["outputs"]["map"]["name"], **kwargs)
        io = {"inputs": engine.session.get_inputs(), "outputs": engine.session.get_outputs()}
        check_model_io(bundle, model_file, *({a.name: a.shape for a in io[k]} for k in ("inputs", "outputs")))
        return engine

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(self.outputs, {self.input_name: batch}, self._run_options)
        return scores, maps

    def cancel_runs(self, cancel: bool = True) -> None:
        """From another thread: end the call in progress (ONNX Runtime stops between two
        nodes and raises), and every later call until cancel_runs(False). A stop during a
        long warm-up uses it, so that the process never exits under a running session."""
        self._run_options.terminate = cancel


ENGINE_KINDS = ("auto", "onnxruntime", "tensorrt")
TENSORRT_PREFERENCE = ("fp16", "int8", "fp32")  # without --precision: the fast, safe default first


@dataclass(frozen=True)
class EngineChoice:
    kind: str  # onnxruntime | tensorrt
    model: ModelFile
    reason: str


def _onnx_model(bundle: Bundle, precision: str | None) -> ModelFile:
    wanted = precision or "fp32"
    model = bundle.model("onnx", wanted)
    if model is None:
        raise BundleError(f"{bundle.path}: the bundle has no {wanted} ONNX model (it holds {bundle.describe()}); "
                          f"make one with `linegate export quantize {bundle.path} --precision {wanted}`")
    return model


def _engine_model(bundle: Bundle, precision: str | None) -> ModelFile | None:
    order = [precision] if precision else list(TENSORRT_PREFERENCE)
    return next((m for p in order if (m := bundle.model("tensorrt", p)) is not None), None)


def choose_engine(bundle: Bundle, kind: str = "auto", precision: str | None = None,
                  probe: Callable[[], GpuStatus] = probe_gpu) -> EngineChoice:
    """Which engine and model file to run, and why. `probe` says what this box offers
    TensorRT (tests pass a stand-in for the GPU they do not have)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine {kind!r}: choose from {', '.join(ENGINE_KINDS)}")
    if kind == "onnxruntime":
        return EngineChoice("onnxruntime", _onnx_model(bundle, precision), "asked for ONNX Runtime")
    engine = _engine_model(bundle, precision)
    if kind == "tensorrt":
        if engine is None:
            what = f"{precision} TensorRT engine" if precision else "TensorRT engine"
            raise BundleError(f"{bundle.path}: the bundle has no {what} (it holds {bundle.describe()}); build one "
                              f"with `linegate export tensorrt {bundle.path} --precision {precision or 'fp16'}` on "
                              "the box that will run it, or run the ONNX model with `--engine onnxruntime`")
        status = probe()
        if not status.usable:
            raise TensorRTUnavailable(f"--engine tensorrt: {status.reason}")
        check_facts(engine, status)
        return EngineChoice("tensorrt", engine, f"asked for TensorRT; {status.reason}")
    # auto
    if engine is None:
        why = f"the bundle has no {precision + ' ' if precision else ''}TensorRT engine"
    else:
        status = probe()
        if not status.usable:
            why = status.reason
        else:
            try:
                check_facts(engine, status)
            except BundleError as exc:
                why = str(exc)
            else:
                return EngineChoice("tensorrt", engine, f"the bundle has {engine.name} and {status.reason}")
    return EngineChoice("onnxruntime", _onnx_model(bundle, precision), f"{why}: using ONNX Runtime")


def open_engine(bundle: Bundle, kind: str = "auto", precision: str | None = None,
                probe: Callable[[], GpuStatus] = probe_gpu, **kwargs) -> Engine:
    """The chosen engine, loaded. kwargs (threads, spin_between_calls, providers) go to ONNX Runtime."""
    choice = choose_engine(bundle, kind, precision, probe)
    if choice.kind == "tensorrt":
        try:
            engine: Engine = TensorRTEngine.from_bundle(bundle, choice.model)
        except (TensorRTUnavailable, BundleError, RuntimeError) as exc:
            if kind == "tensorrt":
                raise
            log.warning("engine: TensorRT %s failed to load (%s); falling back to ONNX Runtime", choice.model.name, exc)
            choice = EngineChoice("onnxruntime", _onnx_model(bundle, precision), "TensorRT failed to load")
        else:
            if kwargs:
                log.info("engine: %s are ONNX Runtime settings; TensorRT ignores them", sorted(kwargs))
            log.info("engine: TensorRT %s (%s) for %s: %s", choice.model.name, choice.model.precision,
                     bundle.model_id, choice.reason)
            return engine
    ort_engine = OnnxRuntimeEngine.from_bundle(bundle, choice.model.name, **kwargs)
    ort_engine.precision = choice.model.precision
    log.info("engine: ONNX Runtime (%s) %s (%s) for %s: %s", ", ".join(ort_engine.providers), choice.model.name,
             choice.model.precision, bundle.model_id, choice.reason)
    return ort_engine
