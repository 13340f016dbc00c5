"""CPU time the hypervisor took from this machine while the bench ran ("steal").

On a virtual machine the host may run other guests on the physical cores this guest's
virtual CPUs were using; Linux counts that time as `steal` in /proc/stat. A frame whose
engine call or hand-over falls in such a gap is late by the gap, whatever linegate does, so
the latency report says how much was stolen and how many of its slowest frames overlapped
stolen time. /proc/stat counts in clock ticks (USER_HZ, 10 ms on most kernels): a window
"overlapped stolen time" when the steal count moved between the samples around it.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

PROC_STAT = Path("/proc/stat")
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 10.0


def read_cpu_times(path: Path = PROC_STAT) -> tuple[int, int] | None:
    """(steal, total) clock ticks over all CPUs from the first ("cpu") line of /proc/stat;
    None where there is no such file or its line has no steal column (kernels before 2.6.11)."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    # already inside user and nice, so the total is the first eight
    ticks = [int(v) for v in fields[1:9]]
    return ticks[7], sum(ticks)


def steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of all CPUs' time between two read_cpu_times() that was stolen; None if unknown."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def stolen_between(sample_t: np.ndarray, sample_steal: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   tick_ms: float = TICK_MS) -> np.ndarray:
    """ms of steal counted between the last sample at or before each start and the first at or
    after each end (over all CPUs, to the counter's tick): what each window overlapped."""
    first = np.clip(np.searchsorted(sample_t, starts, side="right") - 1, 0, len(sample_t) - 1)
    last = np.clip(np.searchsorted(sample_t, ends, side="left"), 0, len(sample_t) - 1)
    return (sample_steal[last] - sample_steal[first]) * tick_ms


class StealSampler:
    """Reads the steal count every `interval_s` on a thread while in a `with` block, stamped
    with time.time() (the clock the pipeline's capture and receipt times use). 10 ms matches the
    counter's own resolution; a sample took 57 us of CPU on the 2-core box (0.6% of a core)."""

    def __init__(self, interval_s: float = 0.01, path: Path = PROC_STAT) -> None:
        self.interval_s, self.path = interval_s, path
        self._t: list[float] = []
        self._steal: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steal-sampler", daemon=True)

    def _sample(self) -> tuple[int, int] | None:
        times = read_cpu_times(self.path)
        if times is not None:
            self._t.append(time.time())
            self._steal.append(times[0])
        return times

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "StealSampler":
        if self._sample() is not None:  # no /proc/stat steal counter: nothing to sample
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()

    def stolen_ms(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
        """Per window (time.time() seconds), the ms of steal it overlapped; None if not sampled."""
        if len(self._t) < 2:
            return None
        return stolen_between(np.asarray(self._t), np.asarray(self._steal), np.asarray(starts), np.asarray(ends))


def tail_overlap(latency_ms: np.ndarray, stolen_ms: np.ndarray) -> dict:
    """How many of the frames slower than p99 (as latency_summary takes it) overlapped stolen
    time, against those at or below p50: on a VM whose slowest frames are the ones the host
    interrupted, the tail is the host's."""
    if not len(latency_ms):
        return {"frames_above_p99": 0, "above_p99_with_steal": 0, "at_or_below_p50_with_steal": None}
    p50, p99 = np.percentile(latency_ms, 50), np.percentile(latency_ms, 99)
    slow = latency_ms > p99
    tail, body = stolen_ms[slow], stolen_ms[latency_ms <= p50]
    result = {"frames_above_p99": int(len(tail)), "above_p99_with_steal": int((tail > 0).sum()),
              "at_or_below_p50_with_steal": round(float((body > 0).mean()), 3) if len(body) else None}
    if len(tail):  # how much was stolen in a slow frame's flight, next to how late it was
        result["above_p99_stolen_ms_p50"] = round(float(np.median(tail)), 1)
        result["above_p99_over_p50_ms_p50"] = round(float(np.median(latency_ms[slow] - p50)), 1)
    return result
