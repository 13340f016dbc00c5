"""The recorder's bookkeeping, driven message by message (Recorder.on_message, as the bus loop
does): seq gaps per topic and run, dedupe, images linked to decisions, --keep-days, history's
time parsing and listings."""
from __future__ import annotations

import subprocess
import time

import pytest

from conftest import linegate_cmd
from lineside.history import parse_when
from lineside.imagestore import ImageStore
from lineside.record import Recorder
from lineside.store import open_store


def header(topic: str, seq: int, run: str | None = "r1", ts: float | None = None, **extra) -> dict:
    h = {"v": 1, "topic": topic, "seq": seq, "camera_id": "cam0", "frame_id": extra.pop("frame_id", seq),
         "capture_ts": time.time() if ts is None else ts, "publish_ts": time.time(), "score": 0.9, "threshold": 0.5,
         "decision": "reject", "model_id": "m", **extra}
    if run is not None:
        h["run_id"] = run
    return h


@pytest.fixture()
def recorder(tmp_path):
    store = open_store(str(tmp_path / "r.db"), create=True)
    images = ImageStore(tmp_path / "images", "L", keep_days=5, min_free_bytes=0)
    rec = Recorder(store, "tcp://127.0.0.1:1", line="L", images=images)
    yield rec
    store.close()


def test_seq_jumps_become_gap_rows_per_topic_and_run_and_duplicates_are_stored_once(recorder):
    for seq in (0, 1, 2, 5, 6, 6, 2):  # 3..4 missed; 6 and 2 arrive twice
        recorder.on_message("decision", header("decision", seq), None)
    for seq in (0, 3):  # overlays: 1..2 missed
        recorder.on_message("overlay", header("overlay", seq, decision_seq=seq), b"jpeg")
    for seq in (4, 5):  # a new run whose first message we see is seq 4: 0..3 of it missed
        recorder.on_message("decision", header("decision", seq, run="r2"), None)
    recorder.flush()
    store = recorder.store
    assert store.seqs("r1") == [0, 1, 2, 5, 6] and store.seqs("r2") == [4, 5]
    gaps = {(g["run_id"], g["topic"], g["first_seq"], g["last_seq"]) for g in store.gaps()}
    assert gaps == {("r1", "decision", 3, 4), ("r1", "overlay", 1, 2), ("r2", "decision", 0, 3)}
    assert all(g["reason"] == "no --control endpoint to ask for a replay" for g in store.gaps())
    # After a restart of the recorder, the record's highest seq is where it picks up.
    again = Recorder(store, "tcp://127.0.0.1:1", line="L")
    again.on_message("decision", header("decision", 9), None)
    again.flush()
    assert ("r1", "decision", 7, 8) in {(g["run_id"], g["topic"], g["first_seq"], g["last_seq"]) for g in store.gaps()}


def test_a_half_written_image_of_a_killed_recorder_is_removed_at_start(tmp_path):
    part = tmp_path / "images" / "2026-12-03" / "cam0" / "081500.000_abc_7_frame.png.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"half")
    kept = part.with_name("081500.000_abc_6_frame.png")
    kept.write_bytes(b"whole")
    ImageStore(tmp_path / "images", "L")
    assert not part.exists() and kept.read_bytes() == b"whole"


def test_images_link_to_their_decision_also_without_decision_seq(recorder, tmp_path):
    ts = time.time()
    recorder.on_message("decision", header("decision", 7, run=None, ts=ts, frame_id=70), None)
    recorder.on_message("overlay", header("overlay", 0, run=None, ts=ts, frame_id=70, encoding="jpeg"), b"x" * 10)
    recorder.flush()
    (row,) = recorder.store.decisions()
    assert row["run_id"].startswith("anon-") and row["overlay_path"].endswith(f"_{row['run_id'][:8]}_7_overlay.jpg")
    assert (tmp_path / "images" / row["overlay_path"]).read_bytes() == b"x" * 10
    # Without run_id a seq that goes back means the runtime restarted: a new run, no gap.
    recorder.on_message("decision", header("decision", 0, run=None), None)
    recorder.flush()
    runs = {d["run_id"] for d in recorder.store.decisions()}
    assert len(runs) == 2 and recorder.store.count("gaps") == 0


def test_keep_days_deletes_old_images_and_keeps_their_rows(recorder, tmp_path):
    old, new = time.time() - 10 * 86400, time.time()
    for seq, ts in ((0, old), (1, new)):
        recorder.on_message("decision", header("decision", seq, ts=ts), None)
        recorder.on_message("overlay", header("overlay", seq, ts=ts, decision_seq=seq), b"y" * 100)
    recorder.flush()  # flush applies retention
    store = recorder.store
    rows = {d["seq"]: d for d in store.decisions()}
    assert set(rows) == {0, 1} and rows[0]["overlay_path"] is None and rows[1]["overlay_path"]
    files = [p for p in (tmp_path / "images").rglob("*") if p.is_file()]
    assert [p.name for p in files] == [rows[1]["overlay_path"].rsplit("/", 1)[1]]
    old_day = time.strftime("%Y-%m-%d", time.gmtime(old))
    assert not (tmp_path / "images" / old_day).exists()  # its emptied folders go too
    (gone,) = [i for i in store.images_of("r1", 0)]
    assert gone["deleted_ts"] is not None


def test_history_lists_gaps_and_events_and_parses_times(recorder, tmp_path):
    now = 1_800_000_000.0
    assert parse_when("2h", now=now) == now - 7200 and parse_when("30m", now=now) == now - 1800
    assert parse_when("1796000000") == 1796000000.0
    assert abs(parse_when("2026-12-03T08:00+00:00") - 1796284800.0) < 1e-6
    with pytest.raises(Exception, match="give 30m, 2h, 7d"):
        parse_when("yesterday")
    recorder.on_message("decision", header("decision", 0), None)
    recorder.on_message("decision", header("decision", 3), None)
    recorder.on_message("event", {"v": 1, "topic": "event", "seq": 0, "run_id": "r1", "publish_ts": time.time(),
                                  "who": "alice", "what": "threshold", "before": 0.5, "after": 0.7,
                                  "settings_version": 2, "camera_id": None}, None)
    recorder.flush()
    db = str(tmp_path / "r.db")
    out = subprocess.run(linegate_cmd("history", db, "--gaps"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "decision seqs 1..2 (L): no --control endpoint" in out.stdout
    out = subprocess.run(linegate_cmd("history", db, "--events"), capture_output=True, text=True, timeout=60)
    assert "threshold by alice: 0.5 -> 0.7 (settings v2)" in out.stdout
    out = subprocess.run(linegate_cmd("history", db, "--since", "1h"), capture_output=True, text=True, timeout=60)
    assert len(out.stdout.splitlines()) == 2 and "1 gap row(s)" in out.stderr
    out = subprocess.run(linegate_cmd("history", db, "--line", "other"), capture_output=True, text=True, timeout=60)
    assert out.stdout == ""
    out = subprocess.run(linegate_cmd("history", str(tmp_path / "none.db")), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "no such record" in out.stderr


def test_record_refuses_a_record_or_image_store_it_cannot_make_with_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for flags, said in ((["--db", str(blocker / "record.db")], "cannot open as SQLite"),
                        (["--db", str(tmp_path / "r.db"), "--images", str(blocker / "images")],
                         "give --images a folder this user may write"),
                        (["--db", str(tmp_path / "r.db"), "--min-free-mb", "-1"], "must be 0 or more")):
        out = subprocess.run(linegate_cmd("record", "tcp://127.0.0.1:1", *flags), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and said in out.stderr, (flags, out.stderr)
