"""Where the pipeline's time goes: CPU seconds per frame, per thread, next to the model alone.

On a small box every cycle the pipeline spends outside the engine is taken from the engine
(ONNX Runtime uses all cores), so `pipeline_fps / model_fps` is about the CPU the rest costs.
This runs the model alone, then the pipeline (as `linegate bench` does: preloaded frames ->
Pipeline -> ZeroMQ -> a subscriber process), and reads each thread's CPU time from
/proc/self/task (Linux): the inference thread (it calls ONNX Runtime and computes with its
pool), ONNX Runtime's and ZeroMQ's native threads, the source thread (preprocessing), the
publishing thread (decisions, overlays, messages), and the subscriber process. It also times
each Python stage alone, per frame.

With --replay the engine costs next to nothing: it hands back the model's own outputs for
each frame, computed once before the runs. The decisions and overlays are the model's, so
the pipeline does the same work, and its img/s is then the pipeline's own ceiling on this box.

    python -m benchmarks.pipeline_cpu BUNDLE [--images DIR] [--batch 8] [--frames 480] [--replay] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.bench import Bench, _start_receiver, _free_endpoint, load_frames, steady_fps

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def own_cpu() -> float:
    """CPU seconds of this whole process, threads that ended included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _groups(before: dict[int, float], after: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    groups: dict[str, float] = {}
    for tid, cpu in after.items():
        name = names.get(tid)
        if name is None:
            name = "native threads (ONNX Runtime pool, ZeroMQ I/O)"
        elif name.startswith("source-"):
            name = "source thread (preprocess)"
        elif name == "MainThread":
            name = "publishing thread (decide, overlays, publish)"
        elif name == "inference":
            name = "inference thread (batching, ONNX Runtime caller)"
        groups[name] = groups.get(name, 0.0) + cpu - before.get(tid, 0.0)
    return groups


class ReplayEngine:
    """The model's outputs for a fixed set of input tensors, looked up by content: an engine
    whose call costs a dictionary lookup per frame. Inputs it was not given are an error.
    A blank frame is one it is given: the pipeline warms its engine up on zeros."""

    def __init__(self, engine, tensors: np.ndarray) -> None:
        tensors = np.concatenate([tensors, np.zeros_like(tensors[:1])])
        scores, maps = engine.infer(tensors)
        self.outputs = {self._key(t): (s, m) for t, s, m in zip(tensors, scores, maps)}
        if len(self.outputs) != len(tensors):
            raise ValueError("two frames have the same pixels where the replay engine looks; give different frames")

    @staticmethod
    def _key(tensor: np.ndarray) -> bytes:
        return tensor[:, ::7, ::5].tobytes()  # a strided sample: cheap, and differs between frames

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        try:
            pairs = [self.outputs[self._key(t)] for t in batch]
        except KeyError:
            raise KeyError("the replay engine was given a frame it has no output for") from None
        return np.array([s for s, _ in pairs]), np.stack([m for _, m in pairs])


def _per_frame_ms(fn, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1000.0


def stage_costs(bundle, frames: list[np.ndarray], maps: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """CPU ms per frame of each Python stage, timed alone (one thread)."""
    from edge.decision import DecisionRule
    from edge.images import preprocess
    from edge.overlay import encode_jpeg, render_overlay
    from edge.publisher import pack_header

    rule = DecisionRule.from_bundle(bundle)
    size = bundle.input_size
    decisions = rule.decide(scores, maps)
    image, amap, decision = frames[0], maps[0], decisions[0]
    header = {"camera_id": "cam0", "frame_id": 1, "capture_ts": time.time(), "score": 1.0, "score_norm": 0.5,
              "threshold": 1.0, "decision": "reject", "aggregate": "mean", "source": "frame1", "label": None,
              "batch": 3, "v": 1, "topic": "decision", "seq": 7, "publish_ts": time.time(), "model_id": "x"}
    overlay = render_overlay(image, amap, bundle.display_range, decision, upsample=bundle.map_upsample)
    n = 200
    return {
        "copy frame (source)": _per_frame_ms(lambda: image.copy(), n),
        "preprocess (resize + CHW float32)": _per_frame_ms(lambda: preprocess(image, size, bundle.interpolation), n),
        "decide (per frame, batch of %d)" % len(scores): _per_frame_ms(lambda: rule.decide(scores, maps), n) / len(scores),
        "render overlay": _per_frame_ms(lambda: render_overlay(image, amap, bundle.display_range, decision,
                                                                upsample=bundle.map_upsample), n),
        "encode overlay JPEG": _per_frame_ms(lambda: encode_jpeg(overlay, 85), n),
        "pack a decision header (msgpack)": _per_frame_ms(lambda: pack_header(header), n * 10),
    }


def main(argv: list[str] | None = None) -> int:
    from edge.bundle import load_bundle
    from edge.decision import DecisionRule
    from edge.engine import OnnxRuntimeEngine
    from edge.images import preprocess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replay", action="store_true",
                        help="the engine replays the model's outputs: the pipeline's own ceiling")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    size = bundle.input_size
    frames, desc = load_frames(args.images, size, 64)
    engine = OnnxRuntimeEngine.from_bundle(bundle)
    if args.replay:
        engine = ReplayEngine(engine, np.stack([preprocess(f, size, bundle.interpolation) for f in frames]))
    x = np.stack([preprocess(frames[i % len(frames)], size, bundle.interpolation) for i in range(args.batch)])
    scores, maps = engine.infer(x)
    endpoint = _free_endpoint()
    proc, conn = _start_receiver(endpoint)
    rows = []
    try:
        bench = Bench(bundle, DecisionRule.from_bundle(bundle), frames, endpoint, conn)
        for r in range(args.rounds):
            # the model alone, same frames count
            names = {t.native_id: t.name for t in threading.enumerate()}
            before, wall = thread_cpu(), time.perf_counter()
            for _ in range(args.frames // args.batch):
                engine.infer(x)
            wall = time.perf_counter() - wall
            model = {"fps": args.frames // args.batch * args.batch / wall,
                     "cpu_ms_per_frame": 1000 * sum(_groups(before, thread_cpu(), names).values()) / args.frames}
            # the pipeline
            sub_before, own_before = process_cpu(proc.pid), own_cpu()
            before = thread_cpu()
            names_during: dict[int, str] = {}
            latest: dict[int, float] = {}

            def remember() -> None:  # threads that end take their /proc entry with them: sample often
                names_during.update({t.native_id: t.name for t in threading.enumerate()})
                latest.update(thread_cpu())
            sampler_id: list[int] = []
            rec = bench.pipeline(engine, args.batch, args.frames,
                                 during=lambda: (sampler_id or sampler_id.append(threading.get_native_id()), remember()),
                                 every_s=0.05)
            latest.update(thread_cpu())
            names_during.update({t.native_id: t.name for t in threading.enumerate()})
            for tid in sampler_id:  # the sampling thread is the measurement, not the pipeline
                names_during[tid] = "bench sampler (not the pipeline)"
            groups = _groups(before, latest, names_during)
            groups["not attributed (threads that ended between samples)"] = \
                own_cpu() - own_before - sum(groups.values())
            n = len(rec["receipt_ts"])
            pipeline = {"fps": steady_fps(rec["receipt_ts"], 2 * args.batch), "frames": n,
                        "overlay_fraction": round(rec["overlays"] / max(n, 1), 3),
                        "cpu_ms_per_frame": {k: round(1000 * v / n, 3) for k, v in groups.items()},
                        "subscriber_process_cpu_ms_per_frame": round(1000 * (process_cpu(proc.pid) - sub_before) / n, 3)}
            pipeline["cpu_ms_per_frame_total"] = round(sum(pipeline["cpu_ms_per_frame"].values()), 3)
            rows.append({"model": model, "pipeline": pipeline,
                         "pipeline_over_model": round(pipeline["fps"] / model["fps"], 3)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        conn.send(("stop",))
        proc.wait(5)
    result = {"bundle": str(args.bundle), "frames": desc, "frame_shape": list(frames[0].shape), "batch": args.batch,
              "engine": "replay (the model's outputs, looked up)" if args.replay else "onnxruntime",
              "rounds": rows, "stage_cpu_ms_per_frame": stage_costs(bundle, frames, maps, scores),
              "pipeline_over_model_median": float(np.median([r["pipeline_over_model"] for r in rows]))}
    print(json.dumps(result["stage_cpu_ms_per_frame"], indent=1))
    print("pipeline / model (median of rounds):", result["pipeline_over_model_median"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
