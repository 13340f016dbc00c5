"""`linegate bench` results as bench.json, bench.md and PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TARGETS = {"model_over_backbone": 0.8, "pipeline_over_model": 0.85, "p99_over_p50": 2.0, "rss_growth_pct": 5.0}
TARGET_BATCH = 8  # the targets are stated at batch 8


def _fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "misses")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# linegate bench: {result['detector']} ({result['model_id']})", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; load average {m['load_average_at_start']} "
             f"at start, {m.get('load_average_at_end')} at end  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "  ",
             f"ONNX Runtime threads: {result['settings'].get('threads') or 'its default number'}, "
             f"{'spinning' if result['settings'].get('spin_between_calls') else 'not spinning'} between calls  ",
             f"Frames: {result['settings']['frames']} (shape {result['settings']['frame_shape']}), overlays at "
             f"the default policy (every reject{'' if not result['settings']['overlay_accepts_every'] else ', accepts every %d' % result['settings']['overlay_accepts_every']})  ",
             f"Each img/s figure is the median of {result['settings']['rounds']} rounds in which the stages take turns "
             f"({result['settings']['seconds']:g} s per stage and batch in all); each ratio is the median of the "
             f"per-round ratios. {result['duration_s']:.0f} s in all.", "",
             f"**The limit** is the {result['limit']}. Ratios below say how far each stage is from it.", ""]
    for key in result["model_fps"]:
        lines += [f"## {key}", "",
                  "| batch | backbone img/s | model img/s | pipeline img/s | model / backbone | pipeline / model "
                  "| pipeline / backbone | overlays/frame |", "|---|---|---|---|---|---|---|---|"]
        for b in (str(x) for x in result["settings"]["batches"]):
            r = result["ratios"][key].get(b, {})
            p = result["pipeline"].get(key, {}).get(b, {})
            lines.append(f"| {b} | {_fmt(result['backbone_fps'].get(key, {}).get(b))} | {_fmt(result['model_fps'][key].get(b))} "
                         f"| {_fmt(result['pipeline_fps'][key].get(b))} | {_fmt(r.get('model_over_backbone'), 2)} "
                         f"| {_fmt(r.get('pipeline_over_model'), 2)} | {_fmt(r.get('pipeline_over_backbone'), 2)} "
                         f"| {_fmt(p.get('overlay_fraction'), 2)} |")
        stages = result["pipeline"].get(key, {}).get(str(TARGET_BATCH), {}).get("stages_ms")
        if stages:
            lines += ["", f"Pipeline stages at batch {TARGET_BATCH} (median p50 / p99 over the stats intervals, ms): " +
                      "; ".join(f"{k} {v['p50']} / {v['p99']}" for k, v in stages.items())]
        lines.append("")
    for key, why in result.get("skipped", {}).items():
        lines += [f"## {key}: not measured", "", why, ""]
    lat = result.get("latency_ms")
    if lat:
        lines += [f"## Latency, capture -> subscriber receipt ({lat['engine']}, max_batch {lat['batch']}, "
                  f"offered {lat['offered_fps']:g} img/s = {lat['rate_from']})", "",
                  f"{lat['rounds']} rounds of {lat['seconds_per_round']:g} s per setting; the settings take turns in "
                  "each round. Percentiles are over every frame of every round, and p99 / p50 over all of them is "
                  "the figure checked against the target (a round's p99 rests on its few slowest frames: the last "
                  "columns, p99 / p50 of each round and their median, show how much it moves). A frame's capture "
                  "time is when it was due on the source's schedule." + _busy_text(result, lat), "",
                  "| max_wait_ms | frames | achieved img/s | p50 ms | p95 ms | p99 ms | max ms | p99 / p50 (all) "
                  "| p99 / p50 per round | median | CPU stolen, % per round |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = []
        for wait, s in lat["by_max_wait_ms"].items():
            rows.append((wait, s))
            if wait in lat.get("batcher_alone", {}):
                rows.append((f"{wait}: engine + batcher alone", lat["batcher_alone"][wait]))
        if lat.get("engine_alone"):
            rows.append(("engine alone, 1 frame", lat["engine_alone"]))
        if lat.get("machine_alone"):
            rows.append(("machine alone: fixed arithmetic, no model", lat["machine_alone"]))
        for wait, s in rows:
            per_round = ", ".join(_fmt(v, 2) for v in s.get("p99_over_p50_rounds", []))
            lines.append(f"| {wait} | {s['n']} | {_fmt(s.get('achieved_fps'))} | {_fmt(s.get('p50'))} | {_fmt(s.get('p95'))} "
                         f"| {_fmt(s.get('p99'))} | {_fmt(s.get('max'))} | {_fmt(s.get('p99_over_p50'), 2)} "
                         f"| {per_round} | {_fmt(s.get('p99_over_p50_median'), 2)} "
                         f"| {', '.join(_fmt(v, 1) for v in s.get('steal_pct_rounds', []))} |")
        lines += _steal_text(lat)
        late = [(w, s["source_late_ms"]) for w, s in lat["by_max_wait_ms"].items() if s.get("source_late_ms")]
        if late:
            lines += ["", "The source handed frames over after they were due by (p50 / p99 / max ms): " +
                      "; ".join(f"max_wait_ms {w}: {v['p50']} / {v['p99']} / {v['max']}" for w, v in late) +
                      " (part of the latency above)."]
        if lat.get("engine_alone"):
            lines += ["", "\"engine alone\" is a floor: the same engine called on one frame at the same rate with "
                      "nothing else running (no pipeline, no subscriber). Its p99 / p50 is this machine's jitter as the "
                      "engine meets it."]
        if lat.get("batcher_alone"):
            lines += ["", "\"engine + batcher alone\" is measured right after the row above it in each round: the "
                      "runtime's own queue and batcher feeding the same engine at the same rate and max_wait_ms, with "
                      "ready-made inputs and nothing else running (no source, decisions, overlays, publishing or "
                      "subscriber); latency from when a frame was due to the end of its engine call. It is the queueing "
                      "this engine has at this load with no pipeline around it: the pipeline's figure over it is what "
                      "the pipeline adds, and where this row misses the target too, the engine and the machine's "
                      "jitter decide the verdict, not the pipeline. A stall of the machine lands in one row or the "
                      "other, so compare them over the rounds, not within one."]
        machine = lat.get("machine_alone")
        if machine:
            woke = machine["woke_late_ms"]
            lines += ["", f"\"machine alone\" is measured last in each round: the same piece of arithmetic (float32 "
                      f"matrix products on one thread, sized to {_fmt(machine['work_ms'])} ms, the engine-alone "
                      "median) done at the same rate, with no model, ONNX Runtime or pipeline in it. Every run is the "
                      "same work, so its spread is this machine's: the scheduler, other tenants, frequency changes. "
                      f"The thread woke after its due time by {woke['p50']} / {woke['p99']} / {woke['max']} ms "
                      f"(p50 / p99 / max){_backlog_text(machine, lat)}. Where this row's p99 / p50 is far from 1, "
                      "no latency figure on this machine can be tighter than what it shows."]
        lines.append("")
    rss = result.get("rss_mb")
    if rss:
        lines += [f"## Memory during a {rss['seconds']:g} s soak at {rss['offered_fps']:g} img/s", "",
                  f"Resident memory {rss['before']} MB before the soak, {rss['start']} MB at {rss['start_at_s']:g} s, "
                  f"{rss['end']} MB at the end of the stream: {rss['growth_pct']:+.2f}%; peak {rss['peak']} MB, "
                  f"{rss['after_run']} MB once stopped. {rss['decisions']} decisions, {rss['gaps']} lost; the frame "
                  f"queue held at most {rss['frame_queue_max']} frames (it is bounded: a backlog, when the box "
                  f"cannot keep up, shows here and in the latency). Latency over the soak: p50 "
                  f"{rss['latency_ms'].get('p50')} ms, p99 {rss['latency_ms'].get('p99')} ms" +
                  ("." if rss.get("steal_pct") is None else f"; CPU stolen by the hypervisor {rss['steal_pct']:.1f}%."), ""]
    lines += ["## Against the targets (issue 6)", "", "| check | value | target | |", "|---|---|---|---|"]
    for key in result["ratios"]:
        r = result["ratios"][key].get(str(TARGET_BATCH), {})
        for name, label in (("model_over_backbone", "head efficiency"), ("pipeline_over_model", "pipeline efficiency")):
            v = r.get(name)
            lines.append(f"| {label}, {key}, batch {TARGET_BATCH} | {_fmt(v, 3)} | >= {TARGETS[name]} | "
                         f"{_verdict(None if v is None else v >= TARGETS[name])} |")
    if lat:
        for wait, s in lat["by_max_wait_ms"].items():
            v = s.get("p99_over_p50")
            floor = lat.get("batcher_alone", {}).get(wait, {}).get("p99_over_p50")
            machine = (lat.get("machine_alone") or {}).get("p99_over_p50")
            floors = ([] if floor is None else [f"engine + batcher alone: {_fmt(floor, 2)}"]) + \
                ([] if machine is None else [f"machine alone: {_fmt(machine, 2)}"])
            floor_text = f" ({'; '.join(floors)})" if floors else ""
            lines.append(f"| latency p99 / p50 (all {s['n']} frames), max_wait_ms {wait} | {_fmt(v, 2)} | <= 2 | "
                         f"{_verdict(None if v is None else v <= TARGETS['p99_over_p50'])}{floor_text} |")
    if rss:
        minutes = "minute 1 -> end" if rss["seconds"] >= 600 else f"{rss['start_at_s']:g} s -> end (a 10-minute soak is the real check)"
        lines.append(f"| RSS growth, {minutes} | {rss['growth_pct']:+.2f}% | <= 5% | "
                     f"{_verdict(rss['growth_pct'] <= TARGETS['rss_growth_pct'])} |")
    return "\n".join(lines + _threads_hint(result)) + "\n"


# Boxes this size and up get the hint below. Measured: on 16 cores leaving two to the pipeline
# helped; on 2 cores one thread fewer halves the engine's throughput. In between, unmeasured.
MANY_CORES = 8


def _threads_hint(result: dict) -> list[str]:
    """On a box with many cores where ONNX Runtime ran with its default (every core) and the
    pipeline fell short of the model: what to try, and the measurement behind it."""
    cores = result["machine"]["cores"]
    short = [key for key in result["ratios"] if key.startswith("onnxruntime/")
             and (result["ratios"][key].get(str(TARGET_BATCH), {}).get("pipeline_over_model") or 1.0)
             < TARGETS["pipeline_over_model"]]
    if cores < MANY_CORES or result["settings"].get("threads") or not short:
        return []
    lat = result.get("latency_ms")
    rate = f" --rate {lat['offered_fps']:g}" if lat else ""
    return ["", f"ONNX Runtime ran with a thread for every core of this {cores}-core box, and the pipeline's own "
            "threads (sources, publishing) then run on cores its parallel sections wait for. On a 16-core Xeon, "
            "leaving two cores to the pipeline raised its img/s 1.22-1.23x at batch 8 (benchmarks/results/README.md). "
            f"Compare on this box: `python -m benchmarks.engine_ab BUNDLE --threads {cores},{cores - 2}{rate}`, "
            "then set `[engine] threads`."]


def _steal_text(lat: dict) -> list[str]:
    """What the hypervisor took while the latency rounds ran, and whether it hit the slowest frames."""
    rows = [*lat["by_max_wait_ms"].values(), *lat.get("batcher_alone", {}).values(),
            *(s for s in (lat.get("engine_alone"), lat.get("machine_alone")) if s)]
    pct = [v for s in rows for v in s.get("steal_pct_rounds", []) if v is not None]
    if not pct:
        return ["", "CPU stolen: not measured (no steal counter in /proc/stat on this machine, or a run from before "
                "the bench read it)."]
    if max(pct) == 0:
        return ["", "CPU stolen: none. The hypervisor took no CPU time from this machine during the runs "
                "(/proc/stat's steal), so the spread above is the machine's and linegate's own."]
    text = ("\"CPU stolen\" is the share of this machine's CPU time that the hypervisor gave to other guests during "
            f"each run (/proc/stat's steal, all cores): {min(pct):.1f}-{max(pct):.1f}% here. A frame in flight when "
            "it happens waits for it, whatever linegate does.")
    # the pipeline's frames at each max_wait_ms, and the fixed arithmetic's runs (no model)
    tails = [(f"max_wait_ms {w}", s.get("tail_steal")) for w, s in lat["by_max_wait_ms"].items()]
    tails.append(("machine alone (its runs of arithmetic)", (lat.get("machine_alone") or {}).get("tail_steal")))
    tails = [(label, t) for label, t in tails if t and t.get("frames_above_p99")]
    if tails:
        tick = lat.get("steal_tick_ms", 10)
        text += (f" Frames slower than p99 whose flight overlapped stolen time (to the counter's {tick:g} ms tick), "
                 "against the share of frames at or below p50 that did; then, at the median of those slow frames, "
                 "the ms stolen during the flight (all cores together) and how far the frame was over p50: " +
                 "; ".join(f"{label}: {t['above_p99_with_steal']} of {t['frames_above_p99']}, against "
                           f"{_fmt(100 * t['at_or_below_p50_with_steal'], 0)}%" +
                           (f"; {_fmt(t['above_p99_stolen_ms_p50'])} ms stolen, {_fmt(t['above_p99_over_p50_ms_p50'])} "
                            "ms over p50" if "above_p99_stolen_ms_p50" in t else "") for label, t in tails) + ".")
        # the host's when most slow frames were hit, far more often than median ones, and by gaps
        # of about their lateness (results written before the ms were kept: the counts alone)
        host = [label for label, t in tails if t["above_p99_with_steal"] >= 0.5 * t["frames_above_p99"]
                and t["above_p99_with_steal"] / t["frames_above_p99"] >= 2 * (t["at_or_below_p50_with_steal"] or 0)
                and t.get("above_p99_stolen_ms_p50", 1.0) >= 0.5 * t.get("above_p99_over_p50_ms_p50", 0.0)]
        if host:
            text += (f" For {', '.join(host)}, most of the slowest frames overlapped stolen time, far more often than "
                     "the median ones, by gaps of at least half their lateness: that tail is mostly the host's, and a "
                     "machine with dedicated cores is what removes it.")
    return ["", text]


def _backlog_text(machine: dict, lat: dict) -> str:
    """The fixed arithmetic's share of its thread's time at the offered rate: near 1, one slow
    run delays the next ones, and its lateness is mostly that backlog, not the scheduler's."""
    if not machine.get("work_ms"):
        return ""
    busy = lat["offered_fps"] * machine["work_ms"] / 1000.0
    text = f"; at this rate the arithmetic keeps its thread busy {busy:.0%} of the time"
    if busy >= 0.8:
        text += ", so a late start is mostly the backlog of the runs before it"
    return text


