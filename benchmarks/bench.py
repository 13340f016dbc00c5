"""`linegate bench BUNDLE`: throughput, latency and memory of a bundle, measured in one run.

What it measures, for every engine and precision the bundle holds (manifest `files`):
(a) the backbone alone: the model's own graph cut where the detector head begins (the nodes
    the exporter placed under the `backbone` module and everything they depend on), in the
    same runtime and precision: the ceiling for this machine (DESIGN.md, performance model);
(b) the whole model, through the runtime's engine;
(c) the whole pipeline: frames preloaded in memory (no decode, no disk: the source never
    limits) -> edge.pipeline.Pipeline (preprocess, batch, engine, decide, overlays at the
    default policy, publish) -> ZeroMQ over tcp 127.0.0.1 -> a Subscriber in another process;
each in img/s at each batch size (the pipeline's over whole engine batches), the stages
taking turns in short rounds so that load from other processes hits them alike (the median
round counts). Then, for the first engine:
(d) latency from capture (when the frame was due on the source's schedule) to the
    subscriber's receipt at a fixed offered frame rate (`--rate`, default half the measured
    pipeline throughput), p50/p95/p99/max over every frame of every round, for each max_wait_ms,
    beside three floors measured in the same rounds: the engine called alone on one frame at
    that rate (this box's jitter as the engine meets it), the engine fed by the runtime's
    batcher alone at that rate and max_wait_ms (the queueing any pipeline on this engine has:
    no source, no decisions, no publishing, no subscriber), and fixed single-thread arithmetic
    sized like one engine call (the machine's jitter with no model in it); with each run, the
    share of CPU time the hypervisor took (/proc/stat's steal, on a VM) and, for the pipeline,
    how many of its slowest frames were in flight while it did (benchmarks/steal.py);
(e) resident memory of the process during a soak at that rate (`--soak-seconds`).

Writes OUT/bench.json, OUT/bench.md (tables, the ratios to the limit, the issue's targets) and
OUT/throughput.png, OUT/latency.png, OUT/memory.png. On a shared machine compare ratios from
one run, not absolute numbers across runs.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import shlex
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.backbone_graph import write_backbone_graph
from benchmarks.bench_report import write_results
from benchmarks.steal import TICK_MS, StealSampler, read_cpu_times, steal_fraction, tail_overlap
from edge.stats import STAGES

log = logging.getLogger(__name__)

PERCENTILES = (50, 95, 99)
MIN_PIPELINE_BATCHES = 20  # per pipeline throughput run (the first batch only starts the clock)


def ort_session(path: Path, threads: int | None, providers: list[str], spin_between_calls: bool = False):
    import onnxruntime as ort

    from edge.engine import session_options  # as the engine's own session

    return ort.InferenceSession(str(path), session_options(threads, spin_between_calls), providers=providers)


# -- frames -----------------------------------------------------------------------------------

def load_frames(images: str | None, size: tuple[int, int], limit: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """RGB uint8 frames in memory: image files under `images` (searched recursively, spread
    evenly over the sorted list), else synthetic parts (30% defective)."""
    if images:
        from edge.images import IMAGE_SUFFIXES, ImageReadError, read_image

        root = Path(images)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
        picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(limit, len(files)))]
        frames = []
        for path in picks:
            try:
                frames.append(read_image(path))
            except ImageReadError as exc:
                log.warning("skipped %s: %s", path, exc)
        if not frames:
            raise ValueError(f"--images {images}: none of the images could be read")
        return frames, f"{len(frames)} images from {root}"
    from edge.synthetic import PartGenerator

    gen = PartGenerator(size=size[0], seed=seed)
    return [gen.sample(0.3)[0] for _ in range(limit)], f"{limit} synthetic parts (30% defective)"


def _preloaded_source_class():
    from edge.sources import Source

    class PreloadedSource(Source):
        """Frames from memory, each a fresh copy as a capture buffer would be; paced at
        `fps` against a schedule when given, else as fast as the pipeline takes them.

        Paced, a frame's capture time is when it was due, not when this thread woke up to
        hand it over: a camera exposes on its own clock, and a reader that wakes late (two
        busy cores, the GIL) is part of the latency, not a reason to restart the clock.
        `late_s` keeps how late each hand-over was."""

        def __init__(self, images: list[np.ndarray], count: int, fps: float | None = None,
                     camera_id: str = "bench") -> None:
            super().__init__(camera_id)
            self.images, self.count, self.fps = images, count, fps
            self.late_s: list[float] = []

        def frames(self, stop: threading.Event):
            self.state = "running"
            wall0, mono0 = time.time(), time.monotonic()
            due = mono0
            for i in range(self.count):
                if self.fps:
                    if stop.wait(max(0.0, due - time.monotonic())):
                        return
                elif stop.is_set():
                    return
                frame = self._stamp(self.images[i % len(self.images)].copy(), source_name=f"frame{i}")
                if self.fps:
                    self.late_s.append(time.monotonic() - due)
                    frame.capture_ts = wall0 + (due - mono0)
                    due += 1.0 / self.fps
                yield frame
            self.state = "ended"

    return PreloadedSource


# -- measuring --------------------------------------------------------------------------------

@dataclass
class Target:
    """One engine/precision of the bundle: the whole model, and its backbone alone."""
    key: str  # e.g. "onnxruntime/fp32"
    engine: object
    backbone: Callable[[np.ndarray], object] | None


@dataclass
class Bench:
    bundle: object
    rule: object
    frames: list[np.ndarray]
    endpoint: str
    receiver: object  # multiprocessing Connection to benchmarks.receiver
    overlay_accepts_every: int = 0
    runs: itertools.count = field(default_factory=itertools.count)

    def pipeline(self, engine, batch: int, count: int, fps: float | None = None, max_wait_ms: float = 5.0,
                 during: Callable[[], None] | None = None, every_s: float = 1.0) -> dict:
        """One pipeline run of `count` frames to the subscriber process; its records.
        `during` is called every `every_s` seconds while it runs."""
        from edge.pipeline import Pipeline, RunOptions

        tag = f"{self.bundle.model_id}#bench{next(self.runs)}"
        publisher = _bind_publisher(self.endpoint, tag)
        options = RunOptions(max_batch=batch, max_wait_ms=max_wait_ms, wait_subscribers=3, wait_timeout_s=30,
                             overlay_accepts_every=self.overlay_accepts_every)
        source = _preloaded_source_class()(self.frames, count, fps)
        pipeline = Pipeline(self.bundle, engine, self.rule, [source], publisher, options)
        expected_s = count / fps if fps else count / 5.0  # generous: >= 5 img/s
        self.receiver.send(("collect", tag, count, expected_s * 2 + 60))
        stop_sampling = threading.Event()
        sampler = None
        if during is not None:
            sampler = threading.Thread(target=_every, args=(during, every_s, stop_sampling), daemon=True)
            sampler.start()
        summary = pipeline.run()
        stop_sampling.set()
        if sampler is not None:
            sampler.join()
        if not self.receiver.poll(expected_s * 2 + 90):
            raise RuntimeError("the subscriber process did not report back")
        rec = self.receiver.recv()
        rec["summary"] = {"frames": summary.frames, "rejects": summary.rejects, "errors": summary.errors,
                          "batches": summary.batches, "seconds": round(summary.seconds, 3)}
        rec["source_late_ms"] = np.asarray(source.late_s) * 1000.0
        return rec


def _every(fn: Callable[[], None], interval_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        fn()


def _bind_publisher(endpoint: str, tag: str):
    """A publisher on the bench's fixed endpoint; the last run's socket may still be closing."""
    from edge.publisher import EndpointInUse, Publisher

    for attempt in range(50):
        try:
            return Publisher(endpoint, model_id=tag, run_id=tag)  # the receiver tells runs apart by run_id
        except EndpointInUse:
            if attempt == 49:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def steady_fps(receipt_ts: np.ndarray, skip: int) -> float:
    """Frames per second at the subscriber, after the first `skip` frames (start-up)."""
    t = np.sort(receipt_ts)
    if len(t) <= skip + 1:
        skip = 0
    span = t[-1] - t[max(skip - 1, 0)]
    return float((len(t) - max(skip, 1)) / span) if span > 0 else 0.0


def batch_fps(receipt_ts: np.ndarray, batch_ids: np.ndarray) -> float:
    """Frames per second at the subscriber over whole engine batches: from the receipt of the
    first batch's last frame to that of the last batch, counting the frames of every batch
    after the first. Counting from a frame index instead would, when the first batch is
    partial (the batcher sends what it has after max_wait), time frames of one burst with
    nothing behind them: +11% in the test's run of 9, 6 x 16 and 7 frames."""
    ids, batch_of = np.unique(batch_ids, return_inverse=True)
    if len(ids) < 2:
        return steady_fps(receipt_ts, 0)
    ends = np.full(len(ids), -np.inf)
    np.maximum.at(ends, batch_of, receipt_ts)  # each batch's last receipt
    first = int(np.argmin(ends))
    frames = len(receipt_ts) - int(np.count_nonzero(batch_of == first))
    span = ends.max() - ends[first]
    return float(frames / span) if span > 0 else 0.0


