"""The per-stage latency windows behind the `stats` topic (edge.stats)."""
import numpy as np
import pytest

from edge.stats import STAGES, LatencyWindow, StageLatencies


def summary_ms(seconds) -> dict:
    ms = np.asarray(seconds, np.float64)
    p50, p95, p99 = np.percentile(ms, (50, 95, 99)) * 1000.0
    return {"n": len(ms), "p50": round(float(p50), 3), "p95": round(float(p95), 3),
            "p99": round(float(p99), 3), "max": round(float(ms.max() * 1000.0), 3)}


def test_window_past_its_capacity_keeps_the_newest_samples():
    window = LatencyWindow(capacity=4)
    samples = [0.001 * (i + 1) for i in range(10)]  # 1 ms .. 10 ms
    for s in samples[:3]:
        window.add(s)  # one at a time...
    window.add(np.array(samples[3:7]))  # ...a batch that wraps the ring...
    window.add(np.array(samples[7:]))  # ...and another
    got = window.take()
    assert got == summary_ms(samples[-4:])  # 7, 8, 9, 10 ms: the oldest six were overwritten
    assert got["n"] == 4 and got["max"] == 10.0 and got["p50"] == 8.5
    assert window.take() is None  # take() starts a new window


def test_a_batch_larger_than_the_window_keeps_its_newest_samples():
    window = LatencyWindow(capacity=4)
    window.add(0.5)
    window.add(np.arange(1, 11) / 1000.0)
    assert window.take() == summary_ms(np.arange(7, 11) / 1000.0)
    window.add([0.002, 0.001])  # a fresh window after take(), below capacity
    assert window.take() == summary_ms([0.002, 0.001])


def test_stage_latencies_report_every_stage_separately():
    lat = StageLatencies(capacity=4)
    lat.add("inference", 0.004)
    lat.add("end_to_end", np.array([0.01, 0.02]))
    taken = lat.take()
    assert set(taken) == set(STAGES)
    assert taken["inference"] == summary_ms([0.004]) and taken["end_to_end"] == summary_ms([0.01, 0.02])
    assert all(taken[s] is None for s in STAGES if s not in ("inference", "end_to_end"))
    with pytest.raises(ValueError, match="capacity"):
        LatencyWindow(capacity=0)
