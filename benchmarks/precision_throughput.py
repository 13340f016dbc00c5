"""FP32 vs FP16 vs INT8 ONNX models on ONNX Runtime CPU: accuracy and throughput, in one run.

Makes the variants exactly as `linegate export quantize` does (export/precision.py) in a
temporary directory, plus one reference point that no bundle ships: INT8 with asymmetric
uint8 activations (ONNX Runtime's fast x86 path, which TensorRT cannot build). For each:
- accuracy against FP32: on the calibration set (what validation gates on: decisions changed,
  AUROC, max score error) and on the test set (AUROC and accuracy at the bundle's threshold;
  test images are only measured here, never used to make or pick anything);
- throughput at each batch size, the models taking turns in short slices so that load from
  other processes hits them alike; the ratio to FP32 is what compares across runs;
- where the time goes: ONNX Runtime's per-operator profile at the largest batch.

    python -m benchmarks.precision_throughput RUN [--batches 1,8] [--seconds 4] [--rounds 3]
        [--keep-variants DIR]

The INT8 speed-up depends on the CPU's integer dot-product instructions (AVX-512 VNNI, AMX),
so the same files are worth timing on other CPUs. `--keep-variants DIR` saves the four models;
on another machine, with neither the run nor its images at hand,

    python -m benchmarks.precision_throughput --throughput-only DIR [--batches 1,8]

times them on frames of the synthetic part generator (throughput does not depend on what the
pixels show) and writes precision_throughput_<detector>_<cpu>.json/.md, throughput only.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.bench import usable_cores
from edge.bundle import Bundle, load_bundle
from edge.decision import DecisionRule
from edge.images import preprocess
from edge.synthetic import PartGenerator
from export.precision import deviation, image_scores, make_fp16, make_int8, onnx_infer
from training.calibrate import binary_metrics
from training.data import Split, load_images

VARIANTS = [  # (label, what it is)
    ("fp32", "model.onnx as exported"),
    ("fp16", "model.fp16.onnx: FP16 backbone, FP32 head and I/O"),
    ("int8", "model.int8.onnx: QDQ s8 symmetric activations, s8 7-bit per-channel weights (TensorRT-buildable)"),
    ("int8-u8", "reference only: QDQ u8 asymmetric activations (ONNX Runtime x86 fast path; not TensorRT)"),
]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _round(sessions: dict[str, ort.InferenceSession], name: str, batch: np.ndarray, seconds: float,
           slice_s: float = 0.5) -> dict[str, float]:
    """img/s of each model over one round: the models take turns in short slices, so a burst of
    load from other processes falls on all of them rather than on whichever ran at the time."""
    images = {label: 0 for label in sessions}
    spent = {label: 0.0 for label in sessions}
    for session in sessions.values():
        session.run(None, {name: batch})  # warm-up
    while min(spent.values()) < seconds:
        for label, session in sessions.items():
            start = time.perf_counter()
            while time.perf_counter() - start < slice_s:
                session.run(None, {name: batch})
                images[label] += len(batch)
            spent[label] += time.perf_counter() - start
    return {label: images[label] / spent[label] for label in sessions}


def _profile(path: Path, name: str, batch: np.ndarray, trace_dir: Path, runs: int = 3) -> dict[str, float]:
    """ms per batch spent in each operator type."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(trace_dir / "ort_profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {name: batch})
    for _ in range(runs):
        session.run(None, {name: batch})
    trace = Path(session.end_profiling())
    totals: dict[str, float] = collections.defaultdict(float)
    events = json.loads(trace.read_text())
    kernel = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in kernel[len(kernel) // (runs + 1):]:  # skip the first (warm-up) run
        totals[e["args"].get("op_name", "?")] += e["dur"] / 1000 / runs
    trace.unlink()
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="a training run with its bundle (not with --throughput-only)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seconds", type=float, default=4.0, help="per model, per batch size, per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--keep-variants", metavar="DIR", help="also save the four models (and the manifest) here")
    parser.add_argument("--throughput-only", metavar="DIR", help="time the models a --keep-variants run saved")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.throughput_only:
        return _throughput_only(Path(args.throughput_only), batches, args)
    if not args.run:
        parser.error("give a RUN, or --throughput-only DIR")
    run = Path(args.run)
    bundle = load_bundle(run / "bundle")
    split = Split.from_json(json.loads((run / "split.json").read_text()))
    size = bundle.input_size
    sets = {name: load_images(items, size, bundle.interpolation)
            for name, items in (("calibration", split.calibration), ("test", split.test))}
    normal = bundle.manifest["classes"]["normal"]
    rule = DecisionRule.from_bundle(bundle)
    name = bundle.input_name

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": bundle.file("model.onnx"), "fp16": Path(tmp) / "model.fp16.onnx",
                 "int8": Path(tmp) / "model.int8.onnx", "int8-u8": Path(tmp) / "model.int8-u8.onnx"}
        cal = sets["calibration"].tensors
        make_fp16(paths["fp32"], paths["fp16"])
        make_int8(paths["fp32"], paths["int8"], cal, name, activations="s8")
        make_int8(paths["fp32"], paths["int8-u8"], cal, name, activations="u8")

        accuracy: dict[str, dict] = {}
        scores = {label: {s: image_scores(onnx_infer(path, bundle), rule, sets[s].tensors) for s in sets}
                  for label, path in paths.items()}
        for label in paths:
            per_set = {}
            for s, images in sets.items():
                anomalous = np.array([c != normal for c in images.classes])
                dev = deviation(scores["fp32"][s], scores[label][s], anomalous, rule.threshold)
                per_set[s] = {**dev, **{k: binary_metrics(scores[label][s], anomalous, rule.threshold)[k]
                                        for k in ("f1", "confusion")}}
            accuracy[label] = per_set
            print(f"{label}: calibration flips {per_set['calibration']['decision_flips']}, AUROC "
                  f"{per_set['calibration']['auroc']:.4f}; test AUROC {per_set['test']['auroc']:.4f} "
                  f"(FP32 {per_set['test']['auroc_fp32']:.4f}), test flips {per_set['test']['decision_flips']}",
                  flush=True)

        if args.keep_variants:
            keep = Path(args.keep_variants)
            keep.mkdir(parents=True, exist_ok=True)
            for label, path in paths.items():
                shutil.copyfile(path, keep / f"{label}.onnx")
            shutil.copyfile(bundle.path / "manifest.json", keep / "manifest.json")
        rows, profiles = _time_models(paths, name, cal, batches, args, Path(tmp))

    result = {
        "run": str(run), "detector": bundle.manifest["detector"], "model_id": bundle.model_id,
        "variants": dict(VARIANTS), "accuracy": accuracy, "throughput": rows,
        "profile_ms_per_batch": {"batch": max(batches), **profiles},
        "settings": {"seconds": args.seconds, "rounds": args.rounds, "threshold": rule.threshold},
        "machine": _machine(),
    }
    return _write(result, Path(args.out), f"precision_throughput_{bundle.manifest['detector']}")


