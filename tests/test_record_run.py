"""`linegate record` against a real `linegate run`: the whole run on record (checked against a
second subscriber and the runtime's own count), reject overlays in the image store by date and
camera, `linegate history`, retention under --max-gb, and a full file system (a real tmpfs)."""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import free_tcp_endpoint, linegate_cmd, make_tiny_bundle, write_grey_images
from lineside.store import open_store
from record_helpers import (Collector, Proc, db_target, no_leftover_processes, runtime_count,  # noqa: F401
                            start_recorder, wait_for)

RECORDER_SUBSCRIPTIONS = 4  # decision, overlay, frame, event


def run_runtime(tmp_path: Path, endpoint: str, sources: list[str], subscribers: int, *extra: str) -> Proc:
    bundle = make_tiny_bundle(tmp_path / "bundle")
    args = ["run", "--bundle", str(bundle), "--publish", endpoint, "--wait-subscribers", str(subscribers),
            "--wait-timeout", "20"]
    for source in sources:
        args += ["--source", source]
    return Proc(args + list(extra), tmp_path / "runtime.log")


def history(*args: str) -> str:
    out = subprocess.run(linegate_cmd("history", *args), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_run_is_recorded_whole_with_reject_overlays_and_history(tmp_path, db_target):
    endpoint = free_tcp_endpoint()
    levels = [30, 200, 40, 220, 50] * 12  # 60 parts, 24 bright ones (rejects)
    write_grey_images(tmp_path / "parts", levels, size=48)
    images = tmp_path / "images"
    recorder = start_recorder(endpoint, db_target, tmp_path / "record.log", "--images", str(images),
                              "--line", "line-1")
    collector = Collector(endpoint)
    collector.start()
    runtime = run_runtime(tmp_path, endpoint, [f"folder:{tmp_path / 'parts'}"], RECORDER_SUBSCRIPTIONS + 1,
                          "--publish-frames", "reject")
    assert runtime.wait(60) == 0
    frames, rejects = runtime_count(runtime.log())
    assert (frames, rejects) == (60, 24)
    with open_store(db_target) as store:
        wait_for(lambda: store.count("decisions") == frames and store.count("images") == 2 * rejects, 20,
                 "every decision, overlay and reject frame on record")
    assert recorder.stop() == 0
    seen = collector.finish()
    assert len(seen) == frames

    with open_store(db_target) as store:
        rows = store.decisions(limit=1000, oldest_first=True)
        assert store.count("gaps") == 0
        # Every header field of what the second subscriber got is on record, seq for seq.
        assert [r["seq"] for r in rows] == [h["seq"] for h in seen] == list(range(frames))
        for row, header in zip(rows, seen):
            for key, value in header.items():
                if key != "_topic":
                    assert row[key] == value, (row["seq"], key)
        assert store.image_root == images.resolve()
        for row in rows:
            if row["decision"] == "reject":
                day = time.strftime("%Y-%m-%d", time.gmtime(row["capture_ts"]))
                assert row["overlay_path"].startswith(f"{day}/cam0/"), row["overlay_path"]
                overlay = cv2.imread(str(images / row["overlay_path"]))
                assert overlay is not None and overlay.shape[:2] == (48, 54)
                # The full-resolution frame as the camera gave it (the model saw it at 32x32).
                assert row["frame_path"].startswith(f"{day}/cam0/") and row["frame_path"].endswith(".png")
                frame = cv2.imread(str(images / row["frame_path"]))
                assert frame.shape == (48, 54, 3) and int(frame.mean()) == levels[row["frame_id"]]
            else:
                assert row["overlay_path"] is None and row["frame_path"] is None
        (start,) = store.events()
        assert start["what"] == "start" and start["run_id"] == rows[0]["run_id"]
    assert re.search(r"recorded 60 decisions \(0 by replay\), 1 events, 48 images; 0 gap row", recorder.log())

    lines = history(db_target, "--decision", "reject", "--limit", "0").splitlines()
    assert len(lines) == 24 and all(" REJECT " in line and line.endswith("FO") for line in lines)
    out_csv = tmp_path / "rejects.csv"
    history(db_target, "--decision", "reject", "--limit", "0", "--csv", str(out_csv))
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 24 and {r["decision"] for r in table} == {"reject"}
    assert {"model_id", "threshold", "run_id", "seq", "score", "overlay_path"} <= set(table[0])
    assert all(r["model_id"] == "tiny-test" and float(r["threshold"]) == 0.5 for r in table)
    reject_seq = next(r["seq"] for r in rows if r["decision"] == "reject")
    accept_seq = next(r["seq"] for r in rows if r["decision"] == "accept")
    out = tmp_path / "evidence.png"
    assert "frame + overlay of" in history(db_target, "--image", str(reject_seq), "--out", str(out))
    assert cv2.imread(str(out)).shape[:2] == (48, 108)  # the frame, and its overlay beside it
    fail = subprocess.run(linegate_cmd("history", db_target, "--image", str(accept_seq), "--out", str(out)),
                          capture_output=True, text=True, timeout=60)
    assert fail.returncode == 2 and "has no stored image" in fail.stderr


def noise_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> None:
    """Bright noisy parts (every one a reject): overlays that JPEG cannot shrink much."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"p{i:04d}.png"), rng.integers(150, 256, (size, size, 3), dtype=np.uint8))


def test_retention_keeps_the_image_store_under_max_gb_with_the_newest_images_and_every_row(tmp_path):
    endpoint, db = free_tcp_endpoint(), str(tmp_path / "record.db")
    noise_images(tmp_path / "parts", 150)
    images = tmp_path / "images"
    budget = 60_000  # bytes: about a tenth of the run's overlays
    recorder = start_recorder(endpoint, db, tmp_path / "record.log", "--images", str(images),
                              "--max-gb", str(budget / 1e9), "--min-free-mb", "0")
    runtime = run_runtime(tmp_path, endpoint, [f"folder:{tmp_path / 'parts'}"], RECORDER_SUBSCRIPTIONS,
                          "--max-batch", "2")
    assert runtime.wait(60) == 0
    frames, rejects = runtime_count(runtime.log())
    assert frames == rejects == 150
    with open_store(db) as store:
        wait_for(lambda: store.count("images") == rejects, 20, "every overlay written")
        assert recorder.stop() == 0
        on_disk = [p for p in images.rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in on_disk) <= budget
        assert store.image_bytes(endpoint) == sum(p.stat().st_size for p in on_disk)
        assert store.count("decisions") == frames  # every row stays
        rows = store.decisions(limit=1000, oldest_first=True)
        kept = [r["seq"] for r in rows if r["overlay_path"]]
        assert 3 < len(kept) < rejects
        assert kept == [r["seq"] for r in rows][-len(kept):]  # the newest are the ones kept
        assert {images / r["overlay_path"] for r in rows if r["overlay_path"]} == set(on_disk)
    assert "retention:" in recorder.log()


def mount_tmpfs(mount: Path, options: str) -> None:
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a small tmpfs for the full-disk test")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()}): full-disk test skipped")


@pytest.fixture()
def small_tmpfs(tmp_path):
    mount_tmpfs(tmp_path / "small", "size=2m")
    try:
        yield tmp_path / "small"
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "small")], check=False)


def test_enospc_from_the_file_system_itself_stops_and_resumes_image_writes(tmp_path, caplog):
    """Out of inodes with bytes to spare: the free-space check passes, the write gets ENOSPC."""
    from lineside.imagestore import ImageStore

    mount = tmp_path / "inodes"
    mount_tmpfs(mount, "size=2m,nr_inodes=6")
    try:
        store = ImageStore(mount / "images", "L", min_free_bytes=0, retry_s=0.01)
        written = [store.write(f"2026-12-03/cam0/{i}.jpg", b"j" * 100) for i in range(8)]
        assert written[0] and not written[-1] and store.full_since is not None
        assert "is FULL (No space left on device): image writes stopped" in caplog.text
        for path in (mount / "images" / "2026-12-03" / "cam0").iterdir():
            path.unlink()  # inodes return
        time.sleep(0.02)
        assert store.write("2026-12-03/cam0/again.jpg", b"j" * 100) and store.full_since is None
        assert "has room again: image writes resumed" in caplog.text
        assert not list(mount.rglob("*.part"))  # no half-written file left behind
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_file_system_stops_images_keeps_rows_and_recovers(tmp_path, small_tmpfs):
    endpoint, db = free_tcp_endpoint(), str(tmp_path / "record.db")  # the database elsewhere
    images = small_tmpfs / "images"
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (2 * 2**20 - 96 * 1024))  # leaves ~96 KiB: a few overlays
    recorder = start_recorder(endpoint, db, tmp_path / "record.log", "--images", str(images),
                              "--min-free-mb", "0", "--full-retry-s", "0.5")
    collector = Collector(endpoint, ("overlay",))
    collector.start()
    # Every part a reject (threshold 0): one 224x224 overlay per frame, ~60 a second.
    runtime = run_runtime(tmp_path, endpoint, ["synthetic:fps=60,size=224"], RECORDER_SUBSCRIPTIONS + 1,
                          "--threshold", "0.0")
    full = recorder.wait_log(r"image store .* is FULL \((No space left on device|[^)]*)\): image writes stopped; "
                             r"decisions and events are still recorded")
    with open_store(db) as store:
        rows_when_full = store.count("decisions")
        wait_for(lambda: store.count("decisions") > rows_when_full + 60, 20, "rows flowing while full")
        ballast.unlink()  # space returns
        recorder.wait_log(r"has room again: image writes resumed after [\d.]+ s; \d+ image\(s\) were not stored",
                          start=full.end())
        images_after = store.count("images")
        wait_for(lambda: store.count("images") > images_after + 10, 20, "images written again")
        assert runtime.stop(60) == 0
        frames, _ = runtime_count(runtime.log())
        wait_for(lambda: store.count("decisions") == frames, 20, "every decision on record")
        assert recorder.stop() == 0
        overlays = {h["seq"] for h in collector.finish()}
        gaps = [g for g in store.gaps() if g["reason"] == "image store full: not written"]
        assert gaps and all(g["topic"] == "overlay" for g in gaps)
        skipped = {s for g in gaps for s in range(g["first_seq"], g["last_seq"] + 1)}
        # Each overlay is either in the store or in a gap row, never both, never neither.
        overlay_seqs = {row[0] for row in store._query("SELECT seq FROM images WHERE topic = 'overlay'")}
        assert overlay_seqs.isdisjoint(skipped) and overlay_seqs | skipped == overlays
        assert max(overlay_seqs) > max(skipped)  # writes resumed after the skipped ones
        assert any(r["overlay_path"] for r in store.decisions(limit=frames))  # linked to their decisions
