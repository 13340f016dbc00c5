"""The service: systemd's notify protocol on a real AF_UNIX datagram socket, SIGTERM draining,
engine failures on a real ONNX Runtime session, the stop timeout, and the systemd unit
(systemd-analyze verify, install.sh's refusals). Most run the real `linegate run --config` process."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx
import pytest
import zmq
from onnx import TensorProto, helper

from conftest import REPO, free_tcp_endpoint, linegate_cmd, make_tiny_bundle, write_grey_images
from edge.bundle import write_manifest
from edge.service import Notifier
from mjpeg_server import MjpegServer
from runtime_helpers import Collector, RunProcess, write_config

# -- sd_notify ----------------------------------------------------------------------------------


class NotifyListener(threading.Thread):
    """What systemd does: a datagram socket at $NOTIFY_SOCKET, recording every message."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            self.got.append((time.monotonic(), data.decode()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)
        self.sock.close()

    def times(self, line: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """Arrival times of the messages holding ``line`` (exactly, as one of their lines)."""
        return [t for t, m in list(self.got) if since <= t <= until and line in m.split("\n")]

    def wait_for(self, line: str, timeout: float, since: float = 0.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = self.times(line, since)
            if hits:
                return hits[0]
            time.sleep(0.02)
        raise AssertionError(f"no {line!r} within {timeout} s; got {[m for _, m in self.got]}")


def _done_frames(log: str) -> int:
    """The frame count of the service's last line, "done: N frames, ..."."""
    found = re.search(r"done: (\d+) frames", log)
    assert found, log
    return int(found.group(1))


def _wait_log(run: RunProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.log():
        assert run.proc.poll() is None, run.log()
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s:\n{run.log()}"
        time.sleep(0.05)


def test_notify_protocol_ready_watchdog_status_stopping(tiny_bundle, tmp_path):
    camera = MjpegServer(level=40, fps=25)
    with socket.socket() as s:  # a port for the camera, which is not up yet
        s.bind(("127.0.0.1", 0))
        camera.port = s.getsockname()[1]
    listener = NotifyListener(tmp_path / "notify.sock")
    listener.start()
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "publisher": {"endpoint": free_tcp_endpoint(), "stats_interval_s": 0.25},
        "service": {"frame_stall_s": 1.0, "stop_timeout_s": 5.0},
        "source": [{"uri": camera.url, "backoff_s": 0.1, "backoff_max_s": 0.2}],
    })
    # WATCHDOG_USEC as systemd sets it for WatchdogSec=0.4: a ping every 0.2 s is expected.
    run = RunProcess(config, tmp_path / "run.log",
                     env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
    try:
        _wait_log(run, "running:", 60)  # the engine is loaded; the camera is still away
        time.sleep(0.7)
        assert listener.got == []  # no READY before the first source is open
        camera.start()
        ready = listener.wait_for("READY=1", 20)
        deadline = time.monotonic() + 20  # pings every 0.2 s while frames flow: wait for three
        while len(listener.times("WATCHDOG=1", since=ready)) < 3:
            assert time.monotonic() < deadline, listener.got
            time.sleep(0.05)
        camera.stop()  # frames stop: after frame_stall_s the watchdog is no longer fed
        stopped = time.monotonic()
        time.sleep(3.0)
        assert listener.times("WATCHDOG=1", since=stopped + 1.0 + 0.5, until=stopped + 3.0) == []
        camera.start()  # frames flow again: so does the watchdog
        restarted = time.monotonic()
        listener.wait_for("WATCHDOG=1", 20, since=restarted)
        run.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert run.wait(timeout=10) == 0, run.log()
        listener.wait_for("STOPPING=1", 10)  # sent before the exit; the listener may not have read it yet
    finally:
        run.kill()
        camera.stop()
        listener.stop()
    messages = [m for _, m in listener.got]
    assert messages[0].split("\n")[:2] == ["READY=1", f"MAINPID={run.pid}"]
    assert listener.times("READY=1") == [ready]  # once
    assert min(listener.times("WATCHDOG=1")) > ready
    status = [m for m in messages if m.startswith("STATUS=") and "frames/s" in m]
    assert status and any("cam0 connected" in m for m in status)
    assert any("cam0 lost" in m or "cam0 down" in m for m in status)  # the outage shows in systemctl status
    assert re.search(r"STATUS=\d+\.\d frames/s", status[0])
    stopping = listener.times("STOPPING=1")
    assert len(stopping) == 1 and stopping[0] >= signalled
    assert listener.times("WATCHDOG=1", since=stopping[0]) == []  # no pings while stopping
    # once, for the outage: not at the start, when READY goes out before the first decision
    assert run.log().count("not feeding the systemd watchdog") == 1, run.log()


def test_notifier_abstract_socket_and_disabled_without_notify_socket(tmp_path):
    name = f"linegate-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # what "@name" in NOTIFY_SOCKET means
        sock.settimeout(2)
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
        assert notifier.enabled and notifier.watchdog_s == 30.0
        assert notifier.notify("STATUS=hello", "WATCHDOG=1")
        assert sock.recv(100) == b"STATUS=hello\nWATCHDOG=1"
        notifier.close()
    off = Notifier.from_env({})
    assert not off.enabled and off.watchdog_s is None and off.notify("READY=1") is False
    # the watchdog belongs to another process: not ours to feed
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None


# -- SIGTERM --------------------------------------------------------------------------------------

def test_sigterm_publishes_every_batched_frame_and_exits_0_in_time(tiny_bundle, tmp_path):
    endpoint = free_tcp_endpoint()
    stop_timeout = 5.0
    # Two cameras replaying a folder of small images ("queue" policy: nothing dropped). Reading
    # them is much faster than drawing and publishing an overlay for every frame, so the queue
    # is full when SIGTERM arrives: the drain has real work to do.
    write_grey_images(tmp_path / "parts", [20 + i % 200 for i in range(1000)])
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "batching": {"max_batch": 8, "max_wait_ms": 5.0},
        "overlay": {"accepts_every": 1},
        "publisher": {"endpoint": endpoint, "wait_subscribers": 2, "stats_interval_s": 0.5},
        "service": {"stop_timeout_s": stop_timeout},
        "source": [{"id": "a", "uri": f"folder:{tmp_path / 'parts'}"},
                   {"id": "b", "uri": f"folder:{tmp_path / 'parts'}"}],
    })
    sub = Collector(endpoint)
    sub.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        sub.wait_for(lambda: len(sub.decisions()) >= 150, 60, "150 decisions")
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(timeout=120)
        assert code == 0, run.log()
        # the last messages were sent before the exit: wait for them, not for a while
        total = _done_frames(run.log())
        sub.wait_for(lambda: len(sub.decisions()) == total and any(
            m.header["state"] == "stopping" and m.header["frames"] == total for m in sub.messages("stats")),
            30, f"all {total} decisions and the final stats message")
    finally:
        run.kill()
        sub.stop()
    log = run.log()
    # within the stop timeout: status 0, not 1 (EXIT_STOP_TIMEOUT), and nothing discarded
    assert "stop timeout" not in log and "discarded" not in log
    queued = int(re.search(r"stopping \(received SIGTERM\): sources closed, (\d+) queued", log).group(1))
    assert queued > 8  # frames were waiting beyond the batch in flight: the drain was exercised
    decisions = sub.decisions()
    assert [d["seq"] for d in decisions] == list(range(len(decisions))) and sub.sub.gaps["decision"] == 0
    final = [m.header for m in sub.messages("stats")][-1]
    assert final["frames"] == len(decisions)  # every decision made was received
    assert f"done: {len(decisions)} frames" in log
    for cam in ("a", "b"):
        ids = [d["frame_id"] for d in decisions if d["camera_id"] == cam]
        # "queue" policy: every frame read entered the queue, and each one got its decision
        assert ids == list(range(len(ids))), cam
        # at most the one frame a source held, waiting for room, when the queue closed
        assert final["cameras"][cam]["frames"] - len(ids) in (0, 1)
        assert final["cameras"][cam]["dropped"] == 0
    assert {d["camera_id"] for d in decisions if d["batch"] == decisions[-1]["batch"]} <= {"a", "b"}
    assert any(len({d["camera_id"] for d in decisions if d["batch"] == b}) == 2
               for b in {d["batch"] for d in decisions})  # batches mix the two cameras


