"""benchmarks.steal: the CPU time a hypervisor took (/proc/stat's steal), and which frames'
flights it overlapped. Real files read by a real sampler thread; the kernel's own /proc/stat
where there is one."""
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_report import _steal_text
from benchmarks.steal import (StealSampler, read_cpu_times, steal_fraction, stolen_between,
                              tail_overlap)


def stat_text(steal: int, idle: int = 1000) -> str:
    # user nice system idle iowait irq softirq steal guest guest_nice, then the per-CPU lines
    return (f"cpu  500 10 200 {idle} 5 0 3 {steal} 40 0\n"
            f"cpu0 250 5 100 {idle // 2} 2 0 1 {steal // 2} 20 0\nintr 12345\n")


def test_read_cpu_times_takes_steal_and_the_total_without_guest(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(stat_text(steal=70))
    # guest time (40) is already inside user: the total is the first eight columns
    assert read_cpu_times(stat) == (70, 500 + 10 + 200 + 1000 + 5 + 0 + 3 + 70)
    stat.write_text("cpu  500 10 200 1000 5 0 3\n")  # a kernel without the steal column
    assert read_cpu_times(stat) is None
    assert read_cpu_times(tmp_path / "missing") is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat (not Linux)")
def test_read_cpu_times_on_this_kernel():
    first = read_cpu_times()
    assert first is not None and 0 <= first[0] <= first[1]
    time.sleep(0.1)
    second = read_cpu_times()
    assert second[1] > first[1]  # the clock ticks on
    assert 0 <= steal_fraction(first, second) <= 1


def test_steal_fraction():
    assert steal_fraction((10, 1000), (30, 1400)) == pytest.approx(0.05)
    assert steal_fraction(None, (30, 1400)) is None
    assert steal_fraction((10, 1000), (10, 1000)) is None  # no time passed: unknown, not zero


def test_stolen_between_widens_each_window_to_the_samples_around_it():
    t = np.array([0.00, 0.01, 0.02, 0.03, 0.04])
    steal = np.array([0, 0, 2, 2, 5])  # ticks
    starts = np.array([0.000, 0.012, 0.021, 0.031, -1.0])
    ends = np.array([0.009, 0.019, 0.029, 0.050, 0.005])
    got = stolen_between(t, steal, starts, ends, tick_ms=10.0)
    # [0, .01] -> 0; [.01, .02] -> 2 ticks; [.02, .03] -> 0; [.03, last] -> 3; before the first sample -> from it
    np.testing.assert_array_equal(got, [0.0, 20.0, 0.0, 30.0, 0.0])


def test_sampler_sees_a_steal_counter_that_moves(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(stat_text(steal=100, idle=1000))
    entered = time.time()
    with StealSampler(interval_s=0.005, path=stat) as sampler:
        time.sleep(0.05)
        quiet = (time.time(), time.time() + 0.02)
        time.sleep(0.25)  # the sampler has read the quiet window's end long before the counter moves
        before = time.time()
        time.sleep(0.02)
        stat.write_text(stat_text(steal=103, idle=1097))  # 3 ticks stolen out of 100
        time.sleep(0.02)
        after = time.time()
        time.sleep(0.05)
    left = time.time()
    stolen = sampler.stolen_ms(np.array([before, quiet[0], entered]), np.array([after, quiet[1], left]))
    tick = 1000.0 / os.sysconf("SC_CLK_TCK")
    np.testing.assert_allclose(stolen, [3 * tick, 0.0, 3 * tick])  # the whole block: from entry to exit


def test_sampler_without_proc_stat_reports_nothing(tmp_path):
    with StealSampler(path=tmp_path / "missing") as sampler:
        pass
    assert sampler.stolen_ms(np.array([0.0]), np.array([1.0])) is None
    assert not any(t.name == "steal-sampler" for t in threading.enumerate())


def test_tail_overlap_counts_the_slowest_frames_that_were_interrupted():
    latency = np.concatenate([np.full(990, 10.0), np.linspace(30, 60, 10)])
    stolen = np.zeros(1000)
    stolen[990:998] = 20.0  # eight of the ten slowest
    stolen[:99] = 10.0  # a tenth of the others
    got = tail_overlap(latency, stolen)
    p99 = np.percentile(latency, 99)
    assert got["frames_above_p99"] == int((latency > p99).sum()) and got["frames_above_p99"] > 0
    assert got["above_p99_with_steal"] == int((stolen[latency > p99] > 0).sum())
    assert got["at_or_below_p50_with_steal"] == pytest.approx(0.1, abs=0.001)
    slow = latency > p99
    assert got["above_p99_stolen_ms_p50"] == pytest.approx(float(np.median(stolen[slow])), abs=0.05)
    assert got["above_p99_over_p50_ms_p50"] == pytest.approx(float(np.median(latency[slow] - 10.0)), abs=0.05)
    assert tail_overlap(np.empty(0), np.empty(0))["frames_above_p99"] == 0


def _lat(steal_rounds, tail):
    row = {"steal_pct_rounds": steal_rounds, "tail_steal": tail}
    return {"by_max_wait_ms": {"0": row}, "batcher_alone": {"0": {"steal_pct_rounds": steal_rounds}},
            "engine_alone": {"steal_pct_rounds": steal_rounds}, "steal_tick_ms": 10.0}


def test_report_says_the_tail_is_the_hosts_only_when_the_slowest_frames_were_hit():
    hit = " ".join(_steal_text(_lat([1.5, 4.0], {"frames_above_p99": 10, "above_p99_with_steal": 9,
                                                    "at_or_below_p50_with_steal": 0.12, "above_p99_stolen_ms_p50": 40.0,
                                                    "above_p99_over_p50_ms_p50": 35.5})))
    assert "1.5-4.0% here" in hit and "max_wait_ms 0: 9 of 10, against 12%; 40.0 ms stolen, 35.5 ms over p50" in hit
    assert "For max_wait_ms 0, most of the slowest frames" in hit and "that tail is mostly the host's" in hit
    # hit as often, but by gaps far smaller than their lateness: not the host's either
    small = " ".join(_steal_text(_lat([1.5, 4.0], {"frames_above_p99": 10, "above_p99_with_steal": 9,
                                                      "at_or_below_p50_with_steal": 0.12, "above_p99_stolen_ms_p50": 10.0,
                                                      "above_p99_over_p50_ms_p50": 35.5})))
    assert "10.0 ms stolen" in small and "host's" not in small
    # slow frames no more often interrupted than median ones: not the host's to blame
    even = " ".join(_steal_text(_lat([1.5, 4.0], {"frames_above_p99": 10, "above_p99_with_steal": 3,
                                                     "at_or_below_p50_with_steal": 0.25})))
    assert "3 of 10" in even and "host's" not in even
    none = " ".join(_steal_text(_lat([0.0, 0.0], {"frames_above_p99": 10, "above_p99_with_steal": 0,
                                                     "at_or_below_p50_with_steal": 0.0})))
    assert "CPU stolen: none." in none
    assert "not measured" in " ".join(_steal_text(_lat([None, None], None)))


def test_report_names_the_fixed_arithmetic_tail_too():
    lat = _lat([2.0, 9.0], {"frames_above_p99": 10, "above_p99_with_steal": 2, "at_or_below_p50_with_steal": 0.2,
                            "above_p99_stolen_ms_p50": 0.0, "above_p99_over_p50_ms_p50": 30.0})
    lat["machine_alone"] = {"steal_pct_rounds": [2.0, 9.0],
                            "tail_steal": {"frames_above_p99": 8, "above_p99_with_steal": 8, "at_or_below_p50_with_steal": 0.1,
                                           "above_p99_stolen_ms_p50": 30.0, "above_p99_over_p50_ms_p50": 20.0}}
    text = " ".join(_steal_text(lat))
    assert "max_wait_ms 0: 2 of 10, against 20%; 0.0 ms stolen" in text
    assert "machine alone (its runs of arithmetic): 8 of 8, against 10%; 30.0 ms stolen, 20.0 ms over p50" in text
    assert "For machine alone (its runs of arithmetic), most" in text  # the fixed arithmetic's tail is the host's; the pipeline's is not
