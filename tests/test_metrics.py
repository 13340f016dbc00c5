"""Prometheus metrics: scraped over HTTP and parsed with prometheus_client's own parser, they
agree with what a real subscriber counted over the same run (a pause in the middle)."""
from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from conftest import free_tcp_endpoint
from edge.bundle import load_bundle
from edge.control import Controller
from edge.decision import DecisionRule
from edge.engine import open_engine
from edge.metrics import MetricsServer
from edge.pipeline import Pipeline, RunOptions
from edge.publisher import Publisher
from edge.sources import parse_source
from runtime_helpers import Collector


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_scraped_metrics_agree_with_a_subscriber(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    sources = [parse_source(f"synthetic:count=150,fps=100,size=64,seed={i}", f"cam{i}") for i in range(2)]
    publisher = Publisher(free_tcp_endpoint())
    options = RunOptions(max_batch=4, wait_subscribers=2, wait_timeout_s=20)
    pipeline = Pipeline(bundle, open_engine(bundle), DecisionRule.from_bundle(bundle, threshold=0.3), sources,
                        publisher, options)
    controller = Controller(pipeline)
    pipeline.monitor = controller
    metrics = MetricsServer("127.0.0.1:0", pipeline, controller)
    collector = Collector(publisher.endpoint, ("decision", "event"))
    collector.start()

    def pause_for_a_while() -> None:
        while sum(pipeline.decisions_by_result.values()) < 60:
            time.sleep(0.01)
        controller.pause("test")
        time.sleep(0.5)
        controller.resume("test")

    operator = threading.Thread(target=pause_for_a_while, daemon=True)
    operator.start()
    try:
        summary = pipeline.run()
        operator.join(10)
        collector.wait_for(lambda: len(collector.decisions()) == summary.frames, 10, "every decision")
        scraped = _scrape(metrics.url)
    finally:
        collector.stop()
        metrics.close()
    counted = Counter((d["camera_id"], d["decision"]) for d in collector.decisions())
    reported = {(dict(k)["camera"], dict(k)["decision"]): v for k, v in scraped["linegate_decisions_total"].items()}
    assert reported == dict(counted) and sum(counted.values()) == summary.frames
    paused = {dict(k)["camera"]: v for k, v in scraped["linegate_frames_paused_total"].items()}
    assert sum(paused.values()) > 0
    for cam in ("cam0", "cam1"):  # every frame read is either decided or counted as paused (queue policy: no drops)
        read = scraped["linegate_frames_read_total"][(("camera", cam),)]
        decided = sum(v for (c, _), v in counted.items() if c == cam)
        assert read == 150 == decided + paused[cam]
        assert scraped["linegate_frames_dropped_total"][(("camera", cam),)] == 0
        assert scraped["linegate_threshold"][(("camera", cam),)] == 0.3
    e2e = scraped["linegate_latency_seconds_count"][(("stage", "end_to_end"),)]
    assert e2e == summary.frames  # one end-to-end sample per decision
    buckets = {dict(k)["le"]: v for k, v in scraped["linegate_latency_seconds_bucket"].items()
               if dict(k)["stage"] == "end_to_end"}
    ordered = [buckets[le] for le in sorted(buckets, key=float)]  # cumulative, "+Inf" last
    assert ordered == sorted(ordered) and ordered[-1] == e2e
    assert scraped["linegate_model_info"][(("bundle", str(tiny_bundle)), ("model_id", "tiny-test"))] == 1
    assert scraped["linegate_paused"][()] == 0 and scraped["linegate_settings_version"][()] == 2
    assert scraped["linegate_engine_failures_total"][()] == 0
    assert scraped["linegate_messages_total"][(("topic", "decision"),)] == summary.frames
    assert {dict(k)["queue"] for k in scraped["linegate_queue_depth"]} == {"frames", "results", "overlays"}
    states = {dict(k)["camera"]: dict(k)["state"] for k in scraped["linegate_camera_state"]}
    assert states == {"cam0": "ended", "cam1": "ended"}
    assert [(e["what"], e["who"]) for e in (m.header for m in collector.messages("event"))] == [
        ("start", "local"), ("pause", "test"), ("resume", "test")]



def test_linegate_run_metrics_flag_serves_metrics_over_http(tiny_bundle, tmp_path):
    import signal
    import socket
    import subprocess

    from conftest import linegate_cmd

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source", "synthetic:fps=30,size=64",
                                         "--publish", free_tcp_endpoint(), "--metrics", f"127.0.0.1:{port}",
                                         "--control", free_tcp_endpoint()), stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scraped = _scrape(f"http://127.0.0.1:{port}/metrics")
                if sum(scraped.get("linegate_decisions_total", {}).values()) > 0:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.2)
        assert scraped["linegate_frames_read_total"][(("camera", "cam0"),)] > 0
        assert scraped["linegate_threshold"][(("camera", "cam0"),)] == 0.5
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        log.close()
    assert f"metrics on http://127.0.0.1:{port}/metrics" in (tmp_path / "run.log").read_text()
