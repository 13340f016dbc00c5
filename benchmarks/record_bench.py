"""Does the recorder keep up, and does it cost the runtime anything?

    python -m benchmarks.record_bench [--bundle DIR] [--frames 3000] [--pg postgresql://...]

One run measures, on this machine and in one go (so the ratios compare like with like):
  * the runtime's pipeline img/s (`linegate run`, a folder source) with no subscriber, with a
    SQLite recorder attached and with a PostgreSQL recorder attached, each run twice,
    alternating, best kept (the box is shared: the best run is the least disturbed);
  * each recorder's own capacity: decisions (and one overlay per reject) stored per second
    when a real Publisher sends a burst as fast as it can, against the pipeline's rate;
  * that every decision of each pipeline run is on record (rows == the runtime's count).
Without --bundle it uses the tests' tiny bundle: the fastest pipeline there is, so the
hardest case for the recorder. Results: benchmarks/results/record_bench.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _linegate(*args: str) -> list[str]:
    return [sys.executable, "-m", "linegate.cli", *args]


def _free_endpoint() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _parts(folder: Path, n: int, reject_every: int = 3) -> None:
    """n grey 48x54 parts; every third one bright (a reject for the tiny bundle)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        level = 210 if i % reject_every == 0 else 40
        cv2.imwrite(str(folder / f"p{i:05d}.png"), np.full((48, 54, 3), level, np.uint8))


def _count(db: str) -> int:
    """Decisions on record (0 before the recorder made the record)."""
    from lineside.store import StoreError, open_store

    try:
        with open_store(db) as store:
            return store.count("decisions")
    except StoreError:
        return 0


RECORDER_NICE = 10  # as systemd/linegate-record.service (Nice=10): the runtime wins a contended core


def _start_recorder(endpoint: str, db: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(_linegate("record", endpoint, "--db", db, "--images", str(log.with_suffix(".images")),
                                      "--min-free-mb", "0"), stderr=open(log, "w"), stdout=subprocess.DEVNULL,
                            preexec_fn=lambda: os.nice(RECORDER_NICE))
    deadline = time.monotonic() + 60
    while "recording tcp://" not in log.read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"recorder did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc


def pipeline_run(bundle: Path, parts: Path, work: Path, db: str | None, frames: int) -> dict:
    """One `linegate run` over the parts; with a recorder attached when db is given."""
    endpoint, tag = _free_endpoint(), uuid.uuid4().hex[:6]
    before = _count(db) if db else 0
    recorder = _start_recorder(endpoint, db, work / f"rec-{tag}.log") if db else None
    log = work / f"run-{tag}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_linegate("run", "--bundle", str(bundle), "--source", f"folder:{parts}", "--publish",
                                          endpoint, "--wait-subscribers", "4" if db else "0"),
                                stderr=f, stdout=subprocess.DEVNULL)
        code, cpu_s = _wait_cpu(proc)
    text = log.read_text()
    match = re.search(r"done: (\d+) frames, (\d+) rejects, \d+ errors, ([\d.]+) frames/s", text)
    if code != 0 or not match:
        raise RuntimeError(f"linegate run failed ({code}):\n{text[-2000:]}")
    frames = int(match[1])
    # CPU seconds per frame of the runtime process (start-up included, the same in every run):
    # on a box shared with other work this moves far less than img/s does.
    result = {"frames": frames, "rejects": int(match[2]), "pipeline_img_s": float(match[3]),
              "runtime_cpu_ms_per_frame": round(1000 * cpu_s / frames, 3)}
    if recorder is not None:
        ended = time.monotonic()
        while _count(db) - before < frames and time.monotonic() - ended < 60:
            time.sleep(0.05)
        result["recorder_lag_s"] = round(time.monotonic() - ended, 3)  # runtime done -> last row stored
        recorder.send_signal(signal.SIGTERM)
        _, rec_cpu = _wait_cpu(recorder)
        result["recorder_cpu_ms_per_decision"] = round(1000 * rec_cpu / frames, 3)  # its start-up included
        result["rows"] = _count(db) - before
    return result