def _time_models(paths: dict[str, Path], name: str, images: np.ndarray, batches: list[int],
                 args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict]:
    """Throughput rows (img/s per round, ratio to FP32) and the operator profile at the largest batch."""
    sessions = {label: _session(path) for label, path in paths.items()}
    fps: dict[int, dict[str, list[float]]] = {b: {label: [] for label in paths} for b in batches}
    for r in range(args.rounds):
        for b in batches:
            batch = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))
            for label, value in _round(sessions, name, batch, args.seconds).items():
                fps[b][label].append(value)
        print(f"round {r + 1}/{args.rounds}: " + "; ".join(
            f"b{b} " + " ".join(f"{k} {v[-1]:.1f}" for k, v in fps[b].items()) for b in batches), flush=True)
    del sessions
    biggest = np.ascontiguousarray(np.resize(images, (max(batches), *images.shape[1:])))
    profiles = {label: _profile(path, name, biggest, tmp) for label, path in paths.items()}
    rows = []
    for b in batches:
        base = float(np.median(fps[b]["fp32"]))
        for label in paths:
            med = float(np.median(fps[b][label]))
            per_round = [v / f for v, f in zip(fps[b][label], fps[b]["fp32"])]
            rows.append({"batch": b, "variant": label, "fps_median": med, "fps_rounds": fps[b][label],
                         "ratio_vs_fp32": med / base, "ratio_per_round": per_round})
    return rows, profiles


