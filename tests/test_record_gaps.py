"""No silent hole: a recorder killed (-9) or stalled (SIGSTOP) for seconds during a steady run
leaves a record that holds every decision of the run, checked against a second subscriber and
the runtime's own count, or the missing seqs as gap rows; with the runtime's control endpoint
it asks for a replay and gets them back."""
from __future__ import annotations

import signal
import time

import pytest

from conftest import free_tcp_endpoint
from lineside.store import open_store
from record_helpers import Collector, runtime_count, start_recorder, wait_for
from test_record_run import RECORDER_SUBSCRIPTIONS, run_runtime

FRAMES, FPS, DOWN_S = 500, 100, 2.5


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
    collector = Collector(endpoint)
    collector.start()
    # Every part a reject with a 224x224 overlay, a small send queue: a stalled recorder
    # overflows it and loses messages (the TCP buffers alone would hold mere decisions).
    runtime = run_runtime(tmp_path, endpoint, [f"synthetic:count={FRAMES},fps={FPS},size=224"],
                          RECORDER_SUBSCRIPTIONS + 1, "--threshold", "0.0", "--sndhwm", "20")
    with open_store(db) as store:
        wait_for(lambda: store.count("decisions") >= 60, 30, "a steady run on record")
        recorder = interrupt(how, recorder, endpoint, db, log)
        assert runtime.wait(60) == 0
        frames, _ = runtime_count(runtime.log())
        seen = collector.finish()
        assert frames == FRAMES and [h["seq"] for h in seen] == list(range(frames))
        run_id = seen[0]["run_id"]
        wait_for(lambda: len(set(store.seqs(run_id)) | gap_seqs(store, run_id)) >= frames, 30,
                 "every seq on record or in a gap row")
        assert recorder.stop() == 0
        stored, lost = set(store.seqs(run_id)), gap_seqs(store, run_id)
        assert stored | lost == set(range(frames)) and not stored & lost
        if how == "kill":  # down for 2.5 s at 100 frames/s: a gap, written down as such
            assert len(lost) >= 100
            assert all(g["reason"] == "no --control endpoint to ask for a replay" for g in store.gaps(run_id=run_id)
                       if g["topic"] == "decision")
        # What is stored is what the second subscriber saw, field for field.
        by_seq = {h["seq"]: h for h in seen}
        for row in store.decisions(limit=frames, run_id=run_id):
            assert row["capture_ts"] == by_seq[row["seq"]]["capture_ts"]
            assert row["score"] == by_seq[row["seq"]]["score"]
