"""ONNX Runtime engine settings, A/B: spinning between calls, or intra-op thread counts.

- spinning (the default comparison): the worker threads keep spinning after each call (ONNX
  Runtime's default, `[engine] spin_between_calls = true`) or stop when it returns
  (linegate's default, edge.engine.session_options);
- `--threads 16,14,12`: how many intra-op threads the engine gets (`[engine] threads`). On a
  box with many cores ONNX Runtime takes them all by default, and the pipeline's own threads
  (sources, publishing) then run on cores its parallel sections are waiting for.

Several engines on one bundle in one process, their runs interleaved round by round so that
a noisy spell of the machine hits them alike:
- latency: the real pipeline (edge.pipeline, as `linegate bench` runs it: frames from memory,
  a subscriber in another process) at a fixed offered rate, for each max_wait_ms; p50 / p99
  over every frame of every round;
- throughput: the model alone and the pipeline, closed loop, at batch 1 and 8; per round each
  setting's img/s over the first setting's, and their median.

    python -m benchmarks.engine_ab RUN/bundle --images ../shared/datasets/pillqc --rounds 5 \\
        --out benchmarks/results/spin_ab_padim
    python -m benchmarks.engine_ab RUN/bundle --images DIR --threads 16,14,12 --rate 240 --out threads_ab

Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from benchmarks import bench as B

SPIN = {"spin": {"spin_between_calls": True}, "stop": {"spin_between_calls": False}}


def settings(threads: list[int] | None) -> dict[str, dict]:
    """Setting name -> OnnxRuntimeEngine keyword arguments; the first is the baseline."""
    if threads is None:
        return SPIN
    return {f"{n} thread{'s' * (n != 1)}": {"threads": n} for n in threads}


def thread_counts(text: str) -> list[int]:
    """--threads: two or more different positive counts, e.g. 16,14,12."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if len(counts) < 2 or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected two or more different positive thread counts, e.g. 16,14,12; "
                                         f"got {text!r}")
    return counts


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from edge.bundle import load_bundle
    from edge.decision import DecisionRule
    from edge.engine import OnnxRuntimeEngine
    from edge.images import preprocess

    bundle = load_bundle(args.bundle)
    frames, frames_desc = B.load_frames(args.images, bundle.input_size, 64)
    tensors = np.stack([preprocess(f, bundle.input_size, bundle.interpolation) for f in frames])
    compared = settings(args.threads)
    engines = {name: OnnxRuntimeEngine.from_bundle(bundle, **kwargs) for name, kwargs in compared.items()}
    waits = [float(w) for w in args.wait_ms.split(",")]
    latency = {(name, w): [] for name in engines for w in waits}
    throughput: dict[tuple[str, int, str], list[float]] = {}
    endpoint = B._free_endpoint()
    proc, conn = B._start_receiver(endpoint)
    try:
        bench = B.Bench(bundle, DecisionRule.from_bundle(bundle), frames, endpoint, conn)
        for engine in engines.values():
            bench.pipeline(engine, 8, 160)  # warm-up: every batch size, the subscriber connected
        for _ in tqdm(range(args.rounds), desc="engine A/B", unit="round", file=sys.stderr):
            for batch in (1, 8):
                x = np.ascontiguousarray(tensors[np.arange(batch) % len(tensors)])
                for name, fps in B._rounds({n: e.infer for n, e in engines.items()}, x, args.seconds).items():
                    throughput.setdefault((name, batch, "model"), []).append(fps)
                for name, engine in engines.items():
                    rec = bench.pipeline(engine, batch, batch * max(B.MIN_PIPELINE_BATCHES, 160 // batch))
                    throughput.setdefault((name, batch, "pipeline"), []).append(B.batch_fps(rec["receipt_ts"], rec["batch"]))
            for name, engine in engines.items():
                for w in waits:
                    rec = bench.pipeline(engine, 8, int(args.rate * args.latency_seconds), fps=args.rate, max_wait_ms=w)
                    # the first second (or fifth) warms up, as in `linegate bench`
                    latency[(name, w)].append(B._latencies(rec, warmup_s=min(1.0, args.latency_seconds / 5)))
    finally:
        conn.send(("stop",))
        proc.wait(10)
    result = {"bundle": str(Path(args.bundle).resolve()), "model_id": bundle.model_id, "frames": frames_desc,
              "command": args.command_line, "machine": B.machine(), "rounds": args.rounds,
              "compared": "threads" if args.threads else "spinning", "settings": compared,
              "offered_fps": args.rate, "latency_ms": {}, "throughput": []}
    for (name, w), per_round in latency.items():
        summary = B.latency_summary(np.concatenate(per_round))
        summary["p99_over_p50_rounds"] = [B.latency_summary(ms).get("p99_over_p50") for ms in per_round]
        result["latency_ms"].setdefault(f"{w:g}", {})[name] = summary
    first = next(iter(compared))
    for batch in (1, 8):
        for stage in ("model", "pipeline"):
            fps = {n: np.array(throughput[(n, batch, stage)]) for n in compared}
            result["throughput"].append({
                "batch": batch, "stage": stage,
                "fps": {n: round(float(np.median(f)), 1) for n, f in fps.items()},
                "over_first_rounds": {n: [round(float(r), 3) for r in f / fps[first]] for n, f in fps.items() if n != first},
                "over_first": {n: round(float(np.median(f / fps[first])), 3) for n, f in fps.items() if n != first}})
    return result


def markdown(result: dict) -> str:
    names = list(result["settings"])
    what = {"spinning": "ONNX Runtime's threads spinning between calls, or not",
            "threads": "ONNX Runtime's intra-op thread count"}[result["compared"]]
    lines = [f"# {what}: A/B", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
             f"{result['rounds']} rounds, the engines' runs interleaved in each; frames: {result['frames']}", "",
             f"## Latency, capture -> subscriber receipt at {result['offered_fps']:g} img/s (max_batch 8)", "",
             "| max_wait_ms | setting | p50 ms | p95 ms | p99 ms | max ms | p99 / p50 (all) | per round |",
             "|---|---|---|---|---|---|---|---|"]
    for wait, by_name in result["latency_ms"].items():
        for name, s in by_name.items():
            rounds = ", ".join(f"{r:.2f}" for r in s["p99_over_p50_rounds"] if r is not None)
            lines.append(f"| {wait} | {name} | {s['p50']:.1f} | {s['p95']:.1f} | {s['p99']:.1f} | {s['max']:.1f} "
                         f"| {s['p99_over_p50']:.2f} | {rounds} |")
    lines += ["", f"## Throughput, closed loop (img/s, median of rounds; ratios over {names[0]}, median and per round)",
              "", "| batch | stage | " + " | ".join(names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |",
              "|---" * (1 + 2 * len(names)) + "|"]
    for t in result["throughput"]:
        ratios = [f"{t['over_first'][n]:.3f} ({', '.join(f'{r:.2f}' for r in t['over_first_rounds'][n])})"
                  for n in names[1:]]
        lines.append(f"| {t['batch']} | {t['stage']} | " + " | ".join(str(t["fps"][n]) for n in names) + " | "
                     + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", help="model bundle directory (RUN/bundle)")
    p.add_argument("--images", help="image folder for the frames (default: synthetic parts)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="closed-loop model time per engine, batch and round")
    p.add_argument("--rate", type=float, default=60.0, help="offered img/s for latency (default 60)")
    p.add_argument("--latency-seconds", type=float, default=10.0, help="per engine, max_wait_ms and round")
    p.add_argument("--wait-ms", default="0,5", help="max_wait_ms values (default 0,5)")
    p.add_argument("--threads", type=thread_counts, help="compare these intra-op thread counts (e.g. 16,14,12) instead of spinning")
    p.add_argument("--out", default="engine_ab", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    args.command_line = "python -m benchmarks.engine_ab " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(out.with_suffix(".json"), out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
