"""Is the demo's model robust to the compression a camera applies? Measured on the demo's own
stream: `linegate demo`'s training set and split, and the parts its live run streams (the
synthetic source, seed + 1000), scored by the exported bundle through ONNX Runtime as each
part arrives lossless and after a JPEG round trip at several qualities.

    python -m benchmarks.jpeg_robustness --out benchmarks/results/jpeg_robustness [--augment none jpeg]

Per model (--augment) and stream (png | jpeg:Q): normal parts' median score, their false
reject rate at the bundle's threshold, the defects caught, and AUROC (scikit-learn).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from edge.bundle import load_bundle
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.images import preprocess
from edge.sources import SyntheticSource
from edge.synthetic import NORMAL_CLASS, write_dataset
from export.onnx_export import export_onnx
from linegate.demo import DEMO_AGGREGATE, DEMO_SPLIT, N_NORMAL, N_PER_DEFECT  # the demo's training
from training.augment import jpeg_round_trip
from training.train import train

QUALITIES = (95, 85, 75)


def stream(seed: int, frames: int) -> list[tuple[np.ndarray, str]]:
    """The parts `linegate demo` streams (same source, same seed), as (RGB image, label)."""
    import threading

    source = SyntheticSource("line1", count=frames, seed=seed + 1000, defect_rate=0.3)
    return [(f.image, f.label) for f in source.frames(threading.Event())]


def score(bundle_dir: Path, parts: list[tuple[np.ndarray, str]], quality: int | None) -> dict:
    bundle = load_bundle(bundle_dir)
    engine, rule = open_engine(bundle), DecisionRule.from_bundle(bundle)
    images = [jpeg_round_trip(img, quality) if quality else img for img, _ in parts]
    batch = np.stack([preprocess(img, bundle.input_size, bundle.interpolation) for img in images])
    scores, maps = engine.infer(batch)
    decided = rule.decide(scores, maps)
    values = np.array([d.score for d in decided])
    normal = np.array([label == NORMAL_CLASS for _, label in parts])
    reject = values >= rule.threshold
    return {"threshold": rule.threshold, "normal_median": float(np.median(values[normal])),
            "false_reject_rate": float(reject[normal].mean()), "defects_caught": float(reject[~normal].mean()),
            "auroc": float(roc_auc_score(~normal, values)), "normal": int(normal.sum()),
            "defects": int((~normal).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/jpeg_robustness")
    parser.add_argument("--augment", nargs="+", default=["none", "jpeg"])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = stream(args.seed, args.frames)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, N_NORMAL, N_PER_DEFECT, seed=args.seed)
        for augment in args.augment:
            run = Path(tmp) / f"run-{augment.replace(':', '')}"
            train(data, run, "normal", "padim", seed=args.seed, counts=DEMO_SPLIT, aggregate=DEMO_AGGREGATE,
                  augment=None if augment == "none" else augment, report=False)
            bundle = export_onnx(run)
            results[augment] = {"png": score(bundle, parts, None),
                                **{f"jpeg:{q}": score(bundle, parts, q) for q in QUALITIES}}
            print(augment, json.dumps(results[augment], indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| model trained with --augment | stream | normal median score | threshold | false rejects "
             "(normal) | defects caught | AUROC |", "|---|---|---|---|---|---|---|"]
    for augment, rows in results.items():
        for stream_name, r in rows.items():
            lines.append(f"| {augment} | {stream_name} | {r['normal_median']:.2f} | {r['threshold']:.2f} | "
                         f"{r['false_reject_rate']:.3f} of {r['normal']} | {r['defects_caught']:.3f} of "
                         f"{r['defects']} | {r['auroc']:.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