def _throughput_only(models: Path, batches: list[int], args: argparse.Namespace) -> int:
    manifest = json.loads((models / "manifest.json").read_text())
    paths = {label: models / f"{label}.onnx" for label, _ in VARIANTS}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"{models}: missing {missing}; make them with --keep-variants DIR on a machine with the run")
    saved = Bundle(models, manifest)  # the manifest's rules (input size, resize), not its file names
    size = saved.input_size
    generator = PartGenerator(size=max(size), seed=0)
    images = np.stack([preprocess(generator.sample()[0], size, saved.interpolation) for _ in range(16)])
    with tempfile.TemporaryDirectory() as tmp:
        rows, profiles = _time_models(paths, saved.input_name, images, batches, args, Path(tmp))
    machine = _machine()
    result = {"models": str(models), "detector": manifest["detector"], "model_id": manifest["model_id"],
              "variants": dict(VARIANTS), "accuracy": None, "inputs": "synthetic parts (edge.synthetic), 16 frames",
              "throughput": rows, "profile_ms_per_batch": {"batch": max(batches), **profiles},
              "settings": {"seconds": args.seconds, "rounds": args.rounds}, "machine": machine}
    cpu = "".join(c if c.isalnum() else "_" for c in machine["cpu"].lower()).strip("_")[:40]
    return _write(result, Path(args.out), f"precision_throughput_{manifest['detector']}_{cpu}")


def _machine() -> dict:
    return {"cpu": _cpu_name(), "cores": usable_cores(), "cpu_flags": _cpu_flags(),
            "onnxruntime": ort.__version__, "python": platform.python_version()}


def _write(result: dict, out: Path, stem: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(_markdown(result) + "\n")
    print(f"wrote {out / stem}.json and .md")
    return 0


def _markdown(r: dict) -> str:
    lines = [f"# Precision variants on ONNX Runtime CPU: {r['detector']} ({r['model_id']})", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, flags {r['machine']['cpu_flags']}, "
             f"onnxruntime {r['machine']['onnxruntime']}. Throughput: median of {r['settings']['rounds']} "
             f"rounds of {r['settings']['seconds']} s per model, the models taking turns in 0.5 s slices "
             "within each round; ratios are within this run (the machine is shared: absolute img/s "
             "move with other load).", ""]
    if r["accuracy"] is None:
        lines += [f"Throughput only, on {r['inputs']}: the models were made (and their accuracy measured) "
                  "on another machine with `--keep-variants`.", "",
                  "| variant | what |", "|---|---|"]
        lines += [f"| {label} | {what} |" for label, what in r["variants"].items()]
    else:
        lines += _accuracy_table(r)
    lines += ["", "| batch | variant | img/s (median) | vs FP32 (median) | vs FP32, each round |",
              "|---|---|---|---|---|"]
    lines += [f"| {row['batch']} | {row['variant']} | {row['fps_median']:.1f} | {row['ratio_vs_fp32']:.2f}x | "
              + " ".join(f"{x:.2f}" for x in row["ratio_per_round"]) + " |" for row in r["throughput"]]
    prof = r["profile_ms_per_batch"]
    lines += ["", f"Where the time goes at batch {prof['batch']} (ms per batch, ONNX Runtime profiler, top 6 "
                  "operator types):", ""]
    for label in r["variants"]:
        top = list(prof[label].items())[:6]
        total = sum(prof[label].values())
        lines.append(f"- {label} ({total:.0f} ms): " + ", ".join(f"{op} {ms:.0f}" for op, ms in top))
    return "\n".join(lines)


def _accuracy_table(r: dict) -> list[str]:
    lines = ["| variant | what | calib. decisions changed | calib. AUROC (FP32) | test AUROC (FP32) | "
             "test decisions changed | max calib. score error |", "|---|---|---|---|---|---|---|"]
    for label, what in r["variants"].items():
        c, t = r["accuracy"][label]["calibration"], r["accuracy"][label]["test"]
        lines.append(f"| {label} | {what} | {c['decision_flips']} / {c['images']} | {c['auroc']:.4f} "
                     f"({c['auroc_fp32']:.4f}) | {t['auroc']:.4f} ({t['auroc_fp32']:.4f}) | "
                     f"{t['decision_flips']} / {t['images']} | {c['max_abs_score_error']:.3g} "
                     f"({c['max_rel_score_error']:.2%}) |")
    return lines


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_int8", "f16c")
                return " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    raise SystemExit(main())