def _busy_text(result: dict, lat: dict) -> str:
    """How busy the engine is at the offered rate when every call holds one frame (max_wait_ms
    0 with nothing queued): near 1, any slower call makes frames queue behind it."""
    one = result["model_fps"].get(lat["engine"], {}).get("1")
    if not one:
        return ""
    return (f" At this rate the engine, given one frame per call ({one:.1f} img/s at batch 1), would be busy "
            f"{lat['offered_fps'] / one:.0%} of the time.")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"backbone": ":", "model": "--", "pipeline": "-"}
    for stage in ("backbone", "model", "pipeline"):
        for key, values in result[f"{stage}_fps"].items():
            xs = sorted(int(b) for b in values)
            ax.plot(xs, [values[str(b)] for b in xs], styles[stage], marker="o", label=f"{stage} {key}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["settings"]["batches"], [str(b) for b in result["settings"]["batches"]])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"{result['detector']}: throughput vs batch (limit: backbone alone)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(plt, fig, out / "throughput.png"))

    samples = result.get("_latency_samples") or {}
    if samples:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        finite = [v for v in samples.values() if len(v)]
        top = max(float(np.percentile(v, 99.5)) for v in finite) if finite else 1.0
        bins = np.linspace(0, top * 1.05, 60)
        floors = result.get("_floor_samples") or {}
        for i, (wait, ms) in enumerate(samples.items()):
            colour = f"C{i}"
            if len(ms):
                ax.hist(np.clip(ms, 0, bins[-1]), bins=bins, histtype="step", linewidth=1.5, color=colour,
                        label=f"max_wait_ms {wait:g}: p50 {np.percentile(ms, 50):.1f}, p99 {np.percentile(ms, 99):.1f}")
            floor = floors.get(wait)
            if floor is not None and len(floor):  # dashed: the same engine fed by the batcher alone
                ax.hist(np.clip(floor, 0, bins[-1]), bins=bins, histtype="step", linewidth=1, linestyle="--",
                        color=colour, label=f"  engine + batcher alone: p50 {np.percentile(floor, 50):.1f}, "
                                            f"p99 {np.percentile(floor, 99):.1f}")
        lat = result["latency_ms"]
        ax.set_xlabel("capture -> subscriber receipt, ms")
        ax.set_ylabel("frames")
        ax.set_title(f"latency at {lat['offered_fps']:g} img/s offered, max_batch {lat['batch']} ({lat['engine']})")
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out / "latency.png"))

    rss = result.get("rss_mb")
    if rss and rss["samples"]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        t, mb = zip(*rss["samples"])
        ax.plot(t, mb)
        ax.axvline(rss["start_at_s"], color="grey", linestyle=":")
        ax.set_xlabel("soak time, s")
        ax.set_ylabel("resident memory, MB")
        ax.set_title(f"RSS during the soak: {rss['growth_pct']:+.2f}% from {rss['start_at_s']:g} s to the end")
        ax.grid(alpha=0.3)
        written.append(_save(plt, fig, out / "memory.png"))
    return written


def write_results(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = plots(result, out)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    (out / "bench.json").write_text(json.dumps(public, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(public))
    return [out / "bench.json", out / "bench.md", *written]