def latency_summary(ms: np.ndarray) -> dict:
    if not len(ms):
        return {"n": 0}
    p50, p95, p99 = np.percentile(ms, PERCENTILES)
    return {"n": int(len(ms)), "p50": round(float(p50), 2), "p95": round(float(p95), 2),
            "p99": round(float(p99), 2), "max": round(float(ms.max()), 2),
            "p99_over_p50": round(float(p99 / p50), 3) if p50 > 0 else None}


def stage_latency(stats: list[dict]) -> dict:
    """Median over the run's stats intervals of each pipeline stage's p50 and p99 (ms)."""
    out = {}
    for stage in STAGES:
        windows = [s["latency_ms"][stage] for s in stats if (s.get("latency_ms") or {}).get(stage)]
        if windows:
            out[stage] = {"p50": round(float(np.median([w["p50"] for w in windows])), 2),
                          "p99": round(float(np.median([w["p99"] for w in windows])), 2)}
    return out


def rss_mb() -> float:
    """Resident memory of this process (VmRSS), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource  # not Linux: peak RSS is the best there is

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0)


def machine() -> dict:
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("onnxruntime", "onnxruntime-gpu", "numpy", "opencv-python-headless", "opencv-python", "pyzmq",
                 "msgpack", "onnx", "torch", "tensorrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": usable_cores(), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the host has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _start_receiver(endpoint: str):
    """The subscriber process (benchmarks.receiver) and our end of its control connection.
    A plain subprocess, not multiprocessing: it must not re-import the caller's __main__."""
    import subprocess
    from multiprocessing.connection import Connection

    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.receiver", endpoint, str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    conn = Connection(ours.detach())
    if not conn.poll(120) or conn.recv() != "ready":
        proc.kill()
        raise RuntimeError("the subscriber process (benchmarks.receiver) did not start")
    return proc, conn


