"""Sources on real files, a real closed port and real threads: folders, video, cameras, synthetic."""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.batcher import Batcher, FrameQueue
from edge.frames import Frame
from edge.images import preprocess
from edge.sources import (CameraSource, FolderSource, SourceThread, SyntheticSource, VideoSource,
                          parse_source)

N_VIDEO = 12
LEVEL = 20  # blue level step per video frame: frame i is a solid blue of i * LEVEL


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "parts"
    folder.mkdir()
    red_bgr = np.zeros((40, 50, 3), np.uint8)
    red_bgr[:, :, 2] = 255
    cv2.imwrite(str(folder / "a_red.png"), red_bgr)
    cv2.imwrite(str(folder / "b_photo.jpg"), np.full((30, 30, 3), 128, np.uint8))
    cv2.imwrite(str(folder / "c_gray.png"), np.full((20, 24), 77, np.uint8))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255  # blue in BGRA, opaque
    cv2.imwrite(str(folder / "d_rgba.png"), rgba)
    (folder / "e_corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    cv2.imwrite(str(folder / "f_odd.png"), np.full((37, 53, 3), 9, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def video_file(tmp_path: Path) -> Path:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(N_VIDEO):
        writer.write(np.full((48, 64, 3), (i * LEVEL, 0, 0), np.uint8))  # BGR: blue
    writer.release()
    return path


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/stream.mjpg"


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def collect(source, n: int | None = None, stop: threading.Event | None = None) -> list[Frame]:
    stop = stop or threading.Event()
    out = []
    for f in source.frames(stop):
        out.append(f)
        if n is not None and len(out) >= n:
            stop.set()
    return out


# -- folder ------------------------------------------------------------------------------------

def test_folder_source_yields_images_in_order_and_marks_a_corrupt_one(image_folder: Path, caplog) -> None:
    src = FolderSource(image_folder, camera_id="line1")
    with caplog.at_level(logging.WARNING, logger="edge.sources"):
        frames = collect(src)
    assert [f.source_name for f in frames] == ["a_red.png", "b_photo.jpg", "c_gray.png", "d_rgba.png",
                                               "e_corrupt.jpg", "f_odd.png"]
    assert [f.frame_id for f in frames] == list(range(6))
    corrupt = frames.pop(4)  # a frame of its own, marked: it will get an error decision naming the file
    assert "e_corrupt.jpg" in corrupt.error and "not a decodable image" in corrupt.error
    assert all(f.error is None for f in frames) and src.counters["errors"] == 1
    for f in frames:
        assert f.camera_id == "line1" and f.image.dtype == np.uint8
        assert f.image.ndim == 3 and f.image.shape[2] == 3
    assert tuple(frames[0].image[0, 0]) == (255, 0, 0)  # red in RGB order
    assert tuple(frames[3].image[0, 0]) == (0, 0, 255)  # RGBA blue -> RGB blue
    assert frames[4].image.shape == (37, 53, 3)
    assert "remove the file" in corrupt.error  # the decision says what to do
    assert src.counters["errors"] == 1 and src.counters["frames"] == 6
    assert src.finite and src.default_policy == "queue"


def test_folder_source_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        FolderSource(tmp_path / "nowhere")


# -- video -------------------------------------------------------------------------------------

def test_video_source_reads_every_frame_in_order(video_file: Path, caplog) -> None:
    src = VideoSource(video_file)
    with caplog.at_level(logging.WARNING, logger="edge.sources"):
        frames = collect(src)
    assert not caplog.records and src.counters["errors"] == 0  # a whole file: nothing to report
    assert len(frames) == N_VIDEO
    assert [f.frame_id for f in frames] == list(range(N_VIDEO))
    for i, f in enumerate(frames):
        r, g, b = f.image.reshape(-1, 3).mean(axis=0)
        assert abs(b - i * LEVEL) < 8 and r < 8, (i, r, g, b)  # order kept, BGR -> RGB
    assert src.finite and src.default_policy == "queue"


def test_a_truncated_video_says_where_it_ended(tmp_path: Path, caplog) -> None:
    """A video cut off in the middle decodes what is left and ends; without a word the run
    would end as cleanly as a whole file. Its header still declares every frame."""
    path, n = tmp_path / "cut.avi", 60
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(n):
        writer.write(np.full((48, 64, 3), (i * 4, 0, 0), np.uint8))
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    src = VideoSource(path)
    with caplog.at_level(logging.WARNING, logger="edge.sources"):
        frames = collect(src)
    assert 0 < len(frames) < n
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"cut.avi ended after {len(frames)} of the {n} frames" in w for w in warnings), warnings
    assert src.counters["errors"] == 1


