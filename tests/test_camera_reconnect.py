"""A real HTTP MJPEG camera (served by the test on 127.0.0.1) goes away and comes back while
`linegate run` reads it and a second camera: the runtime reconnects by itself, decisions
resume, the outage shows in the stats counters, and the other camera never stops."""
from __future__ import annotations

import re
import signal
import time

from conftest import free_tcp_endpoint
from mjpeg_server import MjpegServer
from runtime_helpers import Collector, RunProcess, write_config

OUTAGE_S = 3.0


def test_camera_outage_and_reconnect_while_another_camera_goes_on(tiny_bundle, tmp_path):
    flaky = MjpegServer(level=40, fps=20).start()  # dark parts: accept
    steady = MjpegServer(level=230, fps=20).start()  # bright parts: reject
    endpoint = free_tcp_endpoint()
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "batching": {"max_batch": 4, "max_wait_ms": 5.0},
        "publisher": {"endpoint": endpoint, "stats_interval_s": 0.25, "wait_subscribers": 2},
        "source": [
            {"id": "flaky", "uri": flaky.url, "backoff_s": 0.1, "backoff_max_s": 0.4, "io_timeout_s": 2.0},
            {"id": "steady", "uri": steady.url},
        ],
    })
    sub = Collector(endpoint)  # decision + stats: two subscriptions
    sub.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        sub.wait_for(lambda: len(sub.decisions("flaky")) >= 10, 60, "the flaky camera's first decisions")
        flaky.stop()
        gone = time.monotonic()
        time.sleep(OUTAGE_S)
        flaky.start()  # same port: the camera is back
        back = time.monotonic()
        sub.wait_for(lambda: len(sub.decisions("flaky", since=back)) >= 10, 30,
                     "the flaky camera's decisions after it came back")
        sub.wait_for(lambda: any(m.header["cameras"]["flaky"]["state"] == "connected"
                                 and m.header["cameras"]["flaky"]["reconnects"] >= 1
                                 for m in sub.messages("stats", since=back)), 30,
                     "a stats message that shows the reconnection")
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(timeout=20) == 0, run.log()
        # the last messages left before the exit; wait for them rather than for a while
        total = int(re.search(r"done: (\d+) frames", run.log()).group(1))
        sub.wait_for(lambda: len(sub.decisions()) == total and any(
            m.header["state"] == "stopping" and m.header["frames"] == total for m in sub.messages("stats")),
            30, f"all {total} decisions and the final stats message")
    finally:
        run.kill()
        sub.stop()
        flaky.stop()
        steady.stop()
    log = run.log()

    flaky_ids = [d["frame_id"] for d in sub.decisions("flaky")]
    assert flaky_ids == sorted(flaky_ids) and len(set(flaky_ids)) == len(flaky_ids)
    assert {d["decision"] for d in sub.decisions("flaky")} == {"accept"}
    assert {d["decision"] for d in sub.decisions("steady")} == {"reject"}
    # the other camera never stopped: decisions during the outage (a second's margin at its
    # start for the flaky camera's last frames to leave the pipeline)
    during = sub.decisions("steady", since=gone + 1.0, until=back)
    assert during and [d["frame_id"] for d in during] == sorted({d["frame_id"] for d in during})
    assert not sub.decisions("flaky", since=gone + 1.0, until=back)
    # no decision message was lost on the way (seq gaps)
    assert sub.sub.gaps["decision"] == 0

    stats = [m.header for m in sub.messages("stats")]
    in_outage = [m.header for m in sub.messages("stats", since=gone + 1.0, until=back)]
    assert len(in_outage) >= 2, f"{len(in_outage)} stats message(s) during the outage"
    for s in in_outage:
        assert s["cameras"]["flaky"]["state"] in ("lost", "down") and s["cameras"]["flaky"]["fps"] == 0
        assert s["cameras"]["steady"]["state"] == "connected"
    # the steady camera's decisions went on counting through the outage; the flaky one's did not
    assert in_outage[-1]["cameras"]["steady"]["decisions"] > in_outage[0]["cameras"]["steady"]["decisions"]
    assert in_outage[-1]["cameras"]["flaky"]["decisions"] == in_outage[0]["cameras"]["flaky"]["decisions"]
    final = stats[-1]["cameras"]
    assert stats[-1]["state"] == "stopping" and stats[-1]["frames"] == total
    assert final["flaky"]["lost"] >= 1 and final["flaky"]["reconnects"] >= 1
    assert final["flaky"]["errors"] >= 1  # reopening failed while the server was down
    # outage_s covers at least the span the stats themselves reported the camera away (their
    # uptime_s comes from the service's own clock)
    reported_away = in_outage[-1]["uptime_s"] - in_outage[0]["uptime_s"]
    assert final["flaky"]["outage_s"] >= reported_away - 0.002 and reported_away > 0  # (3-decimal rounding)
    assert final["flaky"]["state"] == "connected" or stats[-1]["state"] == "stopping"
    assert final["steady"]["lost"] == 0 and final["steady"]["reconnects"] == 0
    # one log line per state change, naming the camera
    assert log.count("flaky: lost") == 1
    assert log.count("flaky: cannot open") == 1
    assert log.count("flaky: connected to") == 2