@pytest.mark.timeout(120)  # a service that did not give up on the hung engine would hang here
def test_a_hung_engine_at_stop_exits_1_when_the_stop_timeout_runs_out(tiny_bundle, tmp_path, monkeypatch, caplog):
    """run_service on a config, in this process, with the real engine wrapped so that its
    second batch never returns (GatedEngine: no real engine hangs on cue). SIGTERM goes to
    the service's own handler; the stop timeout discards the waiting frames and gives up on
    the engine call: exit status 1 (EXIT_STOP_TIMEOUT), which systemd restarts."""
    import edge.service
    from edge.config import load_config
    from runtime_helpers import GatedEngine

    write_grey_images(tmp_path / "parts", [20 + i for i in range(40)])  # fewer than the queue holds
    config = load_config(write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "batching": {"max_batch": 2, "max_wait_ms": 0.0},
        "publisher": {"endpoint": free_tcp_endpoint()},
        "service": {"stop_timeout_s": 2.0},
        "source": [{"uri": f"folder:{tmp_path / 'parts'}"}],
    }))
    gated: list[GatedEngine] = []
    real_open = edge.service.open_engine

    def open_gated(*args, **kwargs):
        gated.append(GatedEngine(real_open(*args, **kwargs)))
        return gated[0]

    monkeypatch.setattr(edge.service, "open_engine", open_gated)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sent = threading.Event()

    def terminate_when_stuck() -> None:
        # Only once the service's handler is in place (the engine runs inside pipeline.run())
        # and every frame is queued (the folder ended): never a SIGTERM for pytest itself.
        deadline = time.monotonic() + 60
        while not (gated and gated[0].entered.is_set() and "stopping (sources ended)" in caplog.text):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)
        sent.set()

    killer = threading.Thread(target=terminate_when_stuck, daemon=True)
    with caplog.at_level(logging.INFO, logger="edge"):
        killer.start()
        try:
            code = edge.service.run_service(config)
        finally:
            if gated:
                gated[0].gate.set()
            killer.join(timeout=5)
    assert sent.is_set(), caplog.text
    assert code == edge.service.EXIT_STOP_TIMEOUT == 1
    first, hung = gated[0].batch_sizes
    assert f"done: {first} frames" in caplog.text
    assert f"{40 - first - hung} discarded at the stop timeout" in caplog.text
    assert "the engine did not finish the batch in flight" in caplog.text