def _targets(bundle, args, tmp: Path) -> tuple[list[Target], dict]:
    from edge.engine import OnnxRuntimeEngine, open_engine

    targets, skipped = [], {}
    wanted = set(args.precision.split(",")) if args.precision else None
    for m in bundle.models():
        engine_kind = "onnxruntime" if m.kind == "onnx" else m.kind
        key = f"{engine_kind}/{m.precision}"
        if wanted and m.precision not in wanted:
            continue
        if m.kind == "onnx":
            engine = OnnxRuntimeEngine.from_bundle(bundle, m.name, threads=args.threads,
                                                   spin_between_calls=args.spin_between_calls)
            engine.precision = m.precision
            cut = tmp / f"backbone.{m.name}"
            try:
                outputs = write_backbone_graph(bundle.path / m.name, cut)
            except ValueError as exc:
                skipped[f"backbone {key}"] = f"{m.name}: {exc}"
                log.warning("%s: backbone alone not measured: %s", key, exc)
                targets.append(Target(key, engine, None))
                continue
            session = ort_session(cut, args.threads, engine.session.get_providers(), args.spin_between_calls)
            name = session.get_inputs()[0].name
            targets.append(Target(key, engine, lambda x, s=session, n=name: s.run(None, {n: x})))
            log.info("%s: %s, backbone alone = the graph up to %s", key, m.name, ", ".join(outputs))
        else:
            try:
                engine = open_engine(bundle, m.kind, m.precision)
            except Exception as exc:  # noqa: BLE001 - no GPU here: say so in the results
                skipped[key] = str(exc)
                log.warning("%s: skipped: %s", key, exc)
                continue
            # the backbone alone would need its own engine build; the model and pipeline are measured
            skipped[f"backbone {key}"] = (f"{m.name}: the backbone alone of a TensorRT engine needs an engine "
                                          "built from the cut graph; not measured (model and pipeline are)")
            targets.append(Target(key, engine, None))
    return targets, skipped


def _rounds(fns: dict[str, Callable[[np.ndarray], object]], batch: np.ndarray, seconds: float,
            turn_s: float = 1.0) -> dict[str, float]:
    """One round: each function for `seconds` in all, taking turns of about `turn_s`; img/s each.
    Each turn starts with one untimed call: the first run after another session ran pays for
    its caches and thread pool (~10% at 0.5 s turns, measured), which a steady stream doesn't."""
    images = dict.fromkeys(fns, 0)
    spent = dict.fromkeys(fns, 0.0)
    while min(spent.values()) < seconds:
        for name, fn in fns.items():
            if spent[name] >= seconds:
                continue
            fn(batch)
            start = time.perf_counter()
            while True:
                fn(batch)
                images[name] += len(batch)
                elapsed = time.perf_counter() - start
                if elapsed >= min(turn_s, seconds - spent[name]):
                    break
            spent[name] += elapsed
    return {name: images[name] / spent[name] for name in fns}


