"""Inference engines behind one small interface: `infer(batch) -> (scores, maps)`.

The ONNX Runtime engine lives here; the TensorRT engine (pycuda) is chosen by the same
bundle and config and gives the same outputs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .bundle import Bundle, BundleError

log = logging.getLogger(__name__)


class Engine(Protocol):
    name: str

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 pixels -> (scores (B,), anomaly maps (B, h, w)), float32."""


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, input_name: str, score_name: str, map_name: str,
                 providers: list[str] | None = None, threads: int | None = None):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if providers is None:  # CUDA where this onnxruntime build has it, else the CPU
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(f"{model_path}: ONNX Runtime cannot load the model ({exc}); "
                              "re-export the bundle with `linegate export onnx RUN`") from exc
        self.providers = self.session.get_providers()
        self.input_name = input_name
        self.outputs = [score_name, map_name]

    @classmethod
    def from_bundle(cls, bundle: Bundle, **kwargs) -> "OnnxRuntimeEngine":
        m = bundle.manifest
        return cls(bundle.file("model.onnx"), m["input"]["name"], m["outputs"]["score"]["name"],
                   m["outputs"]["map"]["name"], **kwargs)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(self.outputs, {self.input_name: batch})
        return scores, maps


def open_engine(bundle: Bundle, kind: str = "onnxruntime", **kwargs) -> Engine:
    if kind in ("auto", "onnxruntime"):
        engine = OnnxRuntimeEngine.from_bundle(bundle, **kwargs)
        log.info("engine: ONNX Runtime (%s) for %s", ", ".join(engine.providers), bundle.model_id)
        return engine
    raise ValueError(f"engine {kind!r}: this build runs 'onnxruntime' (or 'auto')")