def test_video_source_that_cannot_be_opened(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.avi"):
        VideoSource(tmp_path / "missing.avi")
    bad = tmp_path / "garbage.avi"
    bad.write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(ValueError, match="garbage.avi"):
        VideoSource(bad)


# -- camera ------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_camera_source_keeps_retrying_an_unreachable_stream(caplog) -> None:
    src = CameraSource(closed_port_url(), backoff_s=0.01, backoff_max_s=0.04)
    stop = threading.Event()
    frames: list[Frame] = []
    with caplog.at_level(logging.INFO, logger="edge.sources"):
        t = threading.Thread(target=lambda: frames.extend(src.frames(stop)), daemon=True)
        t.start()
        wait_until(lambda: src.counters["reconnects"] >= 3 and src.counters["errors"] >= 4,
                   "three reconnection attempts")
        stop.set()
        t.join()
    assert frames == []
    # One line for the state change, not one per attempt.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and "retrying in" in lines[0] and "127.0.0.1" in lines[0]
    assert not src.finite and src.default_policy == "latest"


@pytest.mark.timeout(120)
def test_camera_source_stops_during_a_long_backoff(tmp_path: Path) -> None:
    src = CameraSource(str(tmp_path / "no-such-device"), backoff_s=3600.0)
    stop = threading.Event()
    t = threading.Thread(target=lambda: list(src.frames(stop)), daemon=True)
    t.start()
    wait_until(lambda: src.counters["errors"] == 1, "the first failed open")  # now in its hour of backoff
    stop.set()
    t.join()  # a backoff that ignored stop would sit out the hour (pytest-timeout)
    assert src.counters["errors"] == 1 and src.counters["reconnects"] == 0


def test_camera_source_reconnects_when_the_feed_ends(video_file: Path, caplog) -> None:
    # A video file as the "camera": it delivers frames, ends (lost), and opens again (reconnect).
    src = CameraSource(str(video_file), camera_id="cam3", backoff_s=0.01)
    with caplog.at_level(logging.INFO, logger="edge.sources"):
        frames = collect(src, n=2 * N_VIDEO + 3)
    assert [f.frame_id for f in frames] == list(range(2 * N_VIDEO + 3))
    assert all(f.camera_id == "cam3" for f in frames)
    assert src.counters["reconnects"] == 2 and src.counters["lost"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("connected to" in m for m in messages) == 3
    assert sum("lost" in m and f"after {N_VIDEO} frames" in m for m in messages) == 2


# -- synthetic ---------------------------------------------------------------------------------

def test_synthetic_source_finite_and_paced() -> None:
    src = parse_source("synthetic:count=4,fps=20,seed=1,size=64,defect_rate=0.5", "syn")
    assert isinstance(src, SyntheticSource) and src.finite and src.default_policy == "queue"
    start = time.monotonic()
    frames = collect(src)
    assert time.monotonic() - start >= 3 / 20  # at least: 4 frames at 20 fps span 3 intervals
    assert [f.frame_id for f in frames] == [0, 1, 2, 3]
    assert all(f.image.shape == (64, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(isinstance(f.label, str) and f.label for f in frames)


def test_synthetic_source_without_count_is_live() -> None:
    src = parse_source("synthetic:size=32")
    assert not src.finite and src.default_policy == "latest"
    assert len(collect(src, n=5)) == 5  # stops on the stop event, not on a count


# -- parse_source --------------------------------------------------------------------------------

def test_parse_source_forms(image_folder: Path, video_file: Path) -> None:
    folder = parse_source(f"folder:{image_folder}", "cam7")
    assert isinstance(folder, FolderSource) and folder.path == image_folder and folder.camera_id == "cam7"
    video = parse_source(f"video:{video_file}")
    assert isinstance(video, VideoSource) and video.path == video_file and video.camera_id == "cam0"
    for spec, target in [("camera:0", 0), ("camera:12", 12), ("camera:/dev/video2", "/dev/video2"),
                         ("rtsp://10.0.0.5:554/line", "rtsp://10.0.0.5:554/line"),
                         ("http://127.0.0.1:8080/mjpg", "http://127.0.0.1:8080/mjpg")]:
        src = parse_source(spec, "cam1")
        assert isinstance(src, CameraSource) and src.target == target and src.camera_id == "cam1"


@pytest.mark.parametrize("spec", ["ftp://host/x", "webcam", "folder:", "video:", "camera:", "Folder:/x"])
def test_parse_source_rejects_unknown_forms(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_source(spec)
    for form in ("folder:PATH", "video:PATH", "camera:INDEX", "rtsp://", "synthetic"):
        assert form in str(info.value)


def test_parse_source_rejects_bad_synthetic_options() -> None:
    with pytest.raises(ValueError, match="count, fps, defect_rate, seed, size"):
        parse_source("synthetic:speed=3")
    with pytest.raises(ValueError, match="fps"):
        parse_source("synthetic:fps=fast")
    # values that would quietly run unpaced, produce nothing or draw nonsense
    for option, what in (("fps=-1", "above 0"), ("fps=nan", "above 0"), ("count=0", "at least 1"),
                         ("defect_rate=1.5", "between 0 and 1"), ("size=8", "at least 16")):
        with pytest.raises(ValueError, match=f"synthetic source option {option.split('=')[0]}=.*must be {what}"):
            parse_source(f"synthetic:{option}")


# -- SourceThread --------------------------------------------------------------------------------

def test_source_thread_preprocesses_and_ends_the_stream(image_folder: Path) -> None:
    q = FrameQueue(capacity=2)  # smaller than the folder: the thread must wait, not drop
    thread = SourceThread(FolderSource(image_folder), q, lambda rgb: preprocess(rgb, (32, 32)))
    batcher = Batcher(q, max_batch=4, max_wait_ms=1)
    thread.start()
    frames = []
    deadline = time.monotonic() + 30
    while (batch := batcher.next_batch(poll_s=0.05)) is not None and time.monotonic() < deadline:
        frames.extend(batch)
    thread.join(timeout=2)
    assert batch is None and not thread.is_alive() and thread.error is None
    assert [f.frame_id for f in frames] == list(range(6)) and q.dropped == {}
    for f in frames:
        if f.source_name == "e_corrupt.jpg":  # nothing to preprocess: it travels marked
            assert f.tensor is None and f.error
            continue
        assert f.tensor is not None and f.tensor.shape == (3, 32, 32) and f.tensor.dtype == np.float32


def test_stream_waits_for_a_source_thread_not_started_yet(image_folder: Path) -> None:
    q = FrameQueue()
    first = SourceThread(FolderSource(image_folder, "cam0"), q, None)
    second = SourceThread(FolderSource(image_folder, "cam1"), q, None)  # created, not started yet
    first.start()
    first.join(timeout=5)
    batcher = Batcher(q, max_batch=8, max_wait_ms=1)
    assert len(batcher.next_batch()) == 6
    assert batcher.next_batch(poll_s=0.05) == []  # not None: the second source is still to come
    second.start()
    assert [f.camera_id for f in drain_all(batcher)] == ["cam1"] * 6


def drain_all(batcher: Batcher) -> list[Frame]:
    out: list[Frame] = []
    while (batch := batcher.next_batch(poll_s=0.05)) is not None:
        out.extend(batch)
    return out


def test_source_thread_marks_frames_it_cannot_preprocess_and_goes_on(image_folder: Path, caplog) -> None:
    def broken(rgb: np.ndarray) -> np.ndarray:
        raise RuntimeError("model input mismatch")

    q = FrameQueue()
    src = FolderSource(image_folder, "cam9")
    thread = SourceThread(src, q, broken)
    with caplog.at_level(logging.DEBUG, logger="edge.sources"):
        thread.start()
        thread.join(timeout=5)
    assert not thread.is_alive() and thread.error is None
    frames = drain_all(Batcher(q, max_wait_ms=1))
    # every frame is still there, in order, marked: each will get an error decision
    assert [f.frame_id for f in frames] == list(range(6))
    decoded = [f for f in frames if f.source_name != "e_corrupt.jpg"]
    assert all(f.error == "preprocessing failed: model input mismatch" and f.tensor is None for f in decoded)
    assert src.counters["bad_frames"] == 6 and "not a decodable image" in frames[4].error
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "model input mismatch" in r.getMessage()]
    assert len(warnings) == 1 and "cam9 frame 0" in warnings[0]  # one line per run of bad frames


class _Exploding(FolderSource):
    def frames(self, stop):
        yield from super().frames(stop)
        raise OSError("disk gone")


def test_source_thread_logs_a_dying_source_and_still_ends_the_stream(image_folder: Path, caplog) -> None:
    q = FrameQueue()
    thread = SourceThread(_Exploding(image_folder, "cam8"), q, None)
    with caplog.at_level(logging.ERROR, logger="edge.sources"):
        thread.start()
        thread.join(timeout=5)
    assert not thread.is_alive() and isinstance(thread.error, OSError)
    assert any("cam8" in r.getMessage() and "disk gone" in r.getMessage() for r in caplog.records)
    assert len(drain_all(Batcher(q, max_wait_ms=1))) == 6  # what it read before dying still counts


def test_source_thread_stops_a_live_source_on_stop(caplog) -> None:
    q = FrameQueue()
    stop = threading.Event()
    thread = SourceThread(CameraSource(closed_port_url(), backoff_s=0.01), q, None, stop=stop)
    assert thread.policy == "latest"
    thread.start()
    wait_until(lambda: thread.source.counters["errors"] >= 1, "a failed connection attempt")
    assert Batcher(q).next_batch(poll_s=0.05) == []  # live, no frames, but not ended
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert Batcher(q).next_batch(poll_s=1) is None


def test_source_thread_ends_a_live_source_when_the_queue_closes(video_file: Path) -> None:
    q = FrameQueue()
    # An endless live feed: the clip reconnects each time it ends.
    thread = SourceThread(CameraSource(str(video_file), backoff_s=0.01), q, None)
    thread.start()
    deadline = time.monotonic() + 30
    while len(q) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(q) == 1  # "latest": one waiting frame for the camera, however many arrived
    q.close()
    thread.join(timeout=2)
    assert not thread.is_alive() and thread.error is None


# -- per-source settings: GStreamer, camera options, frame checks ---------------------------------

def test_gstreamer_source_needs_an_opencv_with_gstreamer() -> None:
    from edge.sources import has_gstreamer

    if has_gstreamer():
        src = parse_source("gst:videotestsrc ! videoconvert ! appsink", "cam2")
        assert isinstance(src, CameraSource) and src.gstreamer and src.camera_id == "cam2"
    else:
        with pytest.raises(ValueError, match="no GStreamer backend.*rtsp://"):
            parse_source("gst:videotestsrc ! videoconvert ! appsink")


@pytest.mark.timeout(120)
def test_a_camera_whose_read_blocks_is_reported_stalled_and_recovers(caplog) -> None:
    """A real MJPEG camera that keeps the connection open and stops sending: the reader is
    blocked inside cap.read() (the read timeout here, 60 s, stands for a GStreamer or device
    read that has none), so only status(), called from the stats thread, can tell."""
    from mjpeg_server import MjpegServer

    camera = MjpegServer(level=60, fps=25).start()
    src = CameraSource(camera.url, "hung", io_timeout_s=60.0, stall_s=0.5)
    stop = threading.Event()
    frames: list[Frame] = []

    def read() -> None:
        for f in src.frames(stop):
            frames.append(f)

    reader = threading.Thread(target=read, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="edge.sources"):
            reader.start()
            wait_until(lambda: len(frames) >= 5, "frames from the camera")
            assert src.status()["state"] == "connected" and src.status()["frame_age_s"] < 0.5
            camera.paused.set()
            wait_until(lambda: src.status()["state"] == "stalled", "the stall to show in status()")
            status = src.status()
            assert status["frame_age_s"] > 0.5 and src.state == "connected"  # the thread itself cannot tell
            n = len(frames)
            camera.paused.clear()
            wait_until(lambda: len(frames) > n + 3, "frames again")
            assert src.status()["state"] == "connected"
    finally:
        stop.set()
        camera.stop()
        reader.join(timeout=10)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the read is blocked" in m for m in messages) == 1  # once per stall, not per stats message
    assert any("frames arrive again" in m for m in messages)


@pytest.mark.timeout(120)
def test_a_camera_whose_read_blocks_is_reopened_after_reopen_after_s(caplog) -> None:
    """The same hung camera with reopen_after_s: the source stops waiting for the blocked read,
    counts the feed as lost and reopens it. The reopen blocks too (the camera still hangs; the
    60 s open timeout stands for an open without one): it is given up as well, and no more
    than MAX_BLOCKED_READS threads are left behind however long the camera hangs. Frames flow
    again once the camera sends; the threads end when their open or read returns; a stop is
    honoured while the camera hangs."""
    from mjpeg_server import MjpegServer

    from edge.sources import MAX_BLOCKED_READS

    camera = MjpegServer(level=60, fps=25).start()
    src = CameraSource(camera.url, "hung", io_timeout_s=60.0, reopen_after_s=0.3, backoff_s=0.1,
                       backoff_max_s=0.2)
    stop = threading.Event()
    frames: list[Frame] = []

    def read() -> None:
        for f in src.frames(stop):
            frames.append(f)

    def readers() -> int:
        return sum(t.name == "read-hung" and t.is_alive() for t in threading.enumerate())

    reader = threading.Thread(target=read, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="edge.sources"):
            reader.start()
            wait_until(lambda: len(frames) >= 5, "frames from the camera")
            camera.paused.set()
            wait_until(lambda: src.counters["lost"] == 1 and src.state in ("lost", "down"),
                       "the blocked read to be given up")
            wait_until(lambda: src.state == "down", "the blocked reopen to be given up too")
            most = 0
            for _ in range(150):  # 1.5 s of a hung camera: attempts go on, threads do not pile up
                most = max(most, readers())
                time.sleep(0.01)
            assert 1 <= most <= MAX_BLOCKED_READS + 1 and src.counters["errors"] >= 2
            n = len(frames)
            camera.paused.clear()
            wait_until(lambda: len(frames) > n + 3 and src.state == "connected", "frames after the reopen")
            assert src.counters["reconnects"] >= 2
            wait_until(lambda: readers() == 1, "the abandoned threads to end once their open or read returned")
            camera.paused.set()  # hung again, and now the service stops
            wait_until(lambda: src.counters["lost"] == 2, "the second hang to be given up")
            stop.set()
            reader.join(timeout=2)
            assert not reader.is_alive(), "stop not honoured while the camera hangs"
    finally:
        stop.set()
        camera.paused.clear()
        reader.join(timeout=10)
        camera.stop()
    wait_until(lambda: readers() == 0, "every read thread to end once the camera is gone")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("(reopen_after_s): reopening it" in m for m in messages) == 2  # at WARNING once per lost feed


def test_camera_options_apply_to_cameras_only(image_folder: Path) -> None:
    cam = parse_source("rtsp://10.0.0.5/x", "c", backoff_s=0.2, backoff_max_s=3.0, io_timeout_s=1.0,
                       reopen_after_s=4.0)
    assert (cam.backoff_s, cam.backoff_max_s, cam.io_timeout_s, cam.reopen_after_s) == (0.2, 3.0, 1.0, 4.0)
    assert parse_source("camera:0", "c").reopen_after_s is None  # off unless asked for
    with pytest.raises(ValueError, match=r"c: reopen_after_s must be > 0 seconds"):
        parse_source("camera:0", "c", reopen_after_s=0.0)
    with pytest.raises(ValueError, match="apply to cameras and streams only"):
        parse_source(f"folder:{image_folder}", backoff_s=1.0)
    with pytest.raises(ValueError, match="backoff_s <= backoff_max_s"):
        CameraSource(0, backoff_s=2.0, backoff_max_s=1.0)


def test_frame_checks_and_roi_crop(image_folder: Path) -> None:
    from edge.sources import frame_problem

    rgb = np.zeros((48, 64, 3), np.uint8)
    assert frame_problem(rgb) is None and frame_problem(rgb, (64, 48), (4, 8, 60, 40)) is None
    assert "64x48" in frame_problem(rgb, expect_size=(32, 32)) and "32x32" in frame_problem(rgb, (32, 32))
    assert "does not fit" in frame_problem(rgb, roi=(10, 0, 60, 10))
    assert "4 channel(s)" in frame_problem(np.zeros((48, 64, 4), np.uint8))
    assert "1 channel(s)" in frame_problem(np.zeros((48, 64), np.uint8))
    assert "not an image" in frame_problem(np.zeros(5, np.uint8))
    # the crop happens in the source thread, before preprocessing: a view of the frame
    src = FolderSource(image_folder, "roi")
    src.roi = (1, 2, 8, 6)
    q = FrameQueue()
    thread = SourceThread(src, q, lambda rgb: preprocess(rgb, (4, 4)))
    thread.start()
    thread.join(timeout=5)
    frames = drain_all(Batcher(q, max_wait_ms=1))
    assert [f.image.shape for f in frames if f.error is None] == [(6, 8, 3)] * 5
    assert tuple(frames[0].image[0, 0]) == (255, 0, 0)
