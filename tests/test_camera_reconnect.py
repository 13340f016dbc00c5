"""A real HTTP MJPEG camera (served by the test on 127.0.0.1) goes away and comes back while
`linegate run` reads it and a second camera: the runtime reconnects by itself, decisions
resume, the outage shows in the stats counters, and the other camera never stops."""
from __future__ import annotations

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
        time.sleep(0.6)  # one more stats message or two after the reconnection
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(timeout=20) == 0, run.log()
        time.sleep(0.3)
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
    # the other camera never stopped: decisions all through the outage, at its own rate
    # (20 fps; "latest" may skip a frame when inference lags, so ask for a third of it)
    during = sub.decisions("steady", since=gone + 0.5, until=back)
    assert len(during) >= 20 * (OUTAGE_S - 0.5) / 3, len(during)
    assert not sub.decisions("flaky", since=gone + 0.5, until=back)
    # no decision message was lost on the way (seq gaps)
    assert sub.sub.gaps["decision"] == 0

    stats = [m.header for m in sub.messages("stats")]
    in_outage = [s for s in sub.messages("stats", since=gone + 0.5, until=back)]
    assert in_outage, "no stats during the outage"
    for s in (m.header for m in in_outage):
        assert s["cameras"]["flaky"]["state"] in ("lost", "down") and s["cameras"]["flaky"]["fps"] == 0
        assert s["cameras"]["steady"]["state"] == "connected"
    assert max(m.header["cameras"]["steady"]["fps"] for m in in_outage) > 5
    final = stats[-1]["cameras"]
    assert final["flaky"]["lost"] >= 1 and final["flaky"]["reconnects"] >= 1
    assert final["flaky"]["errors"] >= 1  # reopening failed while the server was down
    assert OUTAGE_S - 0.5 <= final["flaky"]["outage_s"] <= OUTAGE_S + 5
    assert final["flaky"]["state"] == "connected" or stats[-1]["state"] == "stopping"
    assert final["steady"]["lost"] == 0 and final["steady"]["reconnects"] == 0
    # one log line per state change, naming the camera
    assert log.count("flaky: lost") == 1
    assert log.count("flaky: cannot open") == 1
    assert log.count("flaky: connected to") == 2
