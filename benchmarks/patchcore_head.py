"""What PatchCore's bank search costs next to the backbone, for bank sizes and projected dims.

The search's cost depends only on shapes (map patches x bank entries x dims), so each
configuration is a PatchCoreModel on the real Lite0 with a random bank of that shape, exported
to ONNX exactly as `linegate export onnx` does, and its backbone alone is cut out as `linegate
bench` does. All graphs take turns in every round (ONNX Runtime on the CPU, batch 8, default
threads), so a busy machine slows them alike; the figure is the median over rounds of model /
backbone img/s, `linegate bench`'s head efficiency.

    python -m benchmarks.patchcore_head [--configs 5488:152:1024,4096:64:1024,...] [--rounds 7]
        [--out benchmarks/results] [--name patchcore_head]

A config is BANK:DIMS:CHUNK; DIMS 152 was Lite0's unprojected patch (the fit before the cap
and the projection: 5,488 entries = 0.1 x 70 images x 28 x 28 patches); a DIMS below the
patch's own (training/patchcore.py patch_dims, 232 since the first stride-16 stage joined it)
is reached by a projection in the graph.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort
    import torch

    from benchmarks.backbone_graph import write_backbone_graph
    from export.onnx_export import export_graph
    from training.backbone import load_backbone
    from training.patchcore import PatchCoreModel
    from training.patchcore import patch_dims as patchcore_patch_dims

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="5488:152:1024,4096:64:1024,4096:64:256,8192:64:1024,4096:152:1024,2048:64:1024")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="patchcore_head")
    args = parser.parse_args(argv)
    backbone = load_backbone("imagenet", 224)
    gen = torch.Generator().manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="linegate-head-"))
    x = np.random.default_rng(0).uniform(0, 255, size=(BATCH, 3, 224, 224)).astype(np.float32)
    runs = []
    for text in args.configs.split(","):
        bank, dims, chunk = (int(v) for v in text.split(":"))
        patch_dims = patchcore_patch_dims(backbone)
        projection = None if dims >= patch_dims else torch.linalg.qr(torch.randn(patch_dims, dims, generator=gen)).Q
        model = PatchCoreModel(backbone, torch.randn(bank, dims, generator=gen), (28, 28), chunk=chunk,
                               projection=projection, offset=None if projection is None else torch.zeros(dims)).eval()
        path = tmp / f"model_{bank}_{dims}_{chunk}.onnx"
        export_graph(model, path, (224, 224))
        cut = tmp / f"backbone_{bank}_{dims}_{chunk}.onnx"
        outputs = write_backbone_graph(path, cut)
        sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in
                    (("model", path), ("backbone", cut))}
        runs.append({"bank": bank, "dims": dims, "chunk": chunk, "sessions": sessions, "outputs": outputs,
                     "fps": {"model": [], "backbone": []}})
    for _ in range(args.rounds):
        for run in runs:
            for key in ("backbone", "model"):
                s = run["sessions"][key]
                feed = {s.get_inputs()[0].name: x}
                names = run["outputs"] if key == "backbone" else None
                s.run(names, feed)
                started = time.perf_counter()
                for _ in range(args.calls):
                    s.run(names, feed)
                run["fps"][key].append(BATCH * args.calls / (time.perf_counter() - started))
    rows = []
    for run in runs:
        m, b = np.array(run["fps"]["model"]), np.array(run["fps"]["backbone"])
        rows.append({"bank": run["bank"], "dims": run["dims"], "chunk": run["chunk"],
                     "multiply_adds_per_image": 784 * run["bank"] * (run["dims"] + 1),
                     "model_fps": round(float(np.median(m)), 1), "backbone_fps": round(float(np.median(b)), 1),
                     "model_over_backbone": round(float(np.median(m / b)), 3),
                     "per_round": [round(float(v), 3) for v in m / b]})
    result = {"batch": BATCH, "rounds": args.rounds, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}, "
                         f"load average at end {[round(v, 1) for v in os.getloadavg()]}",
              "command": " ".join(["python -m benchmarks.patchcore_head", *(sys.argv[1:] if argv is None else argv)])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"| bank | dims | chunk | multiply-adds / image | model img/s | backbone img/s | model / backbone |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bank']} | {r['dims']} | {r['chunk']} | {r['multiply_adds_per_image'] / 1e6:.0f} M | {r['model_fps']} | "
              f"{r['backbone_fps']} | {r['model_over_backbone']} |" for r in rows]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
