"""The record store (lineside/store.py) on SQLite and on a real PostgreSQL server: schema made
and migrated, dedupe by (run_id, seq), the read API the view uses, refusals that say what to do."""
from __future__ import annotations

import math
import sqlite3
import time

import pytest

from lineside.store import SCHEMA_VERSION, StoreError, open_store
from record_helpers import db_target  # noqa: F401 - the fixture

T0 = 1_796_000_000.0


def decision(seq: int, run: str = "run-a", camera: str = "cam0", decision: str = "accept",
             score: float = 0.2, ts: float | None = None, **extra) -> dict:
    return {"v": 1, "topic": "decision", "seq": seq, "run_id": run, "camera_id": camera, "frame_id": seq,
            "capture_ts": T0 + seq if ts is None else ts, "publish_ts": T0 + seq + 0.01, "score": score,
            "score_norm": score, "threshold": 0.5, "decision": decision, "aggregate": "mean", "model_id": "m1",
            "source": f"part{seq}.png", "label": None, "batch": seq // 4, **extra}


def test_schema_is_made_once_and_versioned(db_target):
    with open_store(db_target, create=True) as store:
        assert store.migrate() == SCHEMA_VERSION  # already there: nothing to apply
    with open_store(db_target) as store:  # a reader: no create
        assert store.count("decisions") == 0


def test_every_header_field_is_kept_and_duplicates_are_not(db_target):
    with open_store(db_target, create=True) as store:
        rows = [decision(0), decision(1, decision="reject", score=0.9, future_key={"a": [1, 2]}),
                decision(2, decision="error", score=float("nan"), error="engine failed: boom")]
        store.write([(h, False) for h in rows], runs=[("run-a", "L1")], line="L1")
        # The same seqs again (a replay overlapping what came live), and seq 1 of another run.
        store.write([(h, True) for h in rows] + [(decision(1, run="run-b"), False)], line="L1")
        assert store.count("decisions") == 4
        assert store.seqs("run-a") == [0, 1, 2]
        newest = store.decisions(limit=10)
        assert [(d["run_id"], d["seq"]) for d in newest] == [("run-a", 2), ("run-b", 1), ("run-a", 1), ("run-a", 0)]
        reject = store.decision_by_id(newest[2]["id"])
        for key, value in rows[1].items():
            assert reject[key] == value, key
        assert reject["replayed"] is False and reject["frame_path"] is None and reject["line"] == "L1"
        error = newest[0]
        assert math.isnan(error["score"]) and error["error"] == "engine failed: boom"
        scores = store.scores(3)
        assert math.isnan(scores[0][0]) and scores[0][2] == "error" and scores[2] == (0.9, 0.5, "reject")
        assert store.decision_by_id(10_000) is None


def test_filters_images_events_and_gaps(db_target):
    with open_store(db_target, create=True) as store:
        store.write([(decision(i, camera=f"cam{i % 2}", decision="reject" if i % 3 == 0 else "accept"), False)
                     for i in range(12)], line="L1")
        store.write(images=[{"run_id": "run-a", "topic": "overlay", "seq": 0, "decision_seq": 3, "camera_id": "cam1",
                             "capture_ts": T0 + 3, "path": "d/cam1/3_overlay.jpg", "bytes": 100},
                            {"run_id": "run-a", "topic": "frame", "seq": 0, "decision_seq": 3, "camera_id": "cam1",
                             "capture_ts": T0 + 3, "path": "d/cam1/3_frame.png", "bytes": 900}],
                    events=[{"v": 1, "topic": "event", "seq": 0, "run_id": "run-a", "publish_ts": T0, "who": "op",
                             "what": "threshold", "before": 0.5, "after": 0.6, "settings_version": 2,
                             "camera_id": None}],
                    gaps=[{"run_id": "run-a", "topic": "decision", "first_seq": 12, "last_seq": 15,
                           "noticed_ts": time.time(), "reason": "no longer held"}], line="L1")
        store.set_line("L1", "/srv/images", "tcp://edge:5556")
        rejects = store.decisions(decision="reject", camera="cam1")
        assert [d["seq"] for d in rejects] == [9, 3]
        assert rejects[1]["frame_path"] == "d/cam1/3_frame.png" and rejects[1]["overlay_path"] == "d/cam1/3_overlay.jpg"
        assert [d["seq"] for d in store.decisions(since=T0 + 4, until=T0 + 7)] == [6, 5, 4]
        assert [d["seq"] for d in store.decisions(limit=2, oldest_first=True)] == [0, 1]
        assert str(store.image_root) == "/srv/images"
        store.set_line("L2", "/srv/line2", "tcp://edge2:5556")
        assert {k: str(v) for k, v in store.image_roots().items()} == {"L1": "/srv/images", "L2": "/srv/line2"}
        assert store.image_bytes("L1") == 1000
        assert store.max_seq("run-a", "decision") == 15  # the gap row is on record as a known loss
        assert store.max_seq("run-a", "frame") == 0 and store.max_seq("run-b", "decision") is None
        (event,) = store.events()
        assert event["who"] == "op" and event["after"] == 0.6
        assert store.gaps()[0]["first_seq"] == 12
        oldest = store.oldest_images("L1", 10)
        store.mark_deleted([oldest[0][0]])
        assert store.image_bytes("L1") == 1000 - oldest[0][2]


def test_a_file_that_is_not_a_record_and_a_newer_schema_are_refused(tmp_path):
    with pytest.raises(StoreError, match="no such record"):
        open_store(str(tmp_path / "missing.db"))
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StoreError, match="not a linegate record"):
        open_store(str(other))
    newer = tmp_path / "newer.db"
    open_store(str(newer), create=True).close()
    conn = sqlite3.connect(newer)
    conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    for create in (False, True):
        with pytest.raises(StoreError, match="upgrade linegate"):
            open_store(str(newer), create=create)


def test_an_unreachable_postgresql_server_is_named():
    pytest.importorskip("psycopg", reason="psycopg not installed")
    with pytest.raises(StoreError, match="cannot connect to postgresql://postgres@127.0.0.1:9/x"):
        open_store("postgresql://postgres@127.0.0.1:9/x")
