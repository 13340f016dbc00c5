"""Backbone alone vs the whole exported model, ONNX Runtime CPU, in one run.

The backbone alone is the ceiling on this machine (DESIGN.md, performance model); the
ratio model/backbone says what the detector head costs. Ratios, not absolute numbers,
are what compare across runs on a noisy machine.

    python -m benchmarks.model_throughput RUN [--batches 1,8] [--seconds 5] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edge.bundle import load_bundle
from edge.engine import OnnxRuntimeEngine
from training.train import load_run


class _Backbone(torch.nn.Module):
    """The taps PaDiM reads, as one graph: what the model costs without its head."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return tuple(self.backbone.features(x))


def _fps(run_batch, batch: np.ndarray, seconds: float) -> float:
    run_batch(batch)  # warm-up: first runs allocate
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run_batch(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    model, meta = load_run(args.run)
    bundle = load_bundle(Path(args.run) / "bundle")
    h, w = bundle.input_size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backbone.onnx"
        torch.onnx.export(_Backbone(model.backbone).eval(), (torch.rand(2, 3, h, w) * 255,), str(path),
                          input_names=["pixels"], dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},),
                          dynamo=True, opset_version=18, verbose=False)
        backbone = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        full = OnnxRuntimeEngine.from_bundle(bundle, providers=["CPUExecutionProvider"])
        rows = []
        for b in [int(x) for x in args.batches.split(",")]:
            batch = (np.random.default_rng(0).random((b, 3, h, w)) * 255).astype(np.float32)
            bb = _fps(lambda x: backbone.run(None, {"pixels": x}), batch, args.seconds)
            mf = _fps(full.infer, batch, args.seconds)
            rows.append({"batch": b, "backbone_fps": bb, "model_fps": mf, "ratio": mf / bb})
            print(f"batch {b}: backbone {bb:.1f} img/s, model {mf:.1f} img/s, ratio {mf / bb:.2f}", flush=True)
    result = {"detector": meta["detector"], "engine": "onnxruntime-cpu", "input": [h, w], "rows": rows,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(),
                          "onnxruntime": ort.__version__, "torch": torch.__version__}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"model_throughput_{meta['detector']}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| batch | backbone img/s | model img/s | model / backbone |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['backbone_fps']:.1f} | {r['model_fps']:.1f} | {r['ratio']:.2f} |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