def _wait_cpu(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for a child; (exit status, its user + system CPU seconds)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def burst(db: str, n: int, work: Path) -> dict:
    """A real Publisher sends n decisions (and an overlay per third) as fast as it can; how fast
    does the recorder store them?"""
    from edge.publisher import Publisher
    from lineside.store import open_store

    endpoint = _free_endpoint()
    overlay = cv2.imencode(".jpg", np.full((48, 54, 3), 200, np.uint8))[1].tobytes()
    with Publisher(endpoint, model_id="bench", sndhwm=4 * n) as pub:
        recorder = _start_recorder(pub.endpoint, db, work / f"burst-{uuid.uuid4().hex[:6]}.log")
        pub.wait_for_subscribers(4, 30)
        with open_store(db) as store:
            before = store.count("decisions")
        started = time.perf_counter()
        now = time.time()
        for i in range(n):
            header = {"camera_id": "cam0", "frame_id": i, "capture_ts": now + i * 1e-3, "score": 0.1, "score_norm": 0.1,
                      "threshold": 0.5, "decision": "reject" if i % 3 == 0 else "accept", "aggregate": "mean",
                      "source": f"p{i}.png", "label": None, "batch": i // 8}
            pub.publish("decision", header)
            if i % 3 == 0:
                pub.publish("overlay", {**header, "encoding": "jpeg", "width": 54, "height": 48}, overlay)
        sent = time.perf_counter() - started
        deadline = time.monotonic() + 120
        while _count(db) < before + n and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        stored = _count(db) - before
        recorder.send_signal(signal.SIGTERM)
        recorder.wait(30)
    return {"decisions": n, "stored": stored, "publish_s": round(sent, 3), "elapsed_s": round(elapsed, 3),
            "stored_per_s": round(stored / elapsed, 1)}


def _pg_database(admin_url: str) -> tuple[str, callable]:
    import psycopg

    admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    name = f"linegate_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def _median_run(runs: list[dict]) -> dict:
    """Each figure's median over the runs."""
    import statistics

    return {key: statistics.median(r[key] for r in runs) if isinstance(runs[0][key], (int, float)) else runs[0][key]
            for key in runs[0]}


def _bundle_name(bundle: Path, given: str | None) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    shape = "x".join(str(v) for v in manifest["input"]["shape"][2:])
    origin = "" if given else ", the tests' tiny bundle"
    return f"{manifest['detector']} {shape} ({manifest['model_id']}{origin})"


def markdown(result: dict) -> str:
    p, lines = result["pipeline"], []
    lines += [f"# Recorder benchmark ({result['when']})", "", f"Command: `{result['command']}`", "",
              f"Machine: {result['machine']}; bundle: {result['bundle']}; {result['frames']} frames per pipeline run, "
              f"{p['none']['rejects']} of them rejects (each with an overlay). Median of {result['repeats']} "
              "alternating runs each (all runs in the JSON).", "",
              "| runtime | pipeline img/s | vs no recorder | runtime CPU ms/frame | vs no recorder | rows on record "
              "| recorder lag after the run (s) | recorder CPU ms/decision |",
              "|---|---|---|---|---|---|---|---|"]
    base, base_cpu = p["none"]["pipeline_img_s"], p["none"]["runtime_cpu_ms_per_frame"]
    for name, r in p.items():
        lines.append(f"| {'no recorder' if name == 'none' else name + ' recorder attached'} | {r['pipeline_img_s']:.0f} "
                     f"| {r['pipeline_img_s'] / base:.2f} | {r['runtime_cpu_ms_per_frame']:.2f} | "
                     f"{r['runtime_cpu_ms_per_frame'] / base_cpu:.2f} | {r.get('rows', '-')} / {r['frames']} | "
                     f"{r.get('recorder_lag_s', '-')} | {r.get('recorder_cpu_ms_per_decision', '-')} |")
    lines += ["", f"The recorder runs at nice {RECORDER_NICE}, as its systemd unit sets it.", "",
              "| recorder | burst decisions | stored/s | vs pipeline img/s (no recorder) |", "|---|---|---|---|"]
    for name, b in result["burst"].items():
        lines.append(f"| {name} | {b['stored']} / {b['decisions']} | {b['stored_per_s']:.0f} | "
                     f"{b['stored_per_s'] / base:.2f} |")
    lines += ["", "Burst: a real Publisher sends the decisions (an overlay with every third) as fast as it can; "
              "stored/s over the pipeline's img/s above 1 means the recorder keeps up with this pipeline. "
              "The runtime's CPU per frame with a recorder attached against none is what recording costs the "
              "runtime's process; its img/s also moves with whatever else runs on the box (here: 2 cores shared "
              "with other jobs, and the recorder and PostgreSQL take their CPU from the same cores)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="a model bundle (default: the tests' tiny bundle)")
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL server to make a scratch database on ('' skips PostgreSQL)")
    parser.add_argument("--out", default=str(RESULTS / "record_bench"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.bundle:
            bundle = Path(args.bundle)
        else:
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import make_tiny_bundle

            bundle = make_tiny_bundle(work / "bundle")
        bundle_name = _bundle_name(bundle, args.bundle)
        parts = work / "parts"
        _parts(parts, args.frames)
        targets = {"sqlite": str(work / "record.db")}
        drop = None
        if args.pg:
            targets["postgresql"], drop = _pg_database(args.pg)
        try:
            runs: dict[str, list[dict]] = {name: [] for name in ["none", *targets]}
            for _ in range(args.repeats):
                for name in runs:
                    runs[name].append(pipeline_run(bundle, parts, work, targets.get(name), args.frames))
                    print(name, runs[name][-1], flush=True)
            pipeline = {name: _median_run(rs) for name, rs in runs.items()}
            bursts = {name: burst(db, args.frames, work) for name, db in targets.items()}
            print(bursts, flush=True)
        finally:
            if drop:
                drop()
    result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m benchmarks.record_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "bundle": bundle_name, "frames": args.frames, "repeats": args.repeats,
              "pipeline": pipeline, "all_runs": runs, "burst": bursts}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