def run_bench(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from edge.bundle import load_bundle
    from edge.decision import DecisionRule
    from edge.images import preprocess

    started = time.time()
    bundle = load_bundle(args.bundle)
    size = bundle.input_size
    frames, frames_desc = load_frames(args.images, size, args.max_images)
    tensors = np.stack([preprocess(f, size, bundle.interpolation) for f in frames])
    batches = sorted({int(b) for b in args.batches.split(",")})
    waits = [float(w) for w in args.wait_ms.split(",")]
    result: dict = {
        "bundle": str(Path(args.bundle).resolve()), "model_id": bundle.model_id,
        "detector": bundle.manifest.get("detector"), "input": list(size),
        "command": args.command_line,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"batches": batches, "seconds": args.seconds, "rounds": args.rounds, "frames": frames_desc,
                     "frame_shape": list(frames[0].shape), "overlay_accepts_every": args.overlay_accepts,
                     "max_wait_ms": waits, "soak_seconds": args.soak_seconds, "threads": args.threads,
                     "spin_between_calls": args.spin_between_calls},
        "machine": machine(),
        "limit": "backbone alone: the model's own graph cut where the head begins, same runtime and precision",
        "backbone_fps": {}, "model_fps": {}, "pipeline_fps": {}, "ratios": {}, "rounds": {}, "pipeline": {},
    }
    endpoint = _free_endpoint()
    proc, conn = _start_receiver(endpoint)
    try:
        with tempfile.TemporaryDirectory(prefix="linegate-bench-") as tmp:
            targets, skipped = _targets(bundle, args, Path(tmp))
            result["skipped"] = skipped
            if not targets:
                raise ValueError(f"{args.bundle}: nothing to measure here ({skipped or 'no model matches --precision'})")
            bench = Bench(bundle, DecisionRule.from_bundle(bundle), frames, endpoint, conn, args.overlay_accepts)
            slice_s = args.seconds / args.rounds
            steps = len(batches) * args.rounds + args.latency_rounds * (2 * len(waits) + 2) + (1 if args.soak_seconds > 0 else 0)
            with tqdm(total=steps, desc="bench", unit="step", file=sys.stderr) as bar:
                for batch in batches:
                    x = np.ascontiguousarray(tensors[np.arange(batch) % len(tensors)])
                    fns: dict[str, Callable] = {}
                    for t in targets:
                        if t.backbone is not None:
                            fns[f"backbone {t.key}"] = t.backbone
                        fns[f"model {t.key}"] = t.engine.infer
                    for fn in fns.values():  # warm-up: first runs allocate
                        fn(x)
                    per_round: dict[str, list[float]] = {name: [] for name in fns}
                    per_round.update({f"pipeline {t.key}": [] for t in targets})
                    details: dict[str, list[dict]] = {t.key: [] for t in targets}
                    for r in range(args.rounds):
                        bar.set_description(f"bench batch {batch} round {r + 1}/{args.rounds}")
                        for name, fps in _rounds(fns, x, slice_s).items():
                            per_round[name].append(fps)
                        for t in targets:
                            expect = max(per_round[f"model {t.key}"][-1], 1.0)
                            # whole batches, and enough of them that the first (timed from) is a
                            # small part of the run
                            count = batch * max(MIN_PIPELINE_BATCHES, round(expect * slice_s / batch))
                            rec = bench.pipeline(t.engine, batch, count)
                            per_round[f"pipeline {t.key}"].append(batch_fps(rec["receipt_ts"], rec["batch"]))
                            details[t.key].append(rec)
                        bar.update()
                    _store_batch(result, batch, per_round, details)
                    bar.write(_batch_line(result, batch))
                first = targets[0]
                lat_batch = args.latency_batch
                base_fps = result["pipeline_fps"][first.key].get(str(lat_batch))
                if base_fps is None:
                    rec = bench.pipeline(first.engine, lat_batch, max(MIN_PIPELINE_BATCHES * lat_batch, 200))
                    base_fps = batch_fps(rec["receipt_ts"], rec["batch"])
                rate = args.rate or round(0.5 * base_fps, 1)
                result["latency_ms"] = {"engine": first.key, "batch": lat_batch, "offered_fps": rate,
                                        "rate_from": "--rate" if args.rate else f"half the pipeline's {base_fps:.1f} img/s",
                                        "rounds": args.latency_rounds, "seconds_per_round": args.latency_seconds,
                                        "by_max_wait_ms": {}, "batcher_alone": {}, "steal_tick_ms": TICK_MS}
                samples, round_ratios = _measure_latency(bench, first, lat_batch, rate, waits, args, bar, tensors)
                for name, ms in samples.items():
                    summary = latency_summary(np.concatenate(ms["latency"]))
                    ratios = [r for r in round_ratios[name] if r is not None]
                    summary.update(p99_over_p50_rounds=ratios,
                                   p99_over_p50_median=round(float(np.median(ratios)), 3) if ratios else None,
                                   **{k: v for k, v in ms.items() if k != "latency"})
                    if name == ENGINE_ALONE:
                        result["latency_ms"]["engine_alone"] = summary
                    elif name == MACHINE_ALONE:
                        result["latency_ms"]["machine_alone"] = summary
                    elif name.startswith(BATCHER_ALONE):
                        result["latency_ms"]["batcher_alone"][name.removeprefix(BATCHER_ALONE).strip()] = summary
                    else:
                        result["latency_ms"]["by_max_wait_ms"][name] = summary
                result["_latency_samples"] = {float(k): np.concatenate(samples[k]["latency"])
                                              for k in result["latency_ms"]["by_max_wait_ms"]}
                result["_floor_samples"] = {float(k): np.concatenate(samples[f"{BATCHER_ALONE} {k}"]["latency"])
                                            for k in result["latency_ms"]["batcher_alone"]}
                if args.soak_seconds > 0:
                    bar.set_description(f"bench soak {args.soak_seconds:g} s at {rate:g} img/s")
                    result["rss_mb"] = _soak(bench, first, lat_batch, rate, args.soak_seconds)
                    bar.write(f"soak: RSS {result['rss_mb']['start']} -> {result['rss_mb']['end']} MB "
                              f"({result['rss_mb']['growth_pct']:+.2f}%)")
                    bar.update()
    finally:
        conn.send(("stop",))
        try:
            proc.wait(5)
        except Exception:  # noqa: BLE001 - it is ours; don't leave it behind
            proc.kill()
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result["duration_s"] = round(time.time() - started, 1)
    return result