# -- engine failures --------------------------------------------------------------------------------

def make_poison_bundle(path: Path) -> Path:
    """The tiny bundle, plus a Reshape that ONNX Runtime refuses at run time for any batch
    holding a pixel above 250: a real engine error on some batches and not on others."""
    make_tiny_bundle(path)
    model = onnx.load(path / "model.onnx")
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["score_raw" if o == "score" else o for o in node.output]
    graph.initializer.extend([helper.make_tensor("k250", TensorProto.FLOAT, [], [250.0]),
                              helper.make_tensor("i4", TensorProto.INT64, [], [4]),
                              helper.make_tensor("i1", TensorProto.INT64, [], [1]),
                              helper.make_tensor("minus1", TensorProto.INT64, [1], [-1]),
                              helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
                              helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    graph.node.extend([
        helper.make_node("ReduceMax", ["pixels"], ["mx"], keepdims=0),
        helper.make_node("Greater", ["mx", "k250"], ["bright"]),
        helper.make_node("Cast", ["bright"], ["flag"], to=TensorProto.INT64),
        helper.make_node("Mul", ["flag", "i4"], ["f4"]),
        helper.make_node("Add", ["f4", "i1"], ["k"]),  # 1, or 5 for a bright batch
        helper.make_node("Unsqueeze", ["k", "axis0"], ["k1"]),
        helper.make_node("Concat", ["minus1", "k1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["pixels", "shape"], ["r"]),  # B*3072 values into rows of 5: fails
        helper.make_node("ReduceSum", ["r"], ["rs"], keepdims=0),
        helper.make_node("Mul", ["rs", "zero"], ["z"]),
        helper.make_node("Add", ["score_raw", "z"], ["score"]),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, path / "model.onnx")
    write_manifest(path, json.loads((path / "manifest.json").read_text()))  # new sha256
    return path


def _run_folder(bundle: Path, folder: Path, tmp_path: Path, failures: int) -> tuple[int, str, list[dict]]:
    endpoint = free_tcp_endpoint()
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(bundle)},
        "batching": {"max_batch": 1},  # one frame per batch: which frames fail is certain
        "publisher": {"endpoint": endpoint, "wait_subscribers": 1},
        "service": {"max_engine_failures": failures},
        "source": [{"uri": f"folder:{folder}"}],
    })
    sub = Collector(endpoint, ("decision",))
    sub.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        code = run.wait(timeout=60)
        total = _done_frames(run.log())  # sent before the exit, maybe not all arrived yet
        sub.wait_for(lambda: len(sub.decisions()) >= total, 30, f"{total} decisions")
    finally:
        run.kill()
        sub.stop()
    return code, run.log(), sub.decisions()


def test_engine_error_on_a_batch_gives_error_decisions_and_the_service_carries_on(tmp_path):
    bundle = make_poison_bundle(tmp_path / "bundle")
    levels = [10, 255, 30, 240, 255, 60, 70]  # 255: the engine fails on that frame's batch
    names = write_grey_images(tmp_path / "parts", levels)
    code, log, decisions = _run_folder(bundle, tmp_path / "parts", tmp_path, failures=2)
    assert code == 0, log
    assert [d["source"] for d in decisions] == names  # every frame has its decision, in order
    expected = ["error" if v == 255 else "reject" if v / 255 >= 0.5 else "accept" for v in levels]
    assert [d["decision"] for d in decisions] == expected
    for d in decisions:
        if d["decision"] == "error":
            assert "engine failed" in d["error"] and "Reshape" in d["error"]
        else:
            assert "error" not in d and d["score"] == pytest.approx(levels[d["frame_id"]] / 255, abs=1e-5)
    # the log names the frames of each failed batch
    assert re.search(r"engine failed on batch \d+ \(frames cam0#1\)", log)
    assert re.search(r"engine failed on batch \d+ \(frames cam0#4\)", log)
    assert "engine works again" in log and "2 errors" in log


def test_repeated_engine_failure_exits_nonzero_for_a_restart(tmp_path):
    bundle = make_poison_bundle(tmp_path / "bundle")
    write_grey_images(tmp_path / "parts", [255] * 6)
    code, log, decisions = _run_folder(bundle, tmp_path / "parts", tmp_path, failures=3)
    assert code == 3, log
    assert "engine failed on 3 batches in a row" in log and "exiting with status 3" in log
    # nothing read was dropped silently: each frame read got an error decision
    assert len(decisions) >= 3 and {d["decision"] for d in decisions} == {"error"}
    assert [d["frame_id"] for d in decisions] == list(range(len(decisions)))
    assert f"done: {len(decisions)} frames" in log


def test_exit_status_tells_systemd_what_a_restart_can_cure(tiny_bundle):
    """2 (not restarted: RestartPreventExitStatus=2) only for what the configuration must fix;
    an endpoint still held by another process (the instance before, closing) may pass: 3."""
    def run(endpoint: str) -> subprocess.CompletedProcess:
        return subprocess.run(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source", "synthetic:count=2",
                                           "--publish", endpoint), capture_output=True, text=True, timeout=60)

    holder = zmq.Context.instance().socket(zmq.PUB)
    endpoint = free_tcp_endpoint()
    holder.bind(endpoint)
    try:
        held = run(endpoint)
    finally:
        holder.close(linger=0)
    assert held.returncode == 3 and "Address already in use" in held.stderr and "Traceback" not in held.stderr
    malformed = run("tcp//127.0.0.1:5556")
    assert malformed.returncode == 2 and "tcp//127.0.0.1:5556" in malformed.stderr


# -- systemd files -----------------------------------------------------------------------------------

UNIT = REPO / "systemd" / "linegate.service"
INSTALLED_BINARY = "/opt/linegate/venv/bin/linegate"


def _verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    # verify insists that ExecStart's program exists; on this box the venv is elsewhere, so
    # the copy under test points at a stand-in that runs this checkout's linegate.
    stand_in = tmp_path / "bin" / "linegate"
    stand_in.parent.mkdir()
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m linegate.cli \"$@\"\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "linegate.service"
    unit.write_text(text.replace(INSTALLED_BINARY, str(stand_in)))
    out = _verify(unit)
    assert out.returncode == 0 and "linegate.service" not in out.stdout + out.stderr, out.stdout + out.stderr
    # the check can fail: verify reports a bad value in a copy of the same unit
    broken = tmp_path / "broken" / "linegate.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("WatchdogSec=30", "WatchdogSec=thirty"))
    complaint = (lambda o: o.stdout + o.stderr)(_verify(broken))
    assert "linegate.service:" in complaint and "thirty" in complaint


def test_systemd_unit_settings():
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    for key, value in [("Type", "notify"), ("Restart", "on-failure"), ("User", "linegate"),
                       ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("SupplementaryGroups", "video"), ("RestartPreventExitStatus", "2"),
                       ("StartLimitIntervalSec", "0")]:
        assert settings.get(key) == [value], key
    assert "--config ${LINEGATE_CONFIG}" in settings["ExecStart"][0]
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP: edge.control reloads the config
    assert settings["EnvironmentFile"] == ["-/etc/linegate/linegate.env"]
    # systemd must not kill linegate before its own stop timeout (10 s by default) is over
    assert int(settings["TimeoutStopSec"][0]) > 10 and int(settings["WatchdogSec"][0]) > 0
    env = (REPO / "systemd" / "linegate.env").read_text()
    assert "LINEGATE_CONFIG=/etc/linegate/linegate.toml" in env


INSTALL = REPO / "systemd" / "install.sh"


def _install(bin_dir: Path, *args: str, as_nobody: bool = False) -> subprocess.CompletedProcess:
    command = [shutil.which("bash"), str(INSTALL), *args]
    if as_nobody:  # a real unprivileged user, as an operator who forgot sudo
        command = [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={"PATH": str(bin_dir)})


def test_install_script_refuses_without_root_a_bundle_or_its_config(tiny_bundle, tmp_path):
    """install.sh's refusals, run for real (as root here, the refusals after the root check
    too). Its PATH holds only `id` and `dirname`: if a refusal ever stopped refusing, the
    script would fail at its first real step (useradd: not found) instead of installing
    anything on this box."""
    subprocess.run(["bash", "-n", str(INSTALL)], check=True)  # it parses
    with tempfile.TemporaryDirectory() as tools:
        bin_dir = Path(tools)
        bin_dir.chmod(0o755)  # readable by the unprivileged user too
        for tool in ("id", "dirname"):
            (bin_dir / tool).symlink_to(shutil.which(tool))
        out = _install(bin_dir)
        assert out.returncode == 1 and "usage: install.sh BUNDLE_DIR [CONFIG.toml]" in out.stderr
        root = os.geteuid() == 0
        if not root or shutil.which("setpriv"):
            out = _install(bin_dir, str(tiny_bundle), as_nobody=root)
            assert out.returncode == 2 and out.stderr == "install.sh: run as root (sudo)\n"
        if root:  # the checks after the root check (a non-root run never gets there)
            out = _install(bin_dir, str(tmp_path / "nowhere"))
            assert out.returncode == 2
            assert out.stderr == f"install.sh: {tmp_path / 'nowhere'} is not a bundle (no manifest.json)\n"
            out = _install(bin_dir, str(tiny_bundle), str(tmp_path / "none.toml"))
            assert out.returncode == 2 and out.stderr == f"install.sh: no config file {tmp_path / 'none.toml'}\n"


def test_service_modules_start_without_torch():
    code = ("import sys\nimport edge.config, edge.service, edge.stats, edge.auth, edge.control, edge.metrics\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'export', "
            "'starlette', 'aiohttp', 'flask', 'fastapi', 'django', 'tornado')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
