"""No silent hole: a recorder killed (-9) or stalled (SIGSTOP) for seconds during a steady run
leaves a record that holds every decision of the run, checked against a second subscriber and
the runtime's own count, or the missing seqs as gap rows; with the runtime's control endpoint
it asks for a replay and gets them back."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import free_tcp_endpoint, linegate_cmd
from lineside.store import open_store
from record_helpers import Collector, no_leftover_processes, runtime_count, start_recorder, wait_for  # noqa: F401
from test_record_run import RECORDER_SUBSCRIPTIONS, run_runtime

FRAMES, FPS, DOWN_S = 800, 100, 2.5  # 8 s of run: the recorder is back well before its end


def gap_seqs(store, run_id: str, topic: str = "decision") -> set[int]:
    return {s for g in store.gaps(run_id=run_id) if g["topic"] == topic
            for s in range(g["first_seq"], g["last_seq"] + 1)}


def interrupt(how: str, recorder, endpoint: str, db: str, log, *extra: str):
    """Kill -9 the recorder and start it again after DOWN_S, or stop and continue it."""
    if how == "kill":
        recorder.kill()
        time.sleep(DOWN_S)
        return start_recorder(endpoint, db, log, *extra)
    recorder.signal(signal.SIGSTOP)
    time.sleep(DOWN_S)
    recorder.signal(signal.SIGCONT)
    return recorder


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_without_replay_every_decision_is_on_record_or_in_a_gap_row(tmp_path, how):
    endpoint, db = free_tcp_endpoint(), str(tmp_path / "record.db")
    log = tmp_path / "record.log"
    recorder = start_recorder(endpoint, db, log, "--images", str(tmp_path / "images"))
    collector = Collector(endpoint, ("decision", "overlay", "frame"))
    collector.start()
    # Every part a reject with an overlay and its full-resolution frame, a small send queue: a
    # stalled recorder overflows it and loses messages (TCP buffers alone hold mere decisions).
    runtime = run_runtime(tmp_path, endpoint, [f"synthetic:count={FRAMES},fps={FPS},size=224"],
                          RECORDER_SUBSCRIPTIONS + 3, "--threshold", "0.0", "--sndhwm", "20",
                          "--publish-frames", "reject")
    with open_store(db) as store:
        wait_for(lambda: store.count("decisions") >= 60, 30, "a steady run on record")
        recorder = interrupt(how, recorder, endpoint, db, log)
        assert runtime.wait(60) == 0
        frames, _ = runtime_count(runtime.log())
        seen = collector.finish()
        by_topic = {t: [h for h in seen if h["_topic"] == t] for t in ("decision", "overlay", "frame")}
        assert frames == FRAMES and [h["seq"] for h in by_topic["decision"]] == list(range(frames))
        run_id = seen[0]["run_id"]
        overlays, reject_frames = ({h["seq"] for h in by_topic[t]} for t in ("overlay", "frame"))
        wait_for(lambda: len(set(store.seqs(run_id)) | gap_seqs(store, run_id)) >= frames
                 and images_complete(store, run_id, overlays, reject_frames), 30,
                 "every decision and image on record or in a gap row")
        assert recorder.stop() == 0
        stored, lost = set(store.seqs(run_id)), gap_seqs(store, run_id)
        assert stored | lost == set(range(frames)) and not stored & lost
        if how == "kill":  # down for 2.5 s at 100 frames/s: a gap, written down as such
            assert len(lost) >= 100
        else:  # stalled: the images (megabytes a second) overflowed the queues, and that is on record
            assert gap_seqs(store, run_id, "frame")
        assert all(g["reason"] == "no --control endpoint to ask for a replay" for g in store.gaps(run_id=run_id))
        # What is stored is what the second subscriber saw, field for field.
        by_seq = {h["seq"]: h for h in by_topic["decision"]}
        for row in store.decisions(limit=frames, run_id=run_id):
            assert row["capture_ts"] == by_seq[row["seq"]]["capture_ts"]
            assert row["score"] == by_seq[row["seq"]]["score"]


def control_endpoint() -> str:
    pytest.importorskip("edge.control_api", reason="the runtime's control endpoint (edge/control_api.py, "
                                                   "ops' side of issue 22) is not in this tree")
    return free_tcp_endpoint()


def runtime_with_control(tmp_path, endpoint: str, control: str, subscribers: int, *extra: str):
    return run_runtime(tmp_path, endpoint, [f"synthetic:count={FRAMES},fps={FPS},size=224"], subscribers,
                       "--threshold", "0.0", "--sndhwm", "20", "--control", control,
                       "--publish-frames", "reject", *extra)


def images_complete(store, run_id: str, seen_overlays: set[int], seen_frames: set[int]) -> bool:
    """Every overlay and reject frame published is in the image store or in a gap row."""
    for topic, seen in (("overlay", seen_overlays), ("frame", seen_frames)):
        stored = {r[0] for r in store._query("SELECT seq FROM images WHERE run_id = ? AND topic = ?", (run_id, topic))}
        if not stored | gap_seqs(store, run_id, topic) >= seen:
            return False
    return True


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_with_replay_a_recorder_down_for_seconds_misses_nothing(tmp_path, how):
    control = control_endpoint()
    endpoint, db = free_tcp_endpoint(), str(tmp_path / "record.db")
    log = tmp_path / "record.log"
    extra = ("--images", str(tmp_path / "images"), "--control", control)
    recorder = start_recorder(endpoint, db, log, *extra)
    collector = Collector(endpoint, ("decision", "overlay", "frame"))
    collector.start()
    runtime = runtime_with_control(tmp_path, endpoint, control, RECORDER_SUBSCRIPTIONS + 3)
    with open_store(db) as store:
        wait_for(lambda: store.count("decisions") >= 60, 30, "a steady run on record")
        recorder = interrupt(how, recorder, endpoint, db, log, *extra)
        assert runtime.wait(60) == 0
        frames, rejects = runtime_count(runtime.log())
        seen = collector.finish()
        decisions = [h for h in seen if h["_topic"] == "decision"]
        assert frames == rejects == FRAMES and [h["seq"] for h in decisions] == list(range(frames))
        run_id = decisions[0]["run_id"]
        overlays = {h["seq"] for h in seen if h["_topic"] == "overlay"}
        reject_frames = {h["seq"] for h in seen if h["_topic"] == "frame"}
        assert len(overlays) == len(reject_frames) == frames
        wait_for(lambda: store.count("decisions") >= frames and images_complete(store, run_id, overlays, reject_frames),
                 30, "every decision, overlay and reject frame on record")
        assert recorder.stop() == 0
        assert store.seqs(run_id) == list(range(frames))  # every one, once
        assert not gap_seqs(store, run_id)  # the runtime held all that was missed
        if how == "kill":
            replayed = [d for d in store.decisions(limit=frames, run_id=run_id) if d["replayed"]]
            assert len(replayed) >= 100  # 2.5 s at 100 frames/s came back by replay
        assert not gap_seqs(store, run_id, "overlay") and not gap_seqs(store, run_id, "frame")
        # A reject's record points at its full-resolution frame and its overlay.
        last = store.decisions(limit=1, run_id=run_id)[0]
        assert last["frame_path"].endswith("_frame.png") and last["overlay_path"].endswith("_overlay.jpg")
    if how == "kill":
        assert "asking for a replay" in (tmp_path / "record.log").read_text()


def test_what_the_runtime_no_longer_holds_becomes_a_gap_row(tmp_path):
    control = control_endpoint()
    from runtime_helpers import write_config

    endpoint, db = free_tcp_endpoint(), str(tmp_path / "record.db")
    log = tmp_path / "record.log"
    extra = ("--images", str(tmp_path / "images"), "--control", control)
    recorder = start_recorder(endpoint, db, log, *extra)
    collector = Collector(endpoint)
    collector.start()
    config = write_config(tmp_path / "small-ring.toml", {"control": {"replay_decisions": 40, "replay_frames_mb": 0.2}})
    runtime = runtime_with_control(tmp_path, endpoint, control, RECORDER_SUBSCRIPTIONS + 1, "--config", str(config))
    with open_store(db) as store:
        wait_for(lambda: store.count("decisions") >= 60, 30, "a steady run on record")
        recorder = interrupt("kill", recorder, endpoint, db, log, *extra)
        assert runtime.wait(60) == 0
        frames, _ = runtime_count(runtime.log())
        seen = collector.finish()
        run_id = seen[0]["run_id"]
        wait_for(lambda: len(set(store.seqs(run_id)) | gap_seqs(store, run_id)) >= frames, 30,
                 "every seq on record or in a gap row")
        assert recorder.stop() == 0
        stored, lost = set(store.seqs(run_id)), gap_seqs(store, run_id)
        assert stored | lost == {h["seq"] for h in seen} == set(range(frames)) and not stored & lost
        gaps = [g for g in store.gaps(run_id=run_id) if g["topic"] == "decision"]
        assert gaps and all(g["reason"].startswith("no longer held by the runtime") for g in gaps)
        assert len(lost) >= 60  # 2.5 s at 100 frames/s, less the 40 the runtime still held
        assert any(d["replayed"] for d in store.decisions(limit=frames, run_id=run_id))  # those 40 came back


def test_a_recorder_started_late_gets_the_run_from_its_first_decision(tmp_path):
    control = control_endpoint()
    endpoint, db = free_tcp_endpoint(), str(tmp_path / "record.db")
    collector = Collector(endpoint)
    collector.start()
    runtime = runtime_with_control(tmp_path, endpoint, control, 1)
    wait_for(lambda: len(collector.headers) >= 150, 30, "the run under way")
    recorder = start_recorder(endpoint, db, tmp_path / "record.log", "--images", str(tmp_path / "images"),
                              "--control", control)
    assert runtime.wait(60) == 0
    frames, _ = runtime_count(runtime.log())
    seen = collector.finish()
    with open_store(db) as store:
        wait_for(lambda: store.count("decisions") >= frames, 30, "every decision on record")
        assert recorder.stop() == 0
        assert store.seqs(seen[0]["run_id"]) == list(range(frames)) and store.count("gaps") == 0


def test_a_runtime_restarted_while_the_recorder_was_away_leaves_an_open_gap_row(tmp_path):
    control = control_endpoint()
    endpoint, db = free_tcp_endpoint(), str(tmp_path / "record.db")
    log = tmp_path / "record.log"
    extra = ("--control", control, "--images", str(tmp_path / "images"))
    recorder = start_recorder(endpoint, db, log, *extra)
    first = run_runtime(tmp_path, endpoint, ["synthetic:count=300,fps=100,size=64"], RECORDER_SUBSCRIPTIONS,
                        "--control", control)
    with open_store(db) as store:
        wait_for(lambda: store.count("decisions") >= 50, 30, "the first run on record")
        recorder.kill()  # away: the first run ends and a second one starts without it
        assert first.wait(60) == 0
        old_run = store.decisions(limit=1)[0]["run_id"]
        recorded_old = store.seqs(old_run)
        collector = Collector(endpoint)
        collector.start()
        second = run_runtime(tmp_path, endpoint, ["synthetic:count=300,fps=100,size=64"], 1, "--control", control)
        wait_for(lambda: len(collector.headers) >= 50, 30, "the second run under way")
        recorder = start_recorder(endpoint, db, log, *extra)
        assert second.wait(60) == 0
        seen = collector.finish()
        new_run = seen[0]["run_id"]
        assert new_run != old_run
        wait_for(lambda: store.count("decisions", run_id=new_run) >= 300, 30, "the second run on record")
        assert recorder.stop() == 0
        assert store.seqs(new_run) == list(range(300))  # from its first decision, by replay
        (open_gap,) = [g for g in store.gaps(run_id=old_run) if g["topic"] == "decision"]
        assert open_gap["first_seq"] == recorded_old[-1] + 1 and open_gap["last_seq"] is None
        assert open_gap["reason"].startswith("unknown: the runtime restarted")
    out = subprocess.run(linegate_cmd("history", db, "--gaps"), capture_output=True, text=True, timeout=60)
    assert f"decision seqs {recorded_old[-1] + 1}..?" in out.stdout


def test_under_curve_a_recorder_with_a_reader_key_replays_and_one_off_it_writes_gap_rows(tmp_path):
    control = control_endpoint()
    from edge.auth import make_keypair
    from runtime_helpers import write_config

    keys = tmp_path / "keys"
    for name in ("server", "operator", "recorder", "stranger"):
        make_keypair(keys, name)
    bus, operators, readers = tmp_path / "bus-keys", tmp_path / "control-keys", tmp_path / "reader-keys"
    for folder in (bus, operators, readers):
        folder.mkdir()
    for name in ("recorder", "stranger"):  # both may watch; only the recorder may use the control endpoint
        (bus / f"{name}.key").write_text((keys / f"{name}.key").read_text())
    (operators / "operator.key").write_text((keys / "operator.key").read_text())
    (readers / "recorder.key").write_text((keys / "recorder.key").read_text())  # status and replay only
    config = write_config(tmp_path / "curve.toml", {
        "publisher": {"curve": {"secret_key": str(keys / "server.key_secret"), "allowed_keys": str(bus)}},
        "control": {"endpoint": control, "allowed_keys": str(operators), "reader_keys": str(readers)}})
    endpoint = free_tcp_endpoint()
    collector = Collector(endpoint)  # without a key: it must get nothing
    collector.start()
    runtime = run_runtime(tmp_path, endpoint, ["synthetic:count=1000,fps=100,size=64"], 0, "--config", str(config))
    time.sleep(1.0)  # the run under way before either recorder starts
    records = {}
    for name in ("recorder", "stranger"):
        db = str(tmp_path / f"{name}.db")
        records[name] = (db, start_recorder(endpoint, db, tmp_path / f"{name}.log", "--control", control,
                                            "--server-key", str(keys / "server.key"),
                                            "--client-key", str(keys / f"{name}.key_secret")))
    assert runtime.wait(60) == 0
    frames, _ = runtime_count(runtime.log())
    assert collector.finish() == []
    db, recorder = records["recorder"]
    with open_store(db) as store:
        wait_for(lambda: store.count("decisions") >= frames, 30, "the whole run, by replay under CURVE")
        assert recorder.stop() == 0
        run_id = store.decisions(limit=1)[0]["run_id"]
        assert store.seqs(run_id) == list(range(frames)) and store.count("gaps") == 0
    db, stranger = records["stranger"]
    with open_store(db) as store:
        wait_for(lambda: len(set(store.seqs(run_id)) | gap_seqs(store, run_id)) >= frames, 30,
                 "the stranger's record: every seq stored or a gap row")
        assert stranger.stop() == 0
        gaps = [g for g in store.gaps(run_id=run_id) if g["topic"] == "decision"]
        assert gaps and gaps[-1]["first_seq"] == 0 and all(g["reason"].startswith("replay failed: TimeoutError")
                                                           for g in gaps)
    assert "cannot ask" in (tmp_path / "stranger.log").read_text()


def test_a_postgresql_server_that_drops_the_recorder_costs_a_restart_not_a_row(tmp_path):
    control = control_endpoint()
    from record_helpers import PG_ADMIN, pg_database

    url, drop = pg_database()
    try:
        endpoint = free_tcp_endpoint()
        log = tmp_path / "record.log"
        extra = ("--control", control, "--images", str(tmp_path / "images"))
        recorder = start_recorder(endpoint, url, log, *extra)
        collector = Collector(endpoint)
        collector.start()
        runtime = runtime_with_control(tmp_path, endpoint, control, RECORDER_SUBSCRIPTIONS + 1)
        import psycopg

        with open_store(url) as store, psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            wait_for(lambda: store.count("decisions") >= 60, 30, "a steady run on record")
            # The database server ends the recorder's session (a failover, an admin, a restart).
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (url.rsplit("/", 1)[1],))
        assert recorder.proc.wait(30) == 1  # exit 1: systemd restarts it (2 would stop it)
        assert "cannot be written" in log.read_text() and "exiting for a restart" in log.read_text()
        recorder = start_recorder(endpoint, url, log, *extra)  # what systemd does after RestartSec
        assert runtime.wait(60) == 0
        frames, _ = runtime_count(runtime.log())
        seen = collector.finish()
        with open_store(url) as store:
            run_id = seen[0]["run_id"]
            wait_for(lambda: store.count("decisions") >= frames, 30, "every decision on record")
            assert recorder.stop() == 0
            assert store.seqs(run_id) == list(range(frames)) and store.count("gaps") == 0
    finally:
        drop()
