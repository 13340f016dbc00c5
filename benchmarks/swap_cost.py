"""What a hot swap costs the line: end-to-end latency in the seconds around a swap, against
the same seconds of the same run without swaps.

The real pipeline (edge.pipeline) with the real control logic (edge.control.Controller.load:
the new bundle is validated, opened and warmed at every batch size in a background thread
while the old one judges, then put in force between two batches) and frames from memory at
a fixed rate. Each round runs twice, interleaved so a noisy spell of the machine hits both:
without swaps, and with a swap every --swap-every seconds alternating between the two
bundles. A swap's window is from the load request to --after seconds after the swap; the
latencies of the frames captured in the windows are compared with those of the frames
captured in the same seconds of the run without swaps.

    python -m benchmarks.swap_cost BUNDLE_A BUNDLE_B --images ../shared/datasets/pillqc \\
        --rate 20 --seconds 24 --swap-every 4 --rounds 2 --out benchmarks/results/swap_cost_padim

Writes OUT.json and OUT.md. No torch needed.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import bench as B


def _collect(endpoint: str, got: list[dict], stop: threading.Event, ready: threading.Event) -> None:
    from edge.subscriber import Subscriber

    with Subscriber(endpoint, ("decision",)) as sub:
        ready.set()
        while not stop.is_set():
            msg = sub.recv(timeout_ms=100)
            if msg is not None:
                got.append(msg.header)


def one_run(bundles: list[str], frames: list[np.ndarray], rate: float, seconds: float, max_batch: int,
            swap_every: float | None, pace: float | None = None) -> dict:
    """One pipeline run; with swap_every, a load of the other bundle every swap_every seconds."""
    from edge.active import EngineSettings, open_model
    from edge.control import Controller
    from edge.pipeline import Pipeline, RunOptions
    from edge.publisher import Publisher

    model = open_model(bundles[0], EngineSettings(), max_batch=max_batch)
    source = B._preloaded_source_class()(frames, int(rate * seconds), fps=rate, camera_id="cam0")
    publisher = Publisher(B._free_endpoint())
    options = RunOptions(max_batch=max_batch, wait_subscribers=1, wait_timeout_s=20, queue_capacity=256)
    pipeline = Pipeline(model.bundle, model.engine, model.rule, [source], publisher, options)
    controller = Controller(pipeline, engine=EngineSettings())
    if pace is not None:
        controller.warm_pace = pace
    pipeline.monitor = controller
    got: list[dict] = []
    stop, ready = threading.Event(), threading.Event()
    receiver = threading.Thread(target=_collect, args=(publisher.endpoint, got, stop, ready), daemon=True)
    receiver.start()
    ready.wait(10)
    swaps: list[dict] = []

    def swapper() -> None:
        i = 1
        while not pipeline.stopping and not stop.wait(swap_every):
            if pipeline.stopping or source.state == "ended":
                return
            asked = time.time()
            controller.load(bundles[i % 2], "bench")
            swaps.append({"asked": asked, "done": time.time(), "bundle": bundles[i % 2]})
            i += 1

    if swap_every:
        threading.Thread(target=swapper, daemon=True).start()
    started = time.time()
    summary = pipeline.run()
    time.sleep(0.5)
    stop.set()
    receiver.join(5)
    return {"started": started, "frames": summary.frames, "read": source.counters["frames"], "swaps": swaps,
            "decisions": [(d["capture_ts"] - started, (d["publish_ts"] - d["capture_ts"]) * 1000.0, d["model_id"],
                           d["seq"]) for d in got]}


def _in_windows(t: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    mask = np.zeros(len(t), bool)
    for lo, hi in windows:
        mask |= (t >= lo) & (t <= hi)
    return mask


def run(args: argparse.Namespace, command: str) -> dict:
    frames, described = B.load_frames(args.images, (args.size, args.size), 32)
    bundles = [str(args.bundle_a), str(args.bundle_b)]
    rounds = []
    for r in range(args.rounds):
        plain = one_run(bundles, frames, args.rate, args.seconds, args.max_batch, None)
        swapped = one_run(bundles, frames, args.rate, args.seconds, args.max_batch, args.swap_every, args.pace)
        windows = [(s["asked"] - swapped["started"], s["done"] - swapped["started"] + args.after)
                   for s in swapped["swaps"]]
        out = {"round": r}
        for name, res in (("without_swaps", plain), ("with_swaps", swapped)):
            t = np.array([d[0] for d in res["decisions"]])
            ms = np.array([d[1] for d in res["decisions"]])
            seqs = sorted(d[3] for d in res["decisions"])
            inside = _in_windows(t, windows)
            out[name] = {"frames_read": res["read"], "decisions": len(seqs),
                         "seq_contiguous": seqs == list(range(len(seqs))),
                         "all": B.latency_summary(ms), "windows": B.latency_summary(ms[inside]),
                         "outside": B.latency_summary(ms[~inside])}
        out["swaps"] = [{"load_s": round(s["done"] - s["asked"], 3), "bundle": s["bundle"]} for s in swapped["swaps"]]
        models = [d[2] for d in sorted(swapped["decisions"], key=lambda d: d[3])]
        out["model_changes_seen"] = sum(a != b for a, b in zip(models, models[1:]))
        rounds.append(out)
        print(f"round {r}: p99 in swap windows {out['with_swaps']['windows'].get('p99')} ms vs same seconds "
              f"without swaps {out['without_swaps']['windows'].get('p99')} ms; {len(out['swaps'])} swaps",
              file=sys.stderr)

    def pooled(key: str, part: str) -> dict:
        return {"p99_median_of_rounds": float(np.median([r[key][part]["p99"] for r in rounds if r[key][part]["n"]]))}

    summary = {
        "p99_ms_windows_without_swaps": pooled("without_swaps", "windows")["p99_median_of_rounds"],
        "p99_ms_windows_with_swaps": pooled("with_swaps", "windows")["p99_median_of_rounds"],
        "p99_ms_outside_windows_with_swaps": pooled("with_swaps", "outside")["p99_median_of_rounds"],
        "load_s_median": round(float(np.median([s["load_s"] for r in rounds for s in r["swaps"]])), 3),
        "swaps": sum(len(r["swaps"]) for r in rounds),
        "every_frame_decided": all(r[k]["decisions"] == r[k]["frames_read"] and r[k]["seq_contiguous"]
                                   for r in rounds for k in ("without_swaps", "with_swaps")),
    }
    summary["p99_ratio_windows"] = round(summary["p99_ms_windows_with_swaps"]
                                         / summary["p99_ms_windows_without_swaps"], 3)
    return {"command": command, "note": args.note, "machine": B.machine(), "frames": described,
            "settings": {"bundles": bundles, "warm_pace": args.pace, "rate": args.rate, "seconds": args.seconds, "swap_every": args.swap_every,
                         "after_s": args.after, "max_batch": args.max_batch, "rounds": args.rounds},
            "summary": summary, "rounds": rounds}


def _name(bundle: str) -> str:
    path = Path(bundle)
    return f"{path.parent.name}/{path.name}" if path.name == "bundle" else path.name


def markdown(result: dict) -> str:
    s, st = result["summary"], result["settings"]
    lines = [
        "# Hot swap cost", "", f"Command: `{result['command']}`", "",
        *([result["note"], ""] if result.get("note") else []),
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; frames: {result['frames']}; "
        f"warm-up pace {st['warm_pace'] if st['warm_pace'] is not None else 'default'}; {st['rate']} frames/s for {st['seconds']} s per run, max_batch {st['max_batch']}, a swap every "
        f"{st['swap_every']} s alternating {' and '.join(_name(b) for b in st['bundles'])}; window = load "
        f"request to {st['after_s']} s after the swap.", "",
        "| round | swaps | load s (each) | p99 ms in windows, with swaps | p99 ms same seconds, no swaps | "
        "p99 ms outside windows, with swaps | p99 ms all, no swaps | max ms in windows |",
        "|---|---|---|---|---|---|---|---|"]
    for r in result["rounds"]:
        w, n = r["with_swaps"], r["without_swaps"]
        lines.append(f"| {r['round']} | {len(r['swaps'])} | {', '.join(str(x['load_s']) for x in r['swaps'])} | "
                     f"{w['windows'].get('p99')} | {n['windows'].get('p99')} | {w['outside'].get('p99')} | "
                     f"{n['all'].get('p99')} | {w['windows'].get('max')} |")
    lines += ["", f"Median over rounds: p99 in the swap windows {s['p99_ms_windows_with_swaps']} ms against "
              f"{s['p99_ms_windows_without_swaps']} ms in the same seconds without swaps (ratio "
              f"{s['p99_ratio_windows']}); a load (validate, open, warm) took {s['load_s_median']} s (median). "
              f"Every frame read got exactly one decision, seq contiguous: {s['every_frame_decided']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle_a", type=Path, help="the bundle the runs start with")
    p.add_argument("bundle_b", type=Path, help="the bundle swapped to (e.g. another input size)")
    p.add_argument("--images", default=None, help="image folder for the frames (default: synthetic parts)")
    p.add_argument("--size", type=int, default=224, help="synthetic frame size when no --images")
    p.add_argument("--rate", type=float, default=20.0, help="frames/s offered")
    p.add_argument("--seconds", type=float, default=24.0, help="length of each run")
    p.add_argument("--swap-every", type=float, default=4.0, help="seconds between swaps")
    p.add_argument("--after", type=float, default=1.0, help="seconds after a swap still in its window")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pace", type=float, default=None,
                   help="warm-up pacing of the swapped-in engine (default edge.active.SWAP_WARM_PACE; 0: none)")
    p.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.md are written")
    p.add_argument("--note", default="", help="a line for the report (e.g. how the bundles were made)")
    args = p.parse_args(argv)
    command = "python -m benchmarks.swap_cost " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    result = run(args, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
