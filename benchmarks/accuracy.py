"""Accuracy of the default command on real parts of several kinds, over split seeds.

What a user gets from `linegate train DATA --normal-class NAME --out RUN`, nothing else, on:
- pillQC (pills; `../shared/datasets/pillqc`) with the seed protocol (`--split 70,30,15,2`), as
  its own benchmark always has;
- KolektorSDD (commutator surfaces, cracks a few pixels wide, 500 x ~1250 grey frames;
  `../shared/datasets/kolektorsdd`, folders good/ and defect/);
- ELPV (electroluminescence images of solar cells, 300 x 300 grey; `pip install elpv-dataset`).
  Each cell carries a defect probability 0, 1/3, 2/3 or 1: 0 is good, 1 is defective, and the
  401 uncertain cells (1/3, 2/3) are left out: neither label is the truth for them, and a
  threshold fitted or scored on guesses would be too. The cells are written as PNG files,
  one folder per class, into the work directory (never into the repository).

One default run (`--model auto`) per data set and seed fits PaDiM and PatchCore and keeps the
better on the calibration set; each candidate is a complete run of that detector with the
default settings, so the table reports the default (auto) and each detector from the same
fits. FCDD (trained by gradient descent, `--model fcdd`) runs only where --fcdd names the set:
its training grows with the training set (70 images: 1 min here on a quiet box, 2-3 min on a
busy one; by hand, seed 0: 624 KolektorSDD tiles 8.7 min, 905 ELPV cells 12.3 min).

Per run: test AUROC and accuracy at the calibrated threshold (held-back images), what auto chose
and why, train time, and the bundle's frames per second through ONNX Runtime at batch 8 (the
runtime's engine, on this machine). Runs are appended to the JSON as they finish (--resume).

    python -m benchmarks.accuracy [--sets pillqc,kolektorsdd,elpv] [--seeds 0,1,2] [--fcdd pillqc]
        [--workdir /tmp/linegate-accuracy-all] [--out benchmarks/results] [--name accuracy] [--resume]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
SETS = ("pillqc", "kolektorsdd", "elpv")
NORMAL = {"pillqc": "normal", "kolektorsdd": "good", "elpv": "good"}
TARGETS = {"pillqc": 0.997, "kolektorsdd": 0.95, "elpv": 0.90}  # issue 20: the best detector's mean test AUROC


def elpv_folder(workdir: Path) -> Path:
    """ELPV as one folder per class (good = probability 0, defective = 1); written once."""
    root = workdir / "elpv-data"
    done = root / ".complete"
    if done.is_file():
        return root
    from elpv_dataset.utils import load_dataset  # pip install elpv-dataset

    images, probability, _types = load_dataset()
    for cls in ("good", "defective"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    for i, (image, p) in enumerate(zip(images, probability)):
        cls = "good" if p == 0 else "defective" if p == 1 else None
        if cls:
            cv2.imwrite(str(root / cls / f"cell{i:04d}.png"), image)
    done.write_text(f"good = probability 0, defective = 1; {int(((probability > 0) & (probability < 1)).sum())} "
                    "uncertain cells left out\n")
    return root


def data_for(name: str, workdir: Path) -> Path:
    if name == "elpv":
        return elpv_folder(workdir)
    path = DATASETS / name
    if not path.is_dir():
        raise SystemExit(f"{path}: not found (../shared/datasets beside the repository)")
    return path


def frames_per_second(run_dir: Path, paths: list[str], batch: int = 8, rounds: int = 3) -> float:
    """Frames per second of the run's bundle through the runtime's own frame path (read frame ->
    the bundle's preprocessing -> ONNX Runtime -> decision), at `batch` frames per engine call;
    the best of `rounds` passes over up to 32 frames."""
    from edge.bundle import load_bundle
    from edge.decision import DecisionRule
    from edge.engine import open_engine
    from edge.images import read_image
    from export.onnx_export import export_onnx

    bundle = load_bundle(export_onnx(run_dir))
    engine, rule = open_engine(bundle, "onnxruntime"), DecisionRule.from_bundle(bundle)
    prepare = frame_preparer(bundle)
    frames = [read_image(p) for p in paths[:32]]
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(0, len(frames), batch):
            decide_frames(engine, rule, prepare, frames[i:i + batch])
        best = max(best, len(frames) / (time.perf_counter() - started))
    return best


def frame_preparer(bundle):
    """The bundle's geometry (edge/tiling.py), as the runtime applies it: one input per frame,
    or the frame's tiles."""
    return bundle.geometry


def decide_frames(engine, rule, prepare, frames) -> list:
    if not prepare.tiled:
        scores, maps = engine.infer(np.stack([prepare.prepare(f) for f in frames]))
        return rule.decide(scores, maps)
    tiles = np.concatenate([prepare.prepare(f) for f in frames])  # the frames' tiles share the call
    _, maps = engine.infer(tiles)
    stitched = prepare.stitch_many(maps.reshape(len(frames), prepare.tile_count, *maps.shape[1:]))
    return rule.decide(None, stitched)  # the score of the whole stitched map


def one_run(name: str, data: Path, workdir: Path, seed: int, model: str = "auto") -> list[dict]:
    """The default command (or --model fcdd) on one set and seed -> one row per detector it fitted."""
    from training.data import SplitCounts
    from training.train import train

    run = workdir / f"{name}-{model}-seed{seed}"
    counts = SplitCounts() if name == "pillqc" else None  # pillQC: the seed protocol, one flag away
    metrics = train(data, run, NORMAL[name], model, seed=seed, counts=counts, report=False)
    test_paths = json.loads((run / "split.json").read_text())["test"]
    runs = {model: (run, metrics)}
    if model == "auto":
        for det, cand in metrics["detector_choice"]["candidates"].items():
            runs[det] = (Path(cand["run"]), json.loads((Path(cand["run"]) / "metrics.json").read_text()))
    rows = []
    for det, (run_dir, m) in runs.items():
        cal, test = m["calibration"], m["test"]
        rows.append({"set": name, "seed": seed, "detector": det,
                     "chosen": m["detector"] if det == "auto" else det,
                     "why": m.get("detector_choice", {}).get("reason", ""),
                     "test_auroc": test["auroc"], "test_accuracy": test["accuracy"],
                     "test_confusion": test["confusion"], "calibration_auroc": cal["auroc"],
                     "aggregate": cal["aggregate"], "separation": cal.get("separation"),
                     "split": {k: len(m["split"][k]) for k in ("train", "train_anomalous", "calibration", "test")},
                     "train_seconds": m["train_seconds"], "fit_seconds": m["fit_seconds"],
                     "frames_per_second": frames_per_second(run_dir, [p for p, _ in test_paths])})
        print(f"   {name} seed {seed} {det}: test AUROC {rows[-1]['test_auroc']:.4f} accuracy "
              f"{rows[-1]['test_accuracy']:.4f} ({rows[-1]['aggregate']}) {rows[-1]['frames_per_second']:.1f} frames/s",
              flush=True)
    return rows


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for name in SETS:
        for det in ("auto", "padim", "patchcore", "fcdd"):
            rs = [r for r in runs if r["set"] == name and r["detector"] == det]
            if rs:
                out.setdefault(name, {})[det] = {
                    "seeds": [r["seed"] for r in rs],
                    "mean_test_auroc": float(np.mean([r["test_auroc"] for r in rs])),
                    "min_test_auroc": float(np.min([r["test_auroc"] for r in rs])),
                    "mean_test_accuracy": float(np.mean([r["test_accuracy"] for r in rs])),
                    "mean_train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
                    "mean_frames_per_second": float(np.mean([r["frames_per_second"] for r in rs])),
                    "chosen": [r["chosen"] for r in rs]}
    return out


def markdown(result: dict) -> str:
    lines = [f"# Accuracy of the default command on real parts, seeds {result['seeds']}", "",
             f"`linegate train DATA --normal-class NAME --out RUN` and nothing else (pillQC: `--split 70,30,15,2`, "
             f"its seed protocol). {result['machine']}, {result['date']}. Command: `{result['command']}`. "
             "ELPV: good = defect probability 0, defective = 1; the uncertain cells (1/3, 2/3) left out.", "",
             "| set | detector | mean test AUROC | min | mean test accuracy | target (issue 20) | "
             "train time | frames/s (ORT, batch 8) | auto chose |", "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for name, dets in result["summary"].items():
        target = TARGETS[name]
        best = max((d for d in dets if d != "auto"), key=lambda d: dets[d]["mean_test_auroc"])
        b, a = dets[best], dets.get("auto")
        verdicts.append(f"- {name}: best detector {best}, mean test AUROC {b['mean_test_auroc']:.4f} "
                        f"(target >= {target}: {'met' if b['mean_test_auroc'] >= target else 'NOT met'}); "
                        + (f"the default command (auto) {a['mean_test_auroc']:.4f}, accuracy "
                           f"{a['mean_test_accuracy']:.4f}" if a else "no default run"))
        for det, d in dets.items():
            met = "" if det not in (best, "auto") else \
                f">= {target} ({'met' if d['mean_test_auroc'] >= target else 'not met'}{', default' if det == 'auto' else ''})"
            chosen = ", ".join(d["chosen"]) if det == "auto" else ""
            lines.append(f"| {name} | {det} | {d['mean_test_auroc']:.4f} | {d['min_test_auroc']:.4f} | "
                         f"{d['mean_test_accuracy']:.4f} | {met} | {d['mean_train_seconds'] / 60:.1f} min | "
                         f"{d['mean_frames_per_second']:.1f} | {chosen} |")
    lines += ["", *verdicts, "", "## Every run", "", "| set | seed | detector | split (train/OE/cal/test) | calibration AUROC | "
              "separation | aggregate | test AUROC | test accuracy | confusion [[tn, fp], [fn, tp]] | train |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        s = r["split"]
        sep = "" if r["separation"] is None else f"{r['separation']:+.2f}"
        lines.append(f"| {r['set']} | {r['seed']} | {r['detector']}{' -> ' + r['chosen'] if r['detector'] == 'auto' else ''} "
                     f"| {s['train']}/{s['train_anomalous']}/{s['calibration']}/{s['test']} | "
                     f"{r['calibration_auroc']:.4f} | {sep} | {r['aggregate']} | {r['test_auroc']:.4f} | "
                     f"{r['test_accuracy']:.4f} | {r['test_confusion']} | {r['train_seconds'] / 60:.1f} min |")
    lines += ["", "auto's train time is both candidates'; each detector's row is that candidate's own run. "
                  "Separation: (mean defective calibration score - mean good one) / SD of the good ones, on the "
                  "Box-Cox scale of the calibration scores (training/calibrate.py separation).", ""]
    return "\n".join(lines)


DATE_JOIN, COMMAND_JOIN = ", then ", "`, then `"  # the command sits in backticks in the table


def _then(earlier: str | None, now: str, join: str) -> str:
    """An earlier sweep's date or command with this one's appended (unless it is the last one)."""
    if not earlier:
        return now
    return earlier if earlier.split(join)[-1] == now else f"{earlier}{join}{now}"


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fcdd", default="pillqc", help="sets on which FCDD runs too ('' for none)")
    parser.add_argument("--workdir", default="/tmp/linegate-accuracy-all", help="where the runs go (not the repo)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="accuracy")
    parser.add_argument("--resume", action="store_true", help="keep finished runs from an earlier JSON")
    args = parser.parse_args(argv)
    sets, seeds = args.sets.split(","), [int(s) for s in args.seeds.split(",")]
    fcdd = [s for s in args.fcdd.split(",") if s]
    out, workdir = Path(args.out), Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name}.json"
    earlier = json.loads(json_path.read_text()) if args.resume and json_path.is_file() else {}
    runs = earlier.get("runs", [])
    command = " ".join(["python -m benchmarks.accuracy", *(sys.argv[1:] if argv is None else argv)])
    today = time.strftime("%Y-%m-%d")
    result = {"seeds": seeds, "sets": sets,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              # a resumed table says on which days and by which commands its rows were made
              "date": _then(earlier.get("date"), today, DATE_JOIN),
              "command": _then(earlier.get("command"), command, COMMAND_JOIN),
              "runs": runs}
    for seed in seeds:
        for name in sets:
            for model in ("auto", *(["fcdd"] if name in fcdd else [])):
                if any(r["set"] == name and r["seed"] == seed and r["detector"] == model for r in runs):
                    continue
                print(f"== {name} seed {seed} --model {model}", flush=True)
                runs.extend(one_run(name, data_for(name, workdir), workdir, seed, model))
                result["summary"] = summarise(runs)
                json_path.write_text(json.dumps(result, indent=2) + "\n")
                (out / f"{args.name}.md").write_text(markdown(result))
    result["summary"] = summarise(runs)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