def _windows(rec: dict, warmup_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(capture, receipt) times of a run's frames, those captured in its first `warmup_s` left out."""
    capture, receipt = rec["capture_ts"], rec["receipt_ts"]
    if not len(capture):
        return np.empty(0), np.empty(0)
    keep = capture >= capture.min() + warmup_s
    return capture[keep], receipt[keep]


def _latencies(rec: dict, warmup_s: float) -> np.ndarray:
    capture, receipt = _windows(rec, warmup_s)
    return (receipt - capture) * 1000.0


ENGINE_ALONE = "engine alone"  # one frame per call, nothing queued: the engine's jitter here
BATCHER_ALONE = "batcher alone"  # prefix: the engine fed by the batcher alone, per max_wait_ms
MACHINE_ALONE = "machine alone"  # fixed arithmetic sized like one engine call, no model at all


def _measure_latency(bench: Bench, target: Target, batch: int, rate: float, waits: list[float],
                     args: argparse.Namespace, bar, tensors: np.ndarray) -> tuple[dict, dict]:
    """Capture -> subscriber latency at `rate` for each max_wait_ms, and three floors: the engine
    called alone on one frame at the same rate, the engine fed by the batcher alone
    (`_paced_batcher_ms`: its queueing at this rate), and fixed arithmetic sized like one
    engine call (`_paced_work_ms`: the machine's jitter with no model in it), in
    `args.latency_rounds` rounds that take turns, so a noisy spell of the machine hits every
    setting alike; each pipeline setting is followed at once by its batcher-alone floor.
    Returns ({name: {"latency": [ms per round], ...}},
    {name: [p99/p50 per round]}); names: f"{wait:g}", f"{BATCHER_ALONE} {wait:g}", ENGINE_ALONE,
    MACHINE_ALONE."""
    settings = [s for w in waits for s in ((f"{w:g}", "pipeline", w), (f"{BATCHER_ALONE} {w:g}", "batcher", w))]
    settings += [(ENGINE_ALONE, "engine", None), (MACHINE_ALONE, "machine", None)]
    names = [name for name, _, _ in settings]
    samples: dict[str, dict] = {n: {"latency": [], "achieved_fps": [], "lost": 0, "stages": [], "source_late": [],
                                    "steal_pct_rounds": [], "stolen": []} for n in names}
    work = None  # the fixed arithmetic, sized on the first round's engine-alone median
    woke_late: list[np.ndarray] = []  # how late its thread woke, per round
    ratios: dict[str, list] = {n: [] for n in names}
    count = max(20, int(rate * args.latency_seconds))
    warmup_s = min(1.0, args.latency_seconds / 5)
    for r in range(args.latency_rounds):
        for name, kind, wait in settings:
            bar.set_description(f"bench latency {name if kind != 'pipeline' else f'max_wait_ms={name}'} at {rate:g} "
                                f"img/s, round {r + 1}/{args.latency_rounds}")
            cpu_before = read_cpu_times()
            if kind == "engine":
                ms = _paced_engine_ms(target.engine, np.ascontiguousarray(tensors[:1]), rate, count)
            elif kind == "machine":
                if work is None:
                    work = FixedWork(float(np.median(samples[ENGINE_ALONE]["latency"][-1])))
                with StealSampler() as sampler:  # its runs, too, matched with the steal
                    ms, late, began = _paced_work_ms(work, rate, count)
                samples[name]["stolen"].append(sampler.stolen_ms(began, began + ms / 1000.0))
                woke_late.append(late)
            elif kind == "batcher":
                ms = _paced_batcher_ms(target.engine, tensors, rate, count, batch, wait, warmup_s)
            else:
                # each frame matched with the hypervisor's steal in its flight (a sample every 10
                # ms); the engine and batcher floors run without the sampler, nothing else running
                with StealSampler() as sampler:
                    rec = bench.pipeline(target.engine, batch, count, fps=rate, max_wait_ms=wait)
                capture, receipt = _windows(rec, warmup_s=warmup_s)
                ms = (receipt - capture) * 1000.0
                samples[name]["stolen"].append(sampler.stolen_ms(capture, receipt))
                samples[name]["achieved_fps"].append(round(steady_fps(rec["receipt_ts"], 0), 2))
                samples[name]["lost"] += int(count - len(rec["receipt_ts"]))
                samples[name]["stages"].append(stage_latency(rec["stats"]))
                samples[name]["source_late"].append(rec["source_late_ms"])
            share = steal_fraction(cpu_before, read_cpu_times())
            samples[name]["steal_pct_rounds"].append(None if share is None else round(100.0 * share, 2))
            samples[name]["latency"].append(ms)
            ratios[name].append(latency_summary(ms).get("p99_over_p50"))
            bar.update()
        bar.write(f"latency round {r + 1}: p99/p50 " + ", ".join(f"{n} {ratios[n][-1]}" for n in names))
    for name in names:
        s = samples[name]
        stolen = s.pop("stolen")
        if stolen and all(x is not None for x in stolen):
            s["tail_steal"] = tail_overlap(np.concatenate(s["latency"]), np.concatenate(stolen))
        if name == MACHINE_ALONE:
            late = np.concatenate(woke_late)
            s["work_ms"] = round(work.ms, 2) if work else None
            s["woke_late_ms"] = {"p50": round(float(np.percentile(late, 50)), 2),
                                 "p99": round(float(np.percentile(late, 99)), 2), "max": round(float(late.max()), 2)}
            del s["achieved_fps"], s["lost"], s["stages"], s["source_late"]
            continue
        if s["achieved_fps"]:
            s["achieved_fps"] = round(float(np.median(s["achieved_fps"])), 2)
            s["stages"] = s["stages"][-1]
            late = np.concatenate(s["source_late"])
            # how late the source handed frames over (included in the latency, as a late
            # camera reader's delay would be)
            s["source_late_ms"] = {"p50": round(float(np.percentile(late, 50)), 2),
                                   "p99": round(float(np.percentile(late, 99)), 2), "max": round(float(late.max()), 2)}
        else:
            del s["achieved_fps"], s["lost"], s["stages"]
        del s["source_late"]
    return samples, ratios


def _paced_engine_ms(engine, x: np.ndarray, rate: float, count: int) -> np.ndarray:
    """The engine called on one frame at `rate` calls/s, nothing else running: ms per call."""
    out = np.empty(count)
    next_t = time.perf_counter()
    for i in range(count):
        next_t += 1.0 / rate
        time.sleep(max(0.0, next_t - time.perf_counter()))
        started = time.perf_counter()
        engine.infer(x)
        out[i] = (time.perf_counter() - started) * 1000.0
    return out[min(count // 10, int(rate)):]  # the first second (or tenth) warms up


class FixedWork:
    """A fixed piece of single-threaded arithmetic (float32 matrix products, BLAS held to one
    thread) that takes about `ms` on this machine when nothing disturbs it: the same work
    every time, so any spread in how long it takes is the machine's, not linegate's."""

    def __init__(self, ms: float, size: int = 128) -> None:
        from threadpoolctl import threadpool_limits

        self.ms = ms
        self._a = np.random.default_rng(0).random((size, size), dtype=np.float32)
        with threadpool_limits(limits=1, user_api="blas"):
            self._a @ self._a  # warm
            took = []
            for _ in range(5):  # the fastest of five: one disturbed timing would size it short
                started = time.perf_counter()
                for _ in range(20):
                    self._a @ self._a
                took.append((time.perf_counter() - started) / 20)
        self.reps = max(1, round(ms / 1000.0 / min(took)))

    def __call__(self) -> None:
        a = self._a
        for _ in range(self.reps):
            a @ a


def _paced_work_ms(work: Callable[[], None], rate: float,
                   count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`work` done at `rate` per second on a schedule, as `_paced_engine_ms` calls the engine:
    (ms each run took, ms the thread woke after it was due, time.time() when it started), the
    first second (or tenth) left out. This machine's own jitter with no model, runtime or
    pipeline of ours in it."""
    from threadpoolctl import threadpool_limits

    took, late, began = np.empty(count), np.empty(count), np.empty(count)
    wall = time.time() - time.perf_counter()  # perf_counter -> time.time(), for the steal samples
    with threadpool_limits(limits=1, user_api="blas"):
        due = time.perf_counter()
        for i in range(count):
            due += 1.0 / rate
            time.sleep(max(0.0, due - time.perf_counter()))
            started = time.perf_counter()
            late[i] = max(0.0, started - due) * 1000.0
            work()
            took[i] = (time.perf_counter() - started) * 1000.0
            began[i] = wall + started
    skip = min(count // 10, int(rate))
    return took[skip:], late[skip:], began[skip:]


def _paced_batcher_ms(engine, tensors: np.ndarray, rate: float, count: int, max_batch: int,
                      max_wait_ms: float, warmup_s: float) -> np.ndarray:
    """The engine fed by the runtime's own FrameQueue and Batcher: a thread puts ready-made
    input tensors in at `rate` on a schedule, this thread batches them and calls the engine,
    as the pipeline's inference thread does. Nothing else runs: no source reading or
    preprocessing, no decisions, overlays, publishing or subscriber. ms from each frame's due
    time to the end of its engine call, frames due in the first `warmup_s` left out: the
    queueing this engine itself has at this rate and max_wait_ms, what the pipeline's latency
    at the same setting is compared with."""
    from edge.batcher import Batcher, FrameQueue
    from edge.frames import Frame

    queue = FrameQueue(capacity=max(64, 2 * max_batch))
    queue.add_producer()
    start = time.monotonic() + 0.05
    due = start + np.arange(count) / rate

    def feed() -> None:
        try:
            for i in range(count):
                time.sleep(max(0.0, due[i] - time.monotonic()))
                tensor = tensors[i % len(tensors)]
                # the image is never looked at here (no overlays): the tensor stands in for it
                queue.put(Frame("floor", i, time.time(), tensor, tensor=tensor), "queue")
        finally:
            queue.producer_done()

    feeder = threading.Thread(target=feed, name="floor-feeder", daemon=True)
    feeder.start()
    batcher = Batcher(queue, max_batch, max_wait_ms)
    buffer = np.empty((max_batch, *tensors.shape[1:]), np.float32)
    done = np.full(count, np.nan)
    while (batch := batcher.next_batch()) is not None:
        for j, frame in enumerate(batch):
            buffer[j] = frame.tensor
        engine.infer(buffer[:len(batch)])
        done[[f.frame_id for f in batch]] = time.monotonic()
    feeder.join()
    keep = due >= start + warmup_s
    return (done[keep] - due[keep]) * 1000.0


def _soak(bench: Bench, target: Target, batch: int, rate: float, seconds: float) -> dict:
    wall: list[tuple[float, float]] = []  # (time.time(), RSS MB) while the pipeline runs
    before = rss_mb()
    cpu_before = read_cpu_times()
    rec = bench.pipeline(target.engine, batch, max(10, int(rate * seconds)), fps=rate,
                         during=lambda: wall.append((time.time(), rss_mb())))
    stolen_share = steal_fraction(cpu_before, read_cpu_times())
    after = rss_mb()
    # time from the first decision, not from the call: warm-up and waiting for the subscriber
    # are not minutes of the soak
    t0 = float(rec["receipt_ts"].min()) if len(rec["receipt_ts"]) else (wall[0][0] if wall else time.time())
    samples = [(t - t0, mb) for t, mb in wall if t >= t0] or [(time.time() - t0, after)]
    # "start" is after the first minute (or a sixth of a shorter soak): allocators and caches
    # settle; "end" is the last sample while frames still flowed
    settle = min(60.0, seconds / 6)
    start = next((mb for t, mb in samples if t >= settle), samples[-1][1])
    end = samples[-1][1]
    depths = [(s.get("queue_depth") or {}).get("frames", 0) for s in rec["stats"]]
    ms = _latencies(rec, warmup_s=1.0)
    return {"seconds": seconds, "offered_fps": rate, "engine": target.key, "batch": batch,
            "before": round(before, 1), "start_at_s": round(settle, 1), "start": round(start, 1),
            "end": round(end, 1), "growth_pct": round(100.0 * (end - start) / start, 2),
            "peak": round(max(mb for t, mb in samples if t >= settle) if samples[-1][0] >= settle else end, 1),
            "after_run": round(after, 1), "frame_queue_max": max(depths, default=0),
            "decisions": int(len(rec["receipt_ts"])), "gaps": rec["gaps"], "latency_ms": latency_summary(ms),
            "steal_pct": None if stolen_share is None else round(100.0 * stolen_share, 2),
            "samples": [[round(t, 1), round(mb, 1)] for t, mb in samples]}


def _store_batch(result: dict, batch: int, per_round: dict[str, list[float]], details: dict[str, list[dict]]) -> None:
    b = str(batch)
    for name, values in per_round.items():
        stage, key = name.split(" ", 1)
        result[f"{stage}_fps"].setdefault(key, {})[b] = round(float(np.median(values)), 2)
        result["rounds"].setdefault(stage, {}).setdefault(key, {})[b] = [round(v, 2) for v in values]
    for key, recs in details.items():
        frames = sum(len(r["receipt_ts"]) for r in recs)
        result["pipeline"].setdefault(key, {})[b] = {
            "frames": frames, "overlays": sum(r["overlays"] for r in recs),
            "overlay_fraction": round(sum(r["overlays"] for r in recs) / max(frames, 1), 3),
            "overlay_kb_mean": round(sum(r["overlay_bytes"] for r in recs) / max(sum(r["overlays"] for r in recs), 1) / 1024, 1),
            "rejects": sum(r["rejects"] for r in recs), "gaps": sum(r["gaps"] for r in recs),
            "stages_ms": stage_latency([s for r in recs for s in r["stats"]]),
        }
        # Ratios per round (stages measured seconds apart), then the median: steadier than a
        # ratio of medians when the machine's load drifts.
        rounds = {stage: np.asarray(per_round.get(f"{stage} {key}", []), float)
                  for stage in ("backbone", "model", "pipeline")}
        ratios = {}
        for name, num, den in (("model_over_backbone", "model", "backbone"), ("pipeline_over_model", "pipeline", "model"),
                               ("pipeline_over_backbone", "pipeline", "backbone")):
            if len(rounds[num]) and len(rounds[num]) == len(rounds[den]) and rounds[den].min() > 0:
                ratios[name] = round(float(np.median(rounds[num] / rounds[den])), 3)
        result["ratios"].setdefault(key, {})[b] = ratios


def _batch_line(result: dict, batch: int) -> str:
    b = str(batch)
    parts = []
    for key in result["model_fps"]:
        bb = result["backbone_fps"].get(key, {}).get(b)
        parts.append(f"{key} batch {batch}: backbone {bb if bb is not None else '-'} model {result['model_fps'][key][b]} "
                     f"pipeline {result['pipeline_fps'][key][b]} img/s")
    return "; ".join(parts)


# -- command line -----------------------------------------------------------------------------

def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value
    return parse


def _comma_list(kind: type, lowest: float, what: str):
    """argparse type: a comma list of `kind`, each >= lowest; returns the text (parsed later)."""
    def parse(text: str) -> str:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}, not {text!r}") from None
        if not values or min(values) < lowest:
            raise argparse.ArgumentTypeError(f"{what} must be >= {lowest:g}, got {text!r}")
        return text
    return parse


_int_list = _comma_list(int, 1, "batch sizes")
_float_list = _comma_list(float, 0, "max_wait_ms values")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="model bundle directory (e.g. RUN/bundle)")
    p.add_argument("--out", default="bench", help="where bench.json, bench.md and the plots go (default: ./bench)")
    p.add_argument("--batches", type=_int_list, default="1,2,4,8,16", help="batch sizes (default 1,2,4,8,16)")
    p.add_argument("--seconds", type=_positive(float), default=4.0,
                   help="per stage and batch size, split over the rounds (default 4)")
    p.add_argument("--rounds", type=_positive(int), default=2, help="turns the stages take (default 2)")
    p.add_argument("--rate", type=_positive(float), help="offered img/s for latency and soak "
                   "(default: half the pipeline's throughput at --latency-batch)")
    p.add_argument("--latency-batch", type=_positive(int), default=8, help="max_batch for latency and soak (default 8)")
    p.add_argument("--wait-ms", type=_float_list, default="0,5,20", help="max_wait_ms values for latency (default 0,5,20)")
    p.add_argument("--latency-seconds", type=_positive(float), default=10.0,
                   help="per max_wait_ms value and round (default 10)")
    p.add_argument("--latency-rounds", type=_positive(int), default=3,
                   help="latency rounds; the settings take turns in each (default 3)")
    p.add_argument("--soak-seconds", type=float, default=60.0,
                   help="memory soak at the offered rate, 0 = none (default 60; the 5%% growth check needs 600)")
    p.add_argument("--images", help="image folder (searched recursively) for the frames; default: synthetic parts")
    p.add_argument("--max-images", type=_positive(int), default=64, help="frames kept in memory (default 64)")
    p.add_argument("--overlay-accepts", type=int, default=0,
                   help="overlay every Nth accept too (default 0: rejects only, the runtime's default)")
    p.add_argument("--precision", help="only these precisions, e.g. fp32 or fp32,int8 (default: all the bundle holds)")
    p.add_argument("--threads", type=_positive(int), help="ONNX Runtime intra-op threads (default: ONNX Runtime's)")
    p.add_argument("--spin-between-calls", action="store_true",
                   help="ONNX Runtime's threads keep spinning after each call (config [engine] spin_between_calls)")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Entry point for `linegate bench`; `command` (for the report) defaults to this
    process's command line."""
    args.command_line = command or " ".join(shlex.quote(a) for a in ["linegate", *sys.argv[1:]])
    runtime_log = logging.getLogger("edge")
    level = runtime_log.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        runtime_log.setLevel(logging.WARNING)  # one pipeline per step: its start/stop lines are noise here
    try:
        result = run_bench(args)
    finally:
        runtime_log.setLevel(level)
    out = Path(args.out)
    for path in write_results(result, out):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv), " ".join(shlex.quote(a) for a in ["python -m benchmarks.bench", *argv]))


if __name__ == "__main__":
    raise SystemExit(main())
