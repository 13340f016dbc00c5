"""Prometheus metrics of a running line (``[metrics] listen = "127.0.0.1:9108"``), with the
official client (prometheus-client: small, pure Python, no web framework).

Counters and gauges are read from the pipeline when Prometheus scrapes (a custom collector),
so the hot path pays nothing for them; the latency histograms are filled per batch with numpy
(one bucket search per batch, not one Python call per frame).

    linegate_decisions_total{camera,decision}      decisions published (accept/reject/error)
    linegate_frames_read_total{camera}             frames the source delivered
    linegate_frames_dropped_total{camera}          replaced by a newer frame ("latest" policy)
    linegate_frames_paused_total{camera}           captured while paused: counted, not judged
    linegate_bad_frames_total{camera}              frames that could not be inspected
    linegate_latency_seconds{stage}                histogram per stage (edge.stats.STAGES)
    linegate_queue_depth{queue}                    frames / results / overlays waiting
    linegate_camera_state{camera,state}            1 for the camera's current state
    linegate_engine_failures_total                 batches the engine failed on
    linegate_model_info{model_id,bundle}           the model in force
    linegate_threshold{camera}                     the threshold in force per camera
    linegate_paused, linegate_settings_version, linegate_uptime_seconds
    linegate_messages_total{topic}, linegate_messages_dropped_total{topic}
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.registry import Collector

from .config import parse_listen
from .stats import STAGES

BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Histogram:
    """Cumulative bucket counts, added a batch at a time (thread-safe)."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS_S) -> None:
        self.bounds = np.asarray(bounds, np.float64)
        self.counts = np.zeros(len(bounds) + 1, np.int64)  # last: above every bound
        self.sum = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float | np.ndarray) -> None:
        values = np.atleast_1d(np.asarray(seconds, np.float64))
        # "le" buckets: a value equal to a bound belongs to it
        idx = np.searchsorted(self.bounds, values, side="left")
        counts = np.bincount(idx, minlength=len(self.counts))
        with self._lock:
            self.counts += counts
            self.sum += float(values.sum())

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        with self._lock:
            cumulative = np.cumsum(self.counts)
            total = self.sum
        out = [(repr(float(b)), float(c)) for b, c in zip(self.bounds, cumulative[:-1])]
        out.append(("+Inf", float(cumulative[-1])))
        return out, total


class LineCollector(Collector):
    """Everything a scrape reports, read from the pipeline and its controller."""

    def __init__(self, pipeline: Any, controller: Any = None) -> None:
        self.pipeline = pipeline
        self.controller = controller
        self.latency = {stage: Histogram() for stage in STAGES}
        pipeline.latency.listener = self._observe
        self._started = time.monotonic()

    def _observe(self, stage: str, seconds: float | np.ndarray) -> None:
        self.latency[stage].add(seconds)

    def collect(self) -> Iterator[Any]:
        p = self.pipeline
        cams = [s.camera_id for s in p.sources]
        c = CounterMetricFamily("linegate_decisions", "Decisions published", labels=["camera", "decision"])
        for (cam, decision), n in sorted(p.decisions_by_result.items()):
            c.add_metric([cam, decision], n)
        yield c
        per_camera = (
            ("linegate_frames_read", "Frames the source delivered", lambda s: s.counters["frames"]),
            ("linegate_frames_dropped", "Frames replaced by a newer one (latest policy)",
             lambda s: p._queue.dropped.get(s.camera_id, 0)),
            ("linegate_frames_paused", "Frames captured while paused: counted, not judged",
             lambda s: p.paused_frames[s.camera_id]),
            ("linegate_bad_frames", "Frames that could not be inspected", lambda s: s.counters.get("bad_frames", 0)),
        )
        for name, text, value in per_camera:
            c = CounterMetricFamily(name, text, labels=["camera"])
            for s in p.sources:
                c.add_metric([s.camera_id], value(s))
            yield c
        h = HistogramMetricFamily("linegate_latency_seconds", "Latency per pipeline stage", labels=["stage"])
        for stage, hist in self.latency.items():
            buckets, total = hist.buckets()
            h.add_metric([stage], buckets, total)
        yield h
        g = GaugeMetricFamily("linegate_queue_depth", "Items waiting", labels=["queue"])
        for queue, n in p.queue_depths().items():
            g.add_metric([queue], n)
        yield g
        g = GaugeMetricFamily("linegate_camera_state", "1 for the camera's current state", labels=["camera", "state"])
        for s in p.sources:
            g.add_metric([s.camera_id, str(s.state)], 1)
        yield g
        yield CounterMetricFamily("linegate_engine_failures", "Batches the engine failed on",
                                  value=p.engine_failures_total)
        model = p.model
        bundle = self.controller.bundle_path if self.controller is not None else str(model.bundle.path)
        yield InfoMetricFamily("linegate_model", "The model in force", value={"model_id": model.model_id,
                                                                                "bundle": bundle})
        g = GaugeMetricFamily("linegate_threshold", "Threshold in force", labels=["camera"])
        for cam, t in model.thresholds(cams).items():
            g.add_metric([cam], t)
        yield g
        yield GaugeMetricFamily("linegate_paused", "1 while paused", value=int(p.paused))
        if self.controller is not None:
            yield GaugeMetricFamily("linegate_settings_version", "Changes to the live settings since start",
                                    value=self.controller.settings_version)
        yield GaugeMetricFamily("linegate_uptime_seconds", "Seconds since the metrics started",
                                value=time.monotonic() - self._started)
        sent = CounterMetricFamily("linegate_messages", "Messages handed to ZeroMQ", labels=["topic"])
        dropped = CounterMetricFamily("linegate_messages_dropped", "Messages ZeroMQ refused (nodrop)",
                                      labels=["topic"])
        for topic, n in sorted(p.publisher.sent.items()):
            sent.add_metric([topic], n)
            dropped.add_metric([topic], p.publisher.dropped.get(topic, 0))
        yield sent
        yield dropped


class MetricsServer:
    """The /metrics HTTP endpoint (prometheus-client's own WSGI server, a daemon thread)."""

    def __init__(self, listen: str, pipeline: Any, controller: Any = None) -> None:
        host, port = parse_listen(listen)
        self.registry = CollectorRegistry()
        self.collector = LineCollector(pipeline, controller)
        self.registry.register(self.collector)
        try:
            self._httpd, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ValueError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from exc
        self.port = self._httpd.server_address[1]
        self.url = f"http://{host if ':' not in host else '[' + host + ']'}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def serve_metrics(listen: str, pipeline: Any, controller: Any = None) -> MetricsServer:
    import logging

    server = MetricsServer(listen, pipeline, controller)
    logging.getLogger(__name__).info("metrics on %s", server.url)
    return server
