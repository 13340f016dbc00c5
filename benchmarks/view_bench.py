"""The runtime's pipeline img/s with and without a viewer attached.

Each trial runs a real `linegate run` on a finite synthetic source at full speed (no fps cap),
with a `linegate watch`-like subscriber counting decisions in both arms (the line always has
one), and in the `view` arm also a `linegate view` following the bus with a real headless
Chromium showing its live page (SSE snapshots, overlay pictures). The runtime's own figure
is read from its last log line (`done: N frames, ..., X frames/s`). Arms alternate (A B A B
...) so that drift in what else the machine does falls on both; the result is the ratio of
the medians, with every trial kept.

    python -m benchmarks.view_bench BUNDLE [--frames 1500] [--trials 3] [--size 224]
        [--overlay-accepts 4] [--out benchmarks/results/view_bench.json]

Needs the `view` and `dev` extras and Debian's chromium (see README).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from edge.subscriber import Subscriber

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOADAVG_AT_START: list[str] = []
DONE = re.compile(r"done: (\d+) frames, (\d+) rejects.*?([\d.]+) frames/s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _linegate(*args: str) -> list[str]:
    return [sys.executable, "-m", "linegate.cli", *args]


class Counter(threading.Thread):
    """The line's ordinary subscriber: counts decisions until told to stop."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.sub, self.decisions, self._done = Subscriber(endpoint, ("decision",)), 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            if self.sub.recv(100) is not None:
                self.decisions += 1
        self.sub.close()

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trial(bundle: str, frames: int, size: int, overlay_accepts: int, with_view: bool, playwright) -> dict:
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    # the counter subscribes to 1 topic, the view to 4 (decision, overlay, stats, event)
    subscriptions = 5 if with_view else 1
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "run.log"
        with open(log, "w") as log_file:
            run = subprocess.Popen(_linegate("run", "--bundle", bundle, "--publish", endpoint,
                                             "--source", f"synthetic:count={frames},size={size},seed=7",
                                             "--overlay-accepts", str(overlay_accepts),
                                             "--wait-subscribers", str(subscriptions), "--wait-timeout", "120"),
                                   stdout=subprocess.DEVNULL, stderr=log_file)
        counter = Counter(endpoint)
        counter.start()
        view = context = None
        snapshot = view_cpu_s = None
        try:
            if with_view:
                view = subprocess.Popen(_linegate("view", "--bus", endpoint, "--http", f"127.0.0.1:{port}"),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                base = f"http://127.0.0.1:{port}"
                for _ in range(300):
                    try:
                        urllib.request.urlopen(base + "/api/me", timeout=1).read()
                        break
                    except OSError:
                        time.sleep(0.1)
                context = playwright.chromium.launch_persistent_context(
                    str(Path(tmp) / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                    viewport={"width": 1280, "height": 900})
                page = context.pages[0] if context.pages else context.new_page()
                page.goto(base + "/")
            if run.wait(timeout=1800) != 0:
                raise RuntimeError(f"linegate run failed:\n{log.read_text()}")
            deadline = time.monotonic() + 10
            while counter.decisions < frames and time.monotonic() < deadline:
                time.sleep(0.05)
            if with_view:
                time.sleep(1)  # the last snapshot
                snapshot = json.loads(urllib.request.urlopen(base + "/api/live/snapshot", timeout=5).read())
                view_cpu_s = _cpu_seconds(view.pid)
        finally:
            counter.stop()
            if context is not None:
                context.close()
            if view is not None:
                view.terminate()
                view.wait(15)
            if run.poll() is None:
                run.kill()
        match = DONE.search(log.read_text())
        if match is None:
            raise RuntimeError(f"no 'done:' line in the runtime's log:\n{log.read_text()}")
    result = {"arm": "view" if with_view else "no view", "frames": int(match[1]), "rejects": int(match[2]),
              "img_per_s": float(match[3]), "subscriber_decisions": counter.decisions}
    if snapshot is not None:
        result.update(view_parts=snapshot["parts"], view_rejects=snapshot["rejects"],
                      view_missed=sum(snapshot["missed"].values()), view_cpu_s=round(view_cpu_s, 2),
                      run_s=round(int(match[1]) / float(match[3]), 1))
    return result


def markdown(result: dict) -> str:
    """The result as a small Markdown table (benchmarks/results/view_bench.md)."""
    lines = [f"# Runtime img/s with and without a viewer ({result['when']})", "",
             f"`{result['command']}`", "",
             f"Bundle: {result['bundle']['model_id']} ({result['bundle']['detector']}, input "
             f"{result['bundle']['input']}); machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}, "
             f"load average at start {' '.join(result['machine']['loadavg_at_start'])} (a shared box).",
             "", "| trial | arm | runtime img/s | subscriber decisions | view: parts / rejects / missed / its CPU time in the run |",
             "| --- | --- | --- | --- | --- |"]
    for i, t in enumerate(result["trials"]):
        seen = (f"{t['view_parts']} / {t['view_rejects']} / {t['view_missed']} / {t['view_cpu_s']} s in "
                f"{t['run_s']} s" if "view_parts" in t else "-")
        lines.append(f"| {i + 1} | {t['arm']} | {t['img_per_s']:.1f} | {t['subscriber_decisions']} | {seen} |")
    m = result["median_img_per_s"]
    lines += ["", f"Median img/s: without a viewer {m['no view']:.1f}, with a viewer (linegate view + a "
              f"Chromium showing the live page) {m['view']:.1f}: ratio {result['ratio_view_to_no_view']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--trials", type=int, default=3, help="trials per arm (alternating)")
    parser.add_argument("--size", type=int, default=224, help="synthetic frame size (px)")
    parser.add_argument("--overlay-accepts", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/view_bench.json")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    global LOADAVG_AT_START
    LOADAVG_AT_START = Path("/proc/loadavg").read_text().split()[:3]
    trials = []
    with sync_playwright() as playwright:
        for i in range(args.trials):
            for with_view in ((False, True) if i % 2 == 0 else (True, False)):
                t = trial(args.bundle, args.frames, args.size, args.overlay_accepts, with_view, playwright)
                print(json.dumps(t), flush=True)
                trials.append(t)
    median = {arm: statistics.median(t["img_per_s"] for t in trials if t["arm"] == arm) for arm in ("no view", "view")}
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    out = {"command": "python -m benchmarks.view_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "bundle": {"model_id": manifest.get("model_id"), "detector": manifest.get("detector"),
                      "input": manifest["input"]["shape"]},
           "machine": {"cpus": os.cpu_count(), "loadavg_at_start": LOADAVG_AT_START, "platform": platform.platform()},
           "trials": trials, "median_img_per_s": median,
           "ratio_view_to_no_view": round(median["view"] / median["no view"], 3),
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(out))
    print(f"median img/s: without a viewer {median['no view']:.1f}, with a viewer {median['view']:.1f} "
          f"(ratio {out['ratio_view_to_no_view']}); {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
