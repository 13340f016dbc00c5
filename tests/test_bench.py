"""`linegate bench` runs end to end on small inputs and writes well-formed results.

Real parts: ONNX Runtime sessions, the real Pipeline, a ZeroMQ subscriber in another process
over tcp 127.0.0.1. No timing asserts: speed is what the bench reports, not what tests check.
"""
import argparse
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import linegate_cmd, make_tiny_bundle

# three rounds: the median reported is then one of them, which check_results can tell
TINY = ["--batches", "1,2", "--seconds", "0.3", "--rounds", "3", "--latency-seconds", "0.6", "--latency-rounds", "2",
        "--wait-ms", "0,5", "--soak-seconds", "1.5", "--max-images", "8"]


def check_results(out, keys, batches, waits):
    result = json.loads((out / "bench.json").read_text())
    for stage in ("model", "pipeline"):
        assert set(result[f"{stage}_fps"]) == set(keys)
        for key in keys:
            assert set(result[f"{stage}_fps"][key]) == {str(b) for b in batches}
            assert all(v > 0 for v in result[f"{stage}_fps"][key].values())
            for b in map(str, batches):  # the reported figure is the median round
                rounds = result["rounds"][stage][key][b]
                assert len(rounds) == 3 and result[f"{stage}_fps"][key][b] == round(float(np.median(rounds)), 2)
    for key in keys:
        for b in batches:
            detail = result["pipeline"][key][str(b)]
            assert detail["frames"] > 0 and detail["gaps"] == 0
            # overlays for the rejects only (--overlay-accepts 0), as a fraction of the frames
            assert detail["overlays"] == detail["rejects"]
            assert detail["overlay_fraction"] == round(detail["overlays"] / detail["frames"], 3)
            ratios = result["ratios"][key][str(b)]
            rounds = {stage: np.array(result["rounds"][stage][key][str(b)]) for stage in ("pipeline", "model")}
            per_round = rounds["pipeline"] / rounds["model"]  # the ratio of each round, then their median
            assert ratios["pipeline_over_model"] == pytest.approx(float(np.median(per_round)), rel=2e-3, abs=2e-3)
    lat = result["latency_ms"]
    assert lat["offered_fps"] > 0
    assert set(lat["by_max_wait_ms"]) == {f"{w:g}" for w in waits}
    assert lat["rounds"] == 2
    for s in [*lat["by_max_wait_ms"].values(), lat["engine_alone"]]:
        assert s["n"] > 0 and 0 < s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
        assert len(s["p99_over_p50_rounds"]) == 2
        assert s["p99_over_p50_median"] == pytest.approx(float(np.median(s["p99_over_p50_rounds"])), abs=1e-3)
    for s in lat["by_max_wait_ms"].values():
        assert s["lost"] == 0 and s["achieved_fps"] > 0
    # each setting's floor: the engine fed by the batcher alone, in the same rounds
    assert set(lat["batcher_alone"]) == set(lat["by_max_wait_ms"])
    for s in lat["batcher_alone"].values():
        assert s["n"] > 0 and 0 < s["p50"] <= s["p95"] <= s["p99"] <= s["max"]
        assert len(s["p99_over_p50_rounds"]) == 2 and "achieved_fps" not in s
    # the machine's own jitter: fixed arithmetic sized like an engine call, no model
    machine = lat["machine_alone"]
    assert machine["n"] > 0 and 0 < machine["p50"] <= machine["p99"] <= machine["max"]
    assert len(machine["p99_over_p50_rounds"]) == 2 and machine["work_ms"] > 0
    woke = machine["woke_late_ms"]
    assert 0 <= woke["p50"] <= woke["p99"] <= woke["max"]
    rss = result["rss_mb"]
    assert rss["start"] > 0 and rss["end"] > 0 and rss["peak"] >= rss["end"] and len(rss["samples"]) >= 1
    m = result["machine"]
    assert m["cores"] >= 1 and m["cpu"] and "onnxruntime" in m["versions"] and "numpy" in m["versions"]
    assert result["command"].startswith("linegate bench")
    for name in ("throughput.png", "latency.png", "memory.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, name
        # a chart: axes, text and lines in several colours on the background, not a blank
        colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
        assert len(colours) > 20 and counts.max() < 0.98 * counts.sum(), name
    md = (out / "bench.md").read_text()
    assert "The limit" in md and "| batch |" in md and "p99 / p50" in md and "engine alone" in md
    assert "ONNX Runtime threads: its default number, not spinning between calls" in md
    for wait, s in lat["batcher_alone"].items():
        assert f"| {wait}: engine + batcher alone | {s['n']} |" in md
    assert f"| machine alone: fixed arithmetic, no model | {machine['n']} |" in md
    assert f"sized to {machine['work_ms']:.1f} ms, the engine-alone median" in md
    busy = lat["offered_fps"] * machine["work_ms"] / 1000.0  # near 1, its lateness is its own backlog
    assert f"keeps its thread busy {busy:.0%} of the time" in md
    assert ("mostly the backlog of the runs before it" in md) == (busy >= 0.8)
    one = result["model_fps"][lat["engine"]]["1"]  # how busy one frame per call keeps the engine
    assert f"({one:.1f} img/s at batch 1), would be busy {lat['offered_fps'] / one:.0%} of the time" in md
    # the latency target is checked on p99 / p50 over every frame of every round (not a
    # median of per-round ratios, which would drop the worst round)
    for wait, s in lat["by_max_wait_ms"].items():
        row = f"| latency p99 / p50 (all {s['n']} frames), max_wait_ms {wait} | {s['p99_over_p50']:.2f} | <= 2 |"
        assert row in md, row
        floors = (f"(engine + batcher alone: {lat['batcher_alone'][wait]['p99_over_p50']:.2f}; "
                  f"machine alone: {machine['p99_over_p50']:.2f}) |")
        assert floors in md.split(row)[1].split("\n")[0], floors
        assert s["source_late_ms"]["p50"] <= s["source_late_ms"]["p99"] <= s["source_late_ms"]["max"]
    # CPU time the hypervisor took, per run (Linux has /proc/stat's steal column)
    rows = [*lat["by_max_wait_ms"].values(), *lat["batcher_alone"].values(), lat["engine_alone"], machine]
    for s in rows:
        assert len(s["steal_pct_rounds"]) == 2
        assert all(v is not None and 0 <= v <= 100 for v in s["steal_pct_rounds"])
        assert f"| {', '.join(f'{v:.1f}' for v in s['steal_pct_rounds'])} |" in md
    for s in [*lat["by_max_wait_ms"].values(), machine]:  # each frame (run) matched with the steal in its flight
        tail = s["tail_steal"]
        above = int(round(0.01 * s["n"])) + 1  # frames strictly above p99: about 1%
        assert 0 < tail["frames_above_p99"] <= above and 0 <= tail["above_p99_with_steal"] <= tail["frames_above_p99"]
        assert 0 <= tail["at_or_below_p50_with_steal"] <= 1
    assert 0 <= rss["steal_pct"] <= 100
    if max(v for s in rows for v in s["steal_pct_rounds"]) > 0:
        assert "\"CPU stolen\" is the share of this machine's CPU time" in md
    else:
        assert "CPU stolen: none." in md
    return result


def test_bench_tiny_bundle_cli(tiny_bundle, tmp_path):
    """The console command on a hand-built bundle with synthetic frames. Its graph has no
    backbone, so that stage is reported as not measured, not a crash."""
    out = tmp_path / "bench"
    proc = subprocess.run(linegate_cmd("bench", str(tiny_bundle), "--out", str(out), *TINY),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(out / "bench.json") in proc.stdout
    assert "bench" in proc.stderr  # the progress bar
    result = check_results(out, ["onnxruntime/fp32"], [1, 2], [0, 5])
    assert result["backbone_fps"] == {}
    assert "no node in a `backbone` module scope" in result["skipped"]["backbone onnxruntime/fp32"]
    assert "synthetic parts" in result["settings"]["frames"]


@pytest.mark.pillqc
def test_bench_pillqc_bundle_measures_the_backbone_alone(pillqc_run, pillqc, tmp_path):
    """On a real PaDiM bundle the backbone graph is cut out of the model itself: its outputs are
    the three EfficientNet taps, and all three stages are measured on real images."""
    import onnx

    from benchmarks.backbone_graph import backbone_outputs, write_backbone_graph
    from benchmarks.bench import add_arguments, run

    model_path = pillqc_run / "bundle" / "model.onnx"
    cut = tmp_path / "backbone.onnx"
    write_backbone_graph(model_path, cut)
    graph = onnx.load(str(cut)).graph
    shapes = sorted(tuple(d.dim_value for d in o.type.tensor_type.shape.dim[1:]) for o in graph.output)
    assert shapes == [(24, 56, 56), (40, 28, 28), (112, 14, 14)]
    assert len(backbone_outputs(onnx.load(str(model_path), load_external_data=False))) == 3

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "bench"
    args = parser.parse_args([str(pillqc_run / "bundle"), "--out", str(out), "--images", str(pillqc), *TINY])
    assert run(args, command="linegate bench (test)") == 0
    result = check_results(out, ["onnxruntime/fp32"], [1, 2], [0, 5])
    assert set(result["backbone_fps"]["onnxruntime/fp32"]) == {"1", "2"}
    assert 0 < result["ratios"]["onnxruntime/fp32"]["2"]["model_over_backbone"]
    assert "images from" in result["settings"]["frames"]
    assert result["settings"]["frame_shape"] == [225, 225, 3]  # pillQC as read, preprocessed by the pipeline


def test_pipeline_fps_counts_whole_batches():
    """A partial first batch (the batcher sends what it has after max_wait) must not be timed
    as if its frames had arrived with nothing behind them. Batch 0: 9 frames at t = 1.0;
    batches 1-6: 16 frames each, 0.3 s apart; batch 7: 7 frames 0.15 s later."""
    from benchmarks.bench import batch_fps, steady_fps

    ids, receipts = [0] * 9, [1.0] * 9
    for b in range(1, 7):
        ids += [b] * 16
        receipts += list(1.0 + 0.3 * b - 0.001 * np.arange(16)[::-1])  # a batch's decisions arrive together
    ids += [7] * 7
    receipts += [1.0 + 0.3 * 6 + 0.15] * 7
    ids, receipts = np.array(ids), np.array(receipts)
    assert batch_fps(receipts, ids) == pytest.approx((6 * 16 + 7) / (0.3 * 6 + 0.15))
    assert steady_fps(receipts, 2 * 16) > 1.1 * batch_fps(receipts, ids)  # what counting frames gave


def test_paced_source_stamps_capture_at_the_schedule():
    """A paced bench source stamps each frame when it was due: a consumer (here one that takes
    80 ms per frame at 50 frames/s) that makes it hand frames over late does not move the
    capture times, so that delay shows in the latency, and the lateness is recorded."""
    import threading
    import time

    from benchmarks.bench import _preloaded_source_class

    source = _preloaded_source_class()([np.zeros((4, 4, 3), np.uint8)], count=6, fps=50.0)
    stamps = []
    for frame in source.frames(threading.Event()):
        stamps.append(frame.capture_ts)
        time.sleep(0.08)
    assert np.diff(stamps) == pytest.approx([0.02] * 5, abs=1e-6)
    assert len(source.late_s) == 6 and source.late_s[-1] >= 5 * (0.08 - 0.02)


def test_batcher_floor_times_each_frame_from_when_it_was_due(tiny_bundle):
    """The latency floor feeds a real engine through the runtime's own batcher on a schedule.
    With max_batch 4 and a max_wait longer than four frames take to arrive, every batch is
    four frames in order, so the first of each cannot finish before the fourth was due: at
    least three intervals after its own due time (a bound that a slow machine only raises).
    Frames due in the warm-up are left out."""
    from benchmarks.bench import _paced_batcher_ms
    from edge.bundle import load_bundle
    from edge.engine import OnnxRuntimeEngine

    bundle = load_bundle(tiny_bundle)
    engine = OnnxRuntimeEngine.from_bundle(bundle)
    h, w = bundle.input_size
    tensors = np.random.default_rng(0).uniform(0, 255, (3, 3, h, w)).astype(np.float32)
    rate = 50.0
    ms = _paced_batcher_ms(engine, tensors, rate, count=40, max_batch=4, max_wait_ms=1000, warmup_s=0.2)
    assert len(ms) == 30 and np.isfinite(ms).all() and (ms >= 0).all()  # frames 10-39
    firsts, lasts = ms[2::4], ms[1::4]  # frame ids 12, 16, ... and 11, 15, ...
    assert (firsts >= 3 * 1000 / rate - 1e-6).all()
    assert firsts - lasts[1:] == pytest.approx(3 * 1000 / rate)  # batch-mates finish together


def test_machine_floor_does_the_same_work_on_a_schedule():
    """The machine-alone floor runs one fixed piece of work at the rate: once per due time,
    never before it, the first tenth left out. FixedWork sizes itself on this machine: more
    milliseconds, more repetitions."""
    import time

    from benchmarks.bench import FixedWork, _paced_work_ms

    starts = []

    def work():
        starts.append(time.perf_counter())

    rate = 100.0
    called = time.perf_counter()
    took, late, began = _paced_work_ms(work, rate, count=30)
    assert len(starts) == 30 and len(took) == len(late) == len(began) == 27  # 3 of 30 warm up
    # when each run began, on time.time()'s clock (the steal samples'): paced 10 ms apart
    assert abs(began[0] - time.time()) < 5 and np.median(np.diff(began)) == pytest.approx(1 / rate, abs=0.004)
    assert (took >= 0).all() and (late >= 0).all()
    due = called + np.arange(1, 31) / rate
    assert (np.array(starts) >= due).all()  # paced: never before its due time (a slow box only delays)
    small, large = FixedWork(1.0), FixedWork(20.0)
    assert large.reps > 4 * small.reps  # 20x the time: far more repetitions, whatever the CPU
    large()  # and it runs


def test_steady_fps_and_latency_summary():
    from benchmarks.bench import latency_summary, steady_fps

    receipts = np.arange(0, 10.0, 0.1)  # 10 img/s after any start-up
    assert steady_fps(receipts, 5) == pytest.approx(10.0)
    s = latency_summary(np.arange(1, 101, dtype=float))
    assert s["n"] == 100 and s["max"] == 100 and s["p50"] == pytest.approx(50.5)
    assert s["p99_over_p50"] == pytest.approx(s["p99"] / s["p50"], rel=1e-3)
    assert latency_summary(np.empty(0)) == {"n": 0}


def test_precision_throughput_only_times_saved_variants(tiny_bundle, tmp_path):
    """`--throughput-only DIR` (for timing variants on another CPU): needs the four files and the
    manifest, runs on synthetic frames, and writes throughput with no accuracy section."""
    import shutil

    from benchmarks import precision_throughput as pt

    models = tmp_path / "variants"
    models.mkdir()
    shutil.copyfile(tiny_bundle / "manifest.json", models / "manifest.json")
    shutil.copyfile(tiny_bundle / "model.onnx", models / "fp32.onnx")
    with pytest.raises(SystemExit, match="missing .*fp16.onnx.*--keep-variants"):
        pt.main(["--throughput-only", str(models), "--out", str(tmp_path / "out")])
    for label in ("fp16", "int8", "int8-u8"):  # any model times; these stand in for the real variants
        shutil.copyfile(tiny_bundle / "model.onnx", models / f"{label}.onnx")
    assert pt.main(["--throughput-only", str(models), "--batches", "1,2", "--rounds", "2", "--seconds", "0.05",
                    "--out", str(tmp_path / "out")]) == 0
    [written] = (tmp_path / "out").glob("precision_throughput_tiny_*.json")
    result = json.loads(written.read_text())
    assert result["accuracy"] is None and result["machine"]["cores"] >= 1
    rows = {(r["batch"], r["variant"]): r for r in result["throughput"]}
    assert set(rows) == {(b, v) for b in (1, 2) for v in ("fp32", "fp16", "int8", "int8-u8")}
    assert all(r["fps_median"] > 0 and len(r["fps_rounds"]) == 2 for r in rows.values())
    for (b, v), r in rows.items():  # each ratio is against FP32 at the same batch size
        assert r["ratio_vs_fp32"] == pytest.approx(r["fps_median"] / rows[(b, "fp32")]["fps_median"])
    md = written.with_suffix(".md").read_text()
    assert "Throughput only" in md and "| 2 | int8-u8 |" in md


def test_bench_without_its_optional_packages_says_what_to_install(tiny_bundle, tmp_path):
    """On a runtime-only box (no onnx, matplotlib or tqdm): one line naming the package and the
    extra, exit 2, no traceback. sys.modules[name] = None is how Python spells "not installed"."""
    import sys

    code = ("import sys; sys.modules['tqdm'] = None\n"
            "from linegate.cli import main\n"
            f"sys.exit(main(['bench', {str(tiny_bundle)!r}, '--out', {str(tmp_path / 'b')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "needs the Python package 'tqdm'" in proc.stderr and "linegate[bench]" in proc.stderr
    assert "Traceback" not in proc.stderr


def _check_ab(out: Path, names: list[str], rounds: int) -> str:
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["settings"]) == names
    assert set(result["latency_ms"]) == {"0"} and list(result["latency_ms"]["0"]) == names
    for s in result["latency_ms"]["0"].values():
        assert s["n"] > 0 and 0 < s["p50"] <= s["p99"] <= s["max"] and len(s["p99_over_p50_rounds"]) == rounds
    assert {(t["batch"], t["stage"]) for t in result["throughput"]} == {(b, s) for b in (1, 8) for s in ("model", "pipeline")}
    for t in result["throughput"]:
        assert list(t["fps"]) == names and all(f > 0 for f in t["fps"].values())
        assert list(t["over_first"]) == names[1:]  # the first setting is the baseline
        for n in names[1:]:
            assert len(t["over_first_rounds"][n]) == rounds
            assert t["over_first"][n] == pytest.approx(float(np.median(t["over_first_rounds"][n])), abs=1e-3)
    return out.with_suffix(".md").read_text()


def test_engine_ab_compares_spinning_and_writes_its_tables(tiny_bundle, tmp_path):
    """benchmarks.engine_ab on the tiny bundle: both engines measured in every round, the ratio
    per round and its median, and the Markdown rows, from one short run."""
    from benchmarks import engine_ab

    out = tmp_path / "ab"
    assert engine_ab.main([str(tiny_bundle), "--rounds", "2", "--seconds", "0.2", "--rate", "20",
                           "--latency-seconds", "1.5", "--wait-ms", "0", "--out", str(out)]) == 0
    md = _check_ab(out, ["spin", "stop"], 2)
    assert "| 0 | spin |" in md and "| 0 | stop |" in md and "| 8 | pipeline |" in md and "| stop / spin |" in md


def test_engine_ab_compares_thread_counts(tiny_bundle, tmp_path):
    """--threads: one engine per count, each built with that many intra-op threads."""
    from benchmarks import engine_ab

    out = tmp_path / "threads"
    assert engine_ab.main([str(tiny_bundle), "--threads", "2,1", "--rounds", "1", "--seconds", "0.2",
                           "--rate", "20", "--latency-seconds", "1.5", "--wait-ms", "0", "--out", str(out)]) == 0
    md = _check_ab(out, ["2 threads", "1 thread"], 1)
    assert "intra-op thread count" in md and "| 1 thread / 2 threads |" in md
    assert json.loads(out.with_suffix(".json").read_text())["settings"] == {"2 threads": {"threads": 2},
                                                                             "1 thread": {"threads": 1}}


@pytest.mark.parametrize("bad", ["8", "4,4", "4,0", "four,2"])
def test_engine_ab_refuses_bad_thread_lists(bad, capsys):
    from benchmarks import engine_ab

    with pytest.raises(SystemExit) as stop:
        engine_ab.main(["unused-bundle", "--threads", bad])
    assert stop.value.code == 2
    assert "two or more different positive thread counts" in capsys.readouterr().err


def test_replay_engine_gives_the_model_outputs_back(tiny_bundle):
    """pipeline_cpu --replay: the model's own scores and maps, by input, at no model cost."""
    from benchmarks.bench import load_frames
    from benchmarks.pipeline_cpu import ReplayEngine
    from edge.bundle import load_bundle
    from edge.engine import OnnxRuntimeEngine
    from edge.images import preprocess

    bundle = load_bundle(tiny_bundle)
    frames, _ = load_frames(None, bundle.input_size, 6)
    tensors = np.stack([preprocess(f, bundle.input_size, bundle.interpolation) for f in frames])
    real = OnnxRuntimeEngine.from_bundle(bundle)
    replay = ReplayEngine(real, tensors)
    order = [4, 0, 4, 2]  # any order, repeats too
    scores, maps = replay.infer(tensors[order])
    want_scores, want_maps = real.infer(tensors[order])
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(maps, want_maps)
    replay.infer(np.zeros_like(tensors[:3]))  # the pipeline's warm-up batch
    with pytest.raises(KeyError, match="no output for"):
        replay.infer(tensors[:1] + 1.0)


def test_pipeline_cpu_replay_runs_the_pipeline_and_writes_its_figures(tmp_path):
    from benchmarks import pipeline_cpu

    every_frame_rejects = make_tiny_bundle(tmp_path / "bundle", threshold=0.0)
    out = tmp_path / "cpu.json"
    assert pipeline_cpu.main([str(every_frame_rejects), "--batch", "4", "--frames", "48", "--rounds", "1", "--replay",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["engine"].startswith("replay")
    (row,) = result["rounds"]
    assert row["pipeline"]["frames"] == 48 and row["pipeline"]["fps"] > 0
    assert "publishing thread (decide, overlays, publish)" in row["pipeline"]["cpu_ms_per_frame"]  # 10 ms ticks: may read 0
    assert row["pipeline"]["overlay_fraction"] == 1.0  # the model's decisions: every frame a reject
    assert set(result["stage_cpu_ms_per_frame"]) >= {"preprocess (resize + CHW float32)", "render overlay"}


def test_report_suggests_fewer_engine_threads_only_where_they_may_help():
    """On a many-core box whose pipeline fell short of the model with ONNX Runtime on every
    core, the report says what to try; on a small box, with threads set, or when the pipeline
    keeps up, it says nothing of it."""
    import copy

    from benchmarks.bench_report import markdown

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    xeon = json.loads((results / "bench_padim_xeon" / "bench.json").read_text())  # 16 cores, pipeline 0.753
    assert "`python -m benchmarks.engine_ab BUNDLE --threads 16,14 --rate 241.2`" in markdown(xeon)
    # its machine-alone arithmetic ran 95% busy: the report calls its lateness backlog
    assert "keeps its thread busy 95% of the time, so a late start is mostly the backlog" in markdown(xeon)

    def variant(change) -> dict:
        result = copy.deepcopy(xeon)
        change(result)
        return result
    no_latency = variant(lambda r: r.pop("latency_ms"))
    assert "`python -m benchmarks.engine_ab BUNDLE --threads 16,14`, then" in markdown(no_latency)
    for quiet in (variant(lambda r: r["machine"].update(cores=4)),
                  variant(lambda r: r["settings"].update(threads=14)),
                  variant(lambda r: r["ratios"]["onnxruntime/fp32"]["8"].update(pipeline_over_model=0.9))):
        assert "engine_ab" not in markdown(quiet)
