"""Accuracy against speed for each EfficientNet-Lite backbone (`linegate train --backbone`).

Every (data set, backbone, detector) is trained, calibrated and tested exactly as `linegate
train` does (split given per set, aggregate auto, binormal threshold), exported to ONNX, and
its bundle timed with ONNX Runtime on the CPU at batch 8: the whole model and its backbone
alone (the graph cut `linegate bench` uses). The timings take turns across the runs in
several rounds, so a busy machine slows all of them alike; img/s is the median over rounds.

    python -m benchmarks.backbones [--backbones lite0,lite1,lite2] [--detectors padim,patchcore]
        [--sets pillqc=../shared/datasets/pillqc:normal:70,30,15,2] [--seed 0]
        [--workdir /tmp/linegate-backbones] [--out benchmarks/results] [--name backbones]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 8


def _parse_set(text: str) -> tuple[str, Path, str, tuple[int, ...]]:
    name, rest = text.split("=", 1)
    path, normal, counts = rest.rsplit(":", 2)
    return name, Path(path), normal, tuple(int(c) for c in counts.split(","))


def _train(name: str, data: Path, normal: str, counts: tuple[int, ...], backbone: str, detector: str,
           seed: int, workdir: Path) -> dict:
    from export.onnx_export import export_onnx
    from training.data import SplitCounts
    from training.train import train

    run = workdir / f"{name}-{backbone}-{detector}-seed{seed}"
    metrics = train(data, run, normal, detector, seed=seed, counts=SplitCounts(*counts), aggregate="auto",
                    threshold="binormal", report=False, backbone=backbone)
    export_onnx(run)
    test = metrics["test"]
    return {"set": name, "backbone": backbone, "detector": detector, "seed": seed, "run": str(run),
            "test_auroc": test["auroc"], "test_accuracy": test["accuracy"], "calibration_auroc":
            metrics["calibration"]["auroc"], "aggregate": metrics["calibration"]["aggregate"],
            "fit_seconds": metrics["fit_seconds"], "train_seconds": metrics["train_seconds"]}


def _time(runs: list[dict], rounds: int, calls: int) -> None:
    """Model and backbone-alone img/s at batch 8 for every run's bundle, taking turns."""
    from benchmarks.backbone_graph import write_backbone_graph
    from edge.bundle import load_bundle
    from edge.engine import OnnxRuntimeEngine

    tmp = Path(tempfile.mkdtemp(prefix="linegate-backbones-"))
    engines = []
    for i, r in enumerate(runs):
        bundle = load_bundle(Path(r["run"]) / "bundle")
        model = OnnxRuntimeEngine.from_bundle(bundle)
        cut = tmp / f"backbone{i}.onnx"
        outputs = write_backbone_graph(bundle.path / "model.onnx", cut)
        import onnxruntime as ort

        alone = ort.InferenceSession(str(cut), providers=["CPUExecutionProvider"])
        h, w = bundle.manifest["input"]["shape"][2:]
        x = np.random.default_rng(0).uniform(0, 255, size=(BATCH, 3, h, w)).astype(np.float32)
        engines.append((r, lambda m=model, x=x: m.infer(x),
                        lambda s=alone, x=x, o=outputs: s.run(o, {s.get_inputs()[0].name: x})))
    samples = {id(r): {"model": [], "backbone": []} for r in runs}
    for _ in range(rounds):
        for r, model, alone in engines:
            for key, fn in (("backbone", alone), ("model", model)):
                fn()  # warm
                started = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[id(r)][key].append(BATCH * calls / (time.perf_counter() - started))
    for r, _, _ in engines:
        s = samples[id(r)]
        r["model_fps"] = round(float(np.median(s["model"])), 1)
        r["backbone_fps"] = round(float(np.median(s["backbone"])), 1)
        r["model_over_backbone"] = round(float(np.median(np.array(s["model"]) / np.array(s["backbone"]))), 3)


def markdown(result: dict) -> str:
    lines = [f"# Backbones: accuracy against img/s (seed {result['seed']})", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}, {result['date']}; img/s: ONNX Runtime fp32 on the CPU, batch {BATCH}, "
             f"median of {result['rounds']} rounds in which all bundles take turns. Input size 224 x 224 for every "
             "backbone (the tiled or aspect-following geometry is another option, not compared here).", "",
             "| set | detector | backbone | test AUROC | test accuracy | calibration AUROC | aggregate | "
             "model img/s | backbone img/s | model / backbone | fit s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["runs"], key=lambda r: (r["set"], r["detector"], r["backbone"])):
        lines.append(f"| {r['set']} | {r['detector']} | {r['backbone']} | {r['test_auroc']:.4f} | "
                     f"{r['test_accuracy']:.4f} | {r['calibration_auroc']:.4f} | {r['aggregate']} | "
                     f"{r.get('model_fps', '-')} | {r.get('backbone_fps', '-')} | {r.get('model_over_backbone', '-')} | "
                     f"{r['fit_seconds']:.0f} | {r['train_seconds']:.0f} |")
    lines += ["", result.get("notes", "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="lite0,lite1,lite2")
    parser.add_argument("--detectors", default="padim,patchcore")
    parser.add_argument("--sets", action="append", default=None,
                        help="NAME=PATH:NORMAL_CLASS:TRAIN,CALIB,CALIB_PER_ANOMALY,TRAIN_PER_ANOMALY (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="batch-8 calls per timing sample")
    parser.add_argument("--workdir", default="/tmp/linegate-backbones")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="backbones")
    parser.add_argument("--resume", action="store_true", help="keep finished runs from an earlier JSON")
    args = parser.parse_args(argv)
    import torch

    sets = [_parse_set(s) for s in (args.sets or [f"pillqc={REPO.parent / 'shared' / 'datasets' / 'pillqc'}"
                                                  ":normal:70,30,15,2"])]
    out, workdir = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    runs = json.loads(json_path.read_text())["runs"] if args.resume and json_path.is_file() else []
    result = {"seed": args.seed, "rounds": args.rounds,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"{platform.processor() or platform.platform()}",
              "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(["python -m benchmarks.backbones", *(sys.argv[1:] if argv is None else argv)]),
              "runs": runs}
    for name, data, normal, counts in sets:
        for detector in args.detectors.split(","):
            for backbone in args.backbones.split(","):
                if any((r["set"], r["backbone"], r["detector"]) == (name, backbone, detector) for r in runs):
                    continue
                print(f"== {name} {detector} {backbone}", flush=True)
                runs.append(_train(name, data, normal, counts, backbone, detector, args.seed, workdir))
                print(f"   test AUROC {runs[-1]['test_auroc']:.4f} train {runs[-1]['train_seconds']:.0f} s", flush=True)
                json_path.write_text(json.dumps(result, indent=2) + "\n")
    _time(runs, args.rounds, args.calls)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
