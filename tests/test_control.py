"""Operating a running line (issue 21): the control endpoint against a real `linegate run`
process, real sockets, a real subscriber and real ONNX bundles: thresholds, pause/resume with
the watchdog fed, replay, reject frames, hot swap under load (and refused bundles), SIGHUP
reload, CURVE on the control socket, the loopback rule, `linegate ctl`."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import free_tcp_endpoint, linegate_cmd, make_tiny_bundle
from control_helpers import make_offset_bundle, start_line, wait_until
from edge.auth import CurveClient, make_keypair
from edge.control_api import ControlClient, ControlError
from runtime_helpers import Collector, RunProcess, toml_text, write_config
from test_service import NotifyListener


def _stop(run: RunProcess, collector: Collector, timeout: float = 20) -> int:
    if run.proc.poll() is None:
        run.proc.send_signal(signal.SIGTERM)
    try:
        return run.wait(timeout)
    finally:
        collector.stop()


def _events(collector: Collector, what: str | None = None) -> list[dict]:
    return [m.header for m in collector.messages("event") if what is None or m.header["what"] == what]


def _by_seq(collector: Collector, topic: str = "decision") -> list[dict]:
    return sorted((m.header for m in collector.messages(topic)), key=lambda h: h["seq"])


def test_threshold_pause_resume_replay_and_reject_frames_end_to_end(tiny_bundle, tmp_path):
    notify = NotifyListener(tmp_path / "notify.sock")
    notify.start()
    sources = [{"uri": "synthetic:fps=40,size=64,seed=1", "id": "cam0", "roi": [8, 8, 40, 40]},
               {"uri": "synthetic:fps=40,size=64,seed=2", "id": "cam1"}]
    run, col, endpoint, _ = start_line(
        tmp_path, tiny_bundle, sources, topics=("decision", "event", "stats", "frame"),
        control={"replay_decisions": 40}, publisher={"frames": "reject"},
        extra={"service": {"frame_stall_s": 1.0}},
        env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
    client = ControlClient(endpoint)
    try:
        wait_until(lambda: len(col.decisions()) >= 20, 30, "first decisions")
        status = client.status()
        assert status["model_id"] == "tiny-test" and status["threshold"] == 0.5 and not status["paused"]
        assert set(status["cameras"]) == {"cam0", "cam1"} and status["settings_version"] == 0
        run_id = status["run_id"]
        assert all(d["run_id"] == run_id for d in col.decisions())

        # a line-wide threshold, then one camera's: in force from the next batch on
        after = client.threshold(0.0)  # every part is a reject now: reject frames flow
        assert after["thresholds"] == {"cam0": 0.0, "cam1": 0.0} and after["settings_version"] == 1
        after = client.threshold(2.0, camera="cam1")
        assert after["thresholds"] == {"cam0": 0.0, "cam1": 2.0}
        with pytest.raises(ControlError, match="no such camera"):
            client.threshold(0.3, camera="cam9")
        with pytest.raises(ControlError, match="give a number"):
            client.request("threshold", value="high")
        n = len(col.decisions())
        wait_until(lambda: len(col.decisions()) >= n + 30, 30, "decisions after the threshold change")
        for cam, final in (("cam0", 0.0), ("cam1", 2.0)):
            used = [d["threshold"] for d in _by_seq(col) if d["camera_id"] == cam]
            switches = [i for i in range(1, len(used)) if used[i] != used[i - 1]]
            assert used[0] == 0.5 and used[-1] == final and len(switches) <= 2  # 0.5 -> 0.0 (-> 2.0), never back
        for d in _by_seq(col):
            assert d["decision"] == ("reject" if d["score"] >= d["threshold"] else "accept")
        events = _events(col, "threshold")
        assert [(e["who"], e["before"], e["after"], e["camera_id"]) for e in events] == [
            ("local", 0.5, 0.0, None), ("local", 0.0, 2.0, "cam1")]
        assert [e["settings_version"] for e in events] == [1, 2] and all(e["run_id"] == run_id for e in events)

        # reject frames: the camera's whole frame (before the ROI), PNG, tied to its decision
        wait_until(lambda: len(col.messages("frame")) >= 3, 20, "reject frames")
        decisions = {d["seq"]: d for d in col.decisions()}
        for m in col.messages("frame")[:3]:
            decision = decisions[m.header["decision_seq"]]
            assert decision["decision"] == "reject" and decision["frame_id"] == m.header["frame_id"]
            assert decision["camera_id"] == m.header["camera_id"] and m.header["encoding"] == "png"
            image = cv2.imdecode(np.frombuffer(m.payload, np.uint8), cv2.IMREAD_UNCHANGED)
            assert image.shape == (64, 64, 3) and (m.header["width"], m.header["height"]) == (64, 64)

        # pause: frames read and counted, not judged; stats and STATUS say so; the watchdog is fed
        t_pause = time.time()
        paused = client.pause()
        t_paused, m_paused = time.time(), time.monotonic()
        assert paused["paused"] and paused["settings_version"] == 3
        time.sleep(2.5)
        during = client.status()
        assert during["paused"] and all(c["paused"] > 0 for c in during["cameras"].values())
        assert all(c["last_frame_age_s"] < 1.0 for c in during["cameras"].values())  # still reading
        t_resume, m_resume = time.time(), time.monotonic()
        assert not client.resume()["paused"]
        n = len(col.decisions())
        wait_until(lambda: len(col.decisions()) >= n + 20, 30, "decisions after resume")
        judged_while_paused = [d for d in col.decisions() if t_paused <= d["capture_ts"] <= t_resume]
        assert judged_while_paused == []
        assert any(d["capture_ts"] < t_pause for d in col.decisions())
        assert any(d["capture_ts"] > t_resume for d in col.decisions())
        stats = [m.header for m in col.messages("stats")]
        assert any(s["state"] == "paused" and s["paused"] for s in stats)
        # frame_stall_s = 1: without frames counted as progress the pings would stop after 1 s
        assert len(notify.times("WATCHDOG=1", since=m_paused + 1.2, until=m_resume)) >= 2
        assert any(m.startswith("STATUS=PAUSED") for _, m in notify.got)
        assert [(e["what"], e["before"], e["after"]) for e in _events(col)[-2:]] == [
            ("pause", False, True), ("resume", True, False)]

        # replay: the held decisions are the ones published; older ones are listed as missing
        newest = client.status()["seq"]["decision"]
        got = client.replay("decision", 0, newest, max=15)
        oldest = got["oldest_seq"]
        assert got["run_id"] == run_id and got["missing"] == [[0, oldest - 1]] and oldest > 0
        held, seq = [], oldest
        while seq <= newest:  # paging as a client does
            page = client.replay("decision", seq, newest, max=15)
            if page["missing"]:  # the line ran on (80 decisions/s over 40 held): evicted, and said so
                assert page["missing"] == [[seq, page["oldest_seq"] - 1]]
                held, seq = [], page["oldest_seq"]  # start over from what is held now
            held += page["messages"]
            assert page["messages"][0][0]["seq"] == seq
            seq = page["messages"][-1][0]["seq"] + 1
        first = held[0][0]["seq"]
        assert [h["seq"] for h, _ in held] == list(range(first, newest + 1))
        assert newest - oldest + 1 <= 40  # [control] replay_decisions
        assert [h for h, _ in held] == [decisions_now for decisions_now in _by_seq(col)[first:newest + 1]]
        frames = client.replay("frame", 0, max=2)["messages"]
        first = col.messages("frame")[0]
        assert frames[0][0] == first.header and frames[0][1] == first.payload
        events = client.replay("event", 0)["messages"]
        assert [h["what"] for h, _ in events] == ["start", "threshold", "threshold", "pause", "resume"]
        with pytest.raises(ControlError, match="replay topic"):
            client.replay("stats", 0)
        with pytest.raises(ControlError, match="unknown command"):
            client.request("reboot")
    finally:
        client.close()
        code = _stop(run, col)
        notify.stop()
    assert code == 0, run.log()
    log = run.log()
    assert "event threshold by local: 0.5 -> 0.0" in log and "event pause by local" in log


def _load_refused(client: ControlClient, bundle: Path, match: str) -> None:
    before = client.status()
    with pytest.raises(ControlError, match=match):
        client.load(bundle)
    after = client.status()
    assert after["model_id"] == before["model_id"] and after["settings_version"] == before["settings_version"]


def test_hot_swap_under_load_loses_no_frame_and_each_decision_names_its_model(tmp_path):
    a = make_tiny_bundle(tmp_path / "a", size=32)  # scores in [0, 1]
    b = make_offset_bundle(tmp_path / "b", size=48, offset=10.0, model_id="tiny-offset")  # scores >= 10
    bad_sum = make_tiny_bundle(tmp_path / "bad_sum")
    with open(bad_sum / "model.onnx", "ab") as fh:
        fh.write(b"\0")  # the file no longer matches its sha256
    not_onnx = make_tiny_bundle(tmp_path / "not_onnx")
    (not_onnx / "model.onnx").write_bytes(b"this is no ONNX graph" * 10)
    from edge.bundle import write_manifest
    write_manifest(not_onnx, json.loads((not_onnx / "manifest.json").read_text()))  # checksum of the junk
    count = 900
    sources = [{"uri": f"synthetic:count={count},fps=150,size=64,seed={i}", "id": f"cam{i}"} for i in range(2)]
    run, col, endpoint, _ = start_line(tmp_path, a, sources)
    client = ControlClient(endpoint)
    swaps = []
    try:
        wait_until(lambda: len(col.decisions()) >= 40, 30, "first decisions")
        for i, target in enumerate([b, a, b, a, b]):
            time.sleep(0.5)
            swaps.append(client.load(target)["model_id"])
            if i == 1:
                _load_refused(client, bad_sum, "sha256 does not match")
                _load_refused(client, not_onnx, "engine cannot load")
                _load_refused(client, tmp_path / "nowhere", "not a model bundle")
        assert run.wait(60) == 0, run.log()
        time.sleep(0.5)
    finally:
        client.close()
        code = _stop(run, col)
    assert code == 0
    assert swaps == ["tiny-offset", "tiny-test", "tiny-offset", "tiny-test", "tiny-offset"]
    decisions = _by_seq(col)
    assert [d["seq"] for d in decisions] == list(range(2 * count))  # contiguous: nothing lost
    for cam in ("cam0", "cam1"):  # every frame read got exactly one decision
        assert sorted(d["frame_id"] for d in decisions if d["camera_id"] == cam) == list(range(count))
    assert not [d for d in decisions if d["decision"] == "error"]  # frames queued across a swap re-preprocessed
    for d in decisions:  # the model id is the model that judged it (its scores say which)
        assert d["model_id"] == ("tiny-offset" if d["score"] >= 10 else "tiny-test"), d
        assert d["threshold"] == (10.5 if d["model_id"] == "tiny-offset" else 0.5)
    models = [d["model_id"] for d in decisions]
    assert sum(models[i] != models[i - 1] for i in range(1, len(models))) == 5  # each swap between batches
    loads = _events(col, "load")
    assert [e["after"]["model_id"] for e in loads] == swaps and all(e["who"] == "local" for e in loads)
    assert "refused" in run.log() and "keeps running" in run.log()


def test_sighup_reloads_live_settings_names_the_rest_and_refuses_a_broken_file(tiny_bundle, tmp_path):
    other = make_offset_bundle(tmp_path / "other", size=40, offset=5.0, model_id="tiny-five")
    sources = [{"uri": "synthetic:fps=60,size=64", "id": "cam0"}]
    run, col, endpoint, path = start_line(tmp_path, tiny_bundle, sources, topics=("decision", "event", "overlay"))
    text = path.read_text()
    client = ControlClient(endpoint)

    def reload(new_text: str, expect_event: bool) -> None:
        path.write_text(new_text)
        n = len(_events(col, "reload"))
        mark = len(run.log())
        run.proc.send_signal(signal.SIGHUP)
        if expect_event:
            wait_until(lambda: len(_events(col, "reload")) > n, 20, "the reload event")
        else:
            wait_until(lambda: "reload (sighup) refused" in run.log()[mark:], 20, "the refusal")
    try:
        wait_until(lambda: len(col.decisions()) >= 10, 30, "first decisions")
        # live: the threshold and batching; not live: the publisher's sndhwm (named in the log)
        changed = text.replace("max_batch = 4", "max_batch = 6").replace("[decision]", "")
        changed = changed.replace("[publisher]", "[decision]\nthreshold = 0.95\n[overlay]\naccepts_every = 1\n"
                                  "[publisher]\nsndhwm = 77")
        assert not [m for m in col.messages("overlay") if m.header["decision"] == "accept"]
        reload(changed, expect_event=True)
        event = _events(col, "reload")[-1]
        assert event["who"] == "sighup" and event["before"]["decision.threshold"] is None
        assert event["after"]["decision.threshold"] == 0.95 and event["after"]["batching.max_batch"] == 6
        assert "publisher.sndhwm" not in event["after"]
        assert "publisher.sndhwm changed in the file but cannot change while running" in run.log()
        n = len(col.decisions())
        wait_until(lambda: len(col.decisions()) >= n + 10, 20, "decisions after the reload")
        assert _by_seq(col)[-1]["threshold"] == 0.95
        assert [m for m in col.messages("overlay") if m.header["decision"] == "accept"]  # overlay policy, live
        status = client.status()
        version = status["settings_version"]
        assert status["threshold"] == 0.95

        # a file that no longer validates, or whose bundle does not load: nothing changes
        reload(changed.replace("max_batch = 6", "max_batch = 0"), expect_event=False)
        reload(changed + "[[[broken", expect_event=False)
        reload(changed.replace(str(tiny_bundle), str(tmp_path / "missing")), expect_event=False)
        assert "batching.max_batch" in run.log() and "not valid TOML" in run.log()
        status = client.status()
        assert status["settings_version"] == version and status["threshold"] == 0.95
        assert status["model_id"] == "tiny-test" and len(_events(col, "reload")) == 1

        # a new bundle path: a hot swap, its calibrated threshold unless the file sets one
        reload(changed.replace(str(tiny_bundle), str(other)).replace("threshold = 0.95", ""), expect_event=True)
        event = _events(col, "reload")[-1]
        assert event["before"]["model_id"] == "tiny-test" and event["after"]["model_id"] == "tiny-five"
        n = len(col.decisions())
        wait_until(lambda: len(col.decisions()) >= n + 10, 20, "decisions of the new bundle")
        last = _by_seq(col)[-1]
        assert last["model_id"] == "tiny-five" and last["threshold"] == 5.5 and last["score"] >= 5
    finally:
        client.close()
        code = _stop(run, col)
    assert code == 0, run.log()
    decisions = _by_seq(col)
    assert [d["seq"] for d in decisions] == list(range(len(decisions)))


def test_curve_operator_key_steers_watch_key_and_stranger_are_refused_and_logged(tiny_bundle, tmp_path):
    keys = tmp_path / "keys"
    for name in ("server", "watcher", "operator", "stranger"):
        make_keypair(keys, name)
    watchers, operators = tmp_path / "watchers", tmp_path / "operators"
    watchers.mkdir()
    operators.mkdir()
    for name in ("watcher", "operator"):
        (watchers / f"{name}.key").write_text((keys / f"{name}.key").read_text())
    (operators / "operator.key").write_text((keys / "operator.key").read_text())
    curve = {"secret_key": str(keys / "server.key_secret"), "allowed_keys": str(watchers)}
    watch_curve = CurveClient.load(keys / "server.key", keys / "watcher.key_secret")
    run, col, endpoint, _ = start_line(
        tmp_path, tiny_bundle, [{"uri": "synthetic:fps=30,size=64", "id": "cam0"}],
        topics=("decision", "event"), publisher={"curve": curve},
        control={"endpoint": "tcp://0.0.0.0:" + free_tcp_endpoint().rsplit(":", 1)[1],
                 "allowed_keys": str(operators)},
        collector_kwargs={"curve": watch_curve})
    endpoint = "tcp://127.0.0.1:" + endpoint.rsplit(":", 1)[1]
    operator = ControlClient(endpoint, keys / "server.key", keys / "operator.key_secret")
    try:
        wait_until(lambda: len(col.decisions()) >= 5, 30, "decisions for the watcher")
        assert operator.status()["model_id"] == "tiny-test"
        assert operator.threshold(0.3)["threshold"] == 0.3
        operator.pause(on_behalf_of="alice")
        operator.resume()
        for name in ("watcher", "stranger"):  # no reply: the handshake is refused
            with ControlClient(endpoint, keys / "server.key", keys / f"{name}.key_secret", timeout_s=2) as c:
                with pytest.raises(TimeoutError):
                    c.threshold(0.9)
        with ControlClient(endpoint, timeout_s=2) as plain, pytest.raises(TimeoutError):
            plain.pause()
        wait_until(lambda: len(_events(col)) >= 4, 10, "events")
        assert operator.status()["threshold"] == 0.3 and not operator.status()["paused"]
    finally:
        operator.close()
        code = _stop(run, col)
    assert code == 0, run.log()
    assert [(e["what"], e["who"]) for e in _events(col)] == [
        ("start", "local"), ("threshold", "operator"), ("pause", "operator (for alice)"), ("resume", "operator")]
    log = run.log()
    assert "control endpoint on tcp://0.0.0.0" in log and "CURVE: only the 1 operator key(s)" in log
    for name in ("watcher", "stranger"):
        public = (keys / f"{name}.key").read_text().split('public-key = "')[1].split('"')[0]
        assert log.count(f"refused a CURVE client with key {public}") == 1  # retries are counted, not logged
    assert "refused a connection whose CURVE handshake failed" in log  # the client without CURVE


def test_curve_reader_key_reads_but_may_not_steer_and_an_operator_still_does(tiny_bundle, tmp_path):
    keys = tmp_path / "keys"
    for name in ("server", "watcher", "operator", "recorder", "hmi", "stranger"):
        make_keypair(keys, name)
    folders = {"watchers": ["watcher"], "operators": ["operator", "hmi"], "readers": ["recorder", "hmi"]}
    for folder, names in folders.items():  # hmi is in both: an operator
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / f"{name}.key").write_text((keys / f"{name}.key").read_text())
    curve = {"secret_key": str(keys / "server.key_secret"), "allowed_keys": str(tmp_path / "watchers")}
    run, col, endpoint, _ = start_line(
        tmp_path, tiny_bundle, [{"uri": "synthetic:fps=30,size=64", "id": "cam0"}],
        topics=("decision", "event"), publisher={"curve": curve},
        control={"allowed_keys": str(tmp_path / "operators"), "reader_keys": str(tmp_path / "readers")},
        collector_kwargs={"curve": CurveClient.load(keys / "server.key", keys / "watcher.key_secret")})

    def client(name: str, **kw) -> ControlClient:
        return ControlClient(endpoint, keys / "server.key", keys / f"{name}.key_secret", **kw)

    reader, operator, hmi = client("recorder"), client("operator"), client("hmi")
    refusal = (r"refused: key 'recorder' may only read \(status, replay\); put its public key in \[control\] "
               r"allowed_keys to steer")
    try:
        wait_until(lambda: len(col.decisions()) >= 5, 30, "decisions for the watcher")
        before = reader.status()
        assert before["model_id"] == "tiny-test" and before["settings_version"] == 0
        assert [m[0]["seq"] for m in reader.replay("decision", 0, max=3)["messages"]] == [0, 1, 2]
        for cmd, ask in (("threshold", lambda: reader.threshold(0.9)),
                         ("pause", lambda: reader.pause(on_behalf_of="mallory")),
                         ("load", lambda: reader.load(tiny_bundle))):
            with pytest.raises(ControlError, match=f"^{cmd} {refusal}$"):
                ask()
        after = reader.status()
        assert (after["settings_version"], after["threshold"], after["paused"]) == (0, before["threshold"], False)
        assert operator.threshold(0.3)["settings_version"] == 1  # an operator still steers
        assert hmi.pause()["paused"] and not hmi.resume()["paused"]
        with client("stranger", timeout_s=2) as stranger, pytest.raises(TimeoutError):  # no handshake
            stranger.status()
        wait_until(lambda: len(_events(col)) >= 4, 10, "events")
    finally:
        for c in (reader, operator, hmi):
            c.close()
        code = _stop(run, col)
    assert code == 0, run.log()
    assert [(e["what"], e["who"]) for e in _events(col)] == [  # nothing from the reader
        ("start", "local"), ("threshold", "operator"), ("pause", "hmi"), ("resume", "hmi")]
    log = run.log()
    assert "CURVE: only the 2 operator key(s)" in log and f"1 reader key(s) in {tmp_path / 'readers'}" in log
    assert log.count(f"{tmp_path / 'operators' / 'hmi.key'} is in both lists") == 1
    refused = [line for line in log.splitlines() if "control: refused" in line and "from recorder" in line]
    assert [line.split("control: refused ")[1].split(" ")[0] for line in refused] == ["threshold", "pause", "load"]
    assert all(" WARNING " in line for line in refused) and "recorder (for mallory)" in refused[1]


def test_control_beyond_loopback_without_curve_is_refused_unless_allowed(tiny_bundle, tmp_path):
    port = free_tcp_endpoint().rsplit(":", 1)[1]
    config = {"engine": {"bundle": str(tiny_bundle)}, "control": {"endpoint": f"tcp://0.0.0.0:{port}"},
              "source": [{"uri": "synthetic:fps=20,size=64"}]}
    path = write_config(tmp_path / "remote.toml", config)
    out = subprocess.run(linegate_cmd("run", "--config", str(path)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "control.endpoint" in out.stderr and "allow_remote" in out.stderr and "CURVE" in out.stderr
    out = subprocess.run(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source", "synthetic:count=3",
                                      "--control", f"tcp://192.0.2.1:{port}"), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--control (control.endpoint)" in out.stderr
    config["control"]["allow_remote"] = True
    path.write_text(toml_text(config))
    run = RunProcess(path, tmp_path / "remote.log")
    try:
        wait_until(lambda: "control endpoint on" in run.log(), 30, "the control endpoint")
        assert "without CURVE: anyone who can reach it may steer the line" in run.log()
        with ControlClient(f"tcp://127.0.0.1:{port}") as client:
            assert client.status()["model_id"] == "tiny-test"
    finally:
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(20) == 0


def test_linegate_ctl_commands(tiny_bundle, tmp_path):
    run, col, endpoint, _ = start_line(tmp_path, tiny_bundle, [{"uri": "synthetic:fps=30,size=64", "id": "cam0"}])

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(linegate_cmd("ctl", endpoint, *args), capture_output=True, text=True, timeout=60)
    try:
        out = ctl("status")
        assert out.returncode == 0 and "running  model tiny-test  threshold 0.5" in out.stdout
        out = ctl("threshold", "0.25", "--camera", "cam0", "--json", "--for", "bob")
        assert out.returncode == 0 and json.loads(out.stdout)["thresholds"] == {"cam0": 0.25}
        assert ctl("pause").returncode == 0 and "PAUSED" in ctl("status").stdout
        assert ctl("resume").returncode == 0
        out = ctl("load", str(tmp_path / "nowhere"))
        assert out.returncode == 1 and "refused" in out.stderr and "not a model bundle" in out.stderr
        out = ctl("threshold", "--clear")
        assert out.returncode == 0 and "threshold 0.5" in out.stdout
    finally:
        _stop(run, col)
    assert ("threshold", "local (for bob)") in [(e["what"], e["who"]) for e in _events(col)]


def test_replay_buffer_keeps_the_last_decisions_and_frames_within_the_byte_budget():
    from edge.control import ReplayBuffer
    from edge.publisher import pack_header

    buffer = ReplayBuffer(decisions=5, frames_bytes=10_000)
    for seq in range(12):
        buffer.record("decision", seq, pack_header({"seq": seq}), None)
        buffer.record("frame", seq, pack_header({"seq": seq}), bytes(3000))  # about 3 fit
        buffer.record("stats", seq, pack_header({"seq": seq}), None)  # never held
    got = buffer.replay("decision", 0)
    assert [h["seq"] for h, _ in got["messages"]] == [7, 8, 9, 10, 11]
    assert got["missing"] == [[0, 6]] and (got["oldest_seq"], got["newest_seq"]) == (7, 11)
    assert buffer.replay("decision", 8, 9)["missing"] == [] and len(buffer.replay("decision", 8, 9)["messages"]) == 2
    assert buffer.replay("decision", 3, 5) == {"messages": [], "missing": [[3, 5]], "oldest_seq": 7, "newest_seq": 11}
    assert buffer.replay("decision", 20)["messages"] == [] and buffer.replay("decision", 20)["missing"] == []
    frames = buffer.replay("frame", 0)
    assert [h["seq"] for h, _ in frames["messages"]] == [9, 10, 11] and frames["missing"] == [[0, 8]]
    assert all(p == bytes(3000) for _, p in frames["messages"])
    assert len(buffer.replay("frame", 0, max_bytes=5000)["messages"]) == 2  # a reply's payloads are bounded too
    page = buffer.replay("decision", 0, None, 2)
    assert [h["seq"] for h, _ in page["messages"]] == [7, 8]  # `max` bounds a reply; the client pages on
    nothing = ReplayBuffer(decisions=0)
    nothing.record("decision", 0, pack_header({"seq": 0}), None)
    assert nothing.replay("decision", 0)["missing"] == [[0, 0]]


class _ClosableEngine:
    """The real ONNX Runtime engine plus the close() a TensorRT engine has (its GPU memory is
    freed only then; no GPU here): records whether close came while a call was running and
    refuses calls after it, as a closed TensorRT engine would fail them."""

    def __init__(self, engine) -> None:
        self.engine, self.closed, self.in_call, self.closed_mid_call, self.calls_after_close = engine, False, False, False, 0

    def infer(self, batch):
        if self.closed:
            self.calls_after_close += 1
            raise RuntimeError("engine closed")
        self.in_call = True
        try:
            time.sleep(0.002)  # widen the window a close could hit
            return self.engine.infer(batch)
        finally:
            self.in_call = False

    def close(self) -> None:
        self.closed_mid_call |= self.in_call
        self.closed = True


def test_a_swapped_out_engine_is_closed_after_its_last_call(tmp_path):
    from edge.bundle import load_bundle
    from edge.control import Controller
    from edge.decision import DecisionRule
    from edge.engine import open_engine
    from edge.pipeline import Pipeline, RunOptions
    from edge.publisher import Publisher
    from edge.sources import parse_source

    a = load_bundle(make_tiny_bundle(tmp_path / "a"))
    b = make_offset_bundle(tmp_path / "b")
    engine = _ClosableEngine(open_engine(a))
    sources = [parse_source(f"synthetic:count=400,fps=200,size=64,seed={i}", f"cam{i}") for i in range(2)]
    publisher = Publisher(free_tcp_endpoint())
    pipeline = Pipeline(a, engine, DecisionRule.from_bundle(a), sources, publisher, RunOptions(max_batch=4))
    controller = Controller(pipeline)
    pipeline.monitor = controller

    def swap_soon() -> None:
        while sum(pipeline.decisions_by_result.values()) < 100:
            time.sleep(0.01)
        controller.load(str(b), "test")

    import threading
    threading.Thread(target=swap_soon, daemon=True).start()
    summary = pipeline.run()
    wait_until(lambda: engine.closed, 10, "the old engine closed")
    assert summary.frames == 800 and summary.errors == 0
    assert not engine.closed_mid_call and engine.calls_after_close == 0
    assert pipeline.model.model_id == "tiny-offset"


@pytest.mark.parametrize("raw, key, says", [
    ({"control": {"endpoint": "tcp://0.0.0.0:5557"}}, "control.endpoint", "allow_remote = true"),
    ({"control": {"endpoint": "tcp://127.0.0.1:5556"}}, "control.endpoint", "the publisher's endpoint"),
    ({"control": {"endpoint": "localhost:5557"}}, "control.endpoint", "not a ZeroMQ endpoint"),
    ({"control": {"endpoint": "tcp://127.0.0.1:5557"},
      "publisher": {"curve": {"secret_key": "s", "allowed_keys": "d"}}}, "control.allowed_keys", "its own allow-list"),
    ({"control": {"endpoint": "tcp://127.0.0.1:5557", "reader_keys": "d"}}, "control.reader_keys",
     "reader keys need [publisher.curve]"),
    ({"control": {"endpoint": "tcp://127.0.0.1:5557", "allowed_keys": "d"}}, "control.allowed_keys",
     "operator keys need [publisher.curve]"),
    ({"metrics": {"listen": "9108"}}, "metrics.listen", "HOST:PORT"),
    ({"publisher": {"frames": "all"}}, "publisher.frames", "none, reject"),
    ({"control": {"replay_decisions": -1}}, "control.replay_decisions", ">= 0"),
])
def test_control_and_metrics_config_errors_name_the_key(raw, key, says):
    from edge.config import ConfigError, validate

    with pytest.raises(ConfigError) as info:
        validate({"engine": {"bundle": "b"}, "source": [{"uri": "synthetic"}], **raw}, "line.toml")
    assert f"key '{key}'" in str(info.value) and says in str(info.value)


def test_local_endpoints():
    from edge.config import is_local_endpoint

    assert all(is_local_endpoint(e) for e in ("tcp://127.0.0.1:5557", "tcp://localhost:1", "tcp://[::1]:1",
                                              "ipc:///run/linegate/control.sock", "inproc://x"))
    assert not any(is_local_endpoint(e) for e in ("tcp://*:5557", "tcp://0.0.0.0:5557", "tcp://10.0.0.5:5557",
                                                  "tcp://eth0:5557"))


def test_hot_swap_between_detectors(small_runs, tmp_path):
    """PaDiM -> FCDD -> PatchCore -> PaDiM, each trained on pillQC images, while a line runs:
    each decision carries the model, threshold and aggregate of the bundle that judged it."""
    from edge.bundle import load_bundle
    from edge.control import Controller
    from edge.decision import DecisionRule
    from edge.engine import open_engine
    from edge.pipeline import Pipeline, RunOptions
    from edge.publisher import Publisher
    from edge.sources import parse_source

    bundles = {d: load_bundle(small_runs(d) / "bundle") for d in ("padim", "fcdd", "patchcore")}
    assert len({b.model_id for b in bundles.values()}) == 3
    first = bundles["padim"]
    sources = [parse_source(f"synthetic:count=160,fps=40,size=96,seed={i}", f"cam{i}") for i in range(2)]
    publisher = Publisher(free_tcp_endpoint())
    pipeline = Pipeline(first, open_engine(first), DecisionRule.from_bundle(first), sources, publisher,
                        RunOptions(max_batch=4, wait_subscribers=2, wait_timeout_s=20))
    controller = Controller(pipeline)
    pipeline.monitor = controller
    collector = Collector(publisher.endpoint, ("decision", "event"))
    collector.start()
    order = ["fcdd", "patchcore", "padim"]

    def swaps() -> None:
        for i, detector in enumerate(order):
            while sum(pipeline.decisions_by_result.values()) < 60 * (i + 1):
                time.sleep(0.01)
            controller.load(str(bundles[detector].path), "test")

    import threading
    threading.Thread(target=swaps, daemon=True).start()
    summary = pipeline.run()
    try:
        collector.wait_for(lambda: len(collector.decisions()) == summary.frames, 10, "every decision")
    finally:
        collector.stop()
    decisions = sorted(collector.decisions(), key=lambda d: d["seq"])
    assert summary.frames == 320 and [d["seq"] for d in decisions] == list(range(320))
    assert not [d for d in decisions if d["decision"] == "error"]
    by_id = {b.model_id: b for b in bundles.values()}
    for d in decisions:
        bundle = by_id[d["model_id"]]
        assert d["threshold"] == bundle.decision["threshold"] and d["aggregate"] == bundle.decision["aggregate"]
    runs = [d["model_id"] for i, d in enumerate(decisions) if i == 0 or d["model_id"] != decisions[i - 1]["model_id"]]
    assert runs == [bundles[d].model_id for d in ["padim", *order]]
