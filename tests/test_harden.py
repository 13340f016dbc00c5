"""What a hostile but realistic run of the line found (issue 19), each case on the real thing:
`linegate run` / `check-config` / `watch` as processes, real ZeroMQ sockets, real ONNX Runtime.

Permission cases need a user that cannot read what root can: as root they run the command as
`nobody` (setpriv), with their files in a folder that user may enter."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import zmq
from onnx import TensorProto, helper

from conftest import edit_manifest, free_tcp_endpoint, linegate_cmd, make_tiny_bundle, write_grey_images
from edge.bundle import FORMAT_VERSION, write_manifest
from edge.publisher import Publisher
from edge.subscriber import Subscriber
from runtime_helpers import Collector, RunProcess, write_config


def _wait_log(run: RunProcess, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in run.log():
        assert run.proc.poll() is None, run.log()
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s:\n{run.log()}"
        time.sleep(0.05)


def _linegate(*args: str, timeout: float = 120, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = linegate_cmd(*args)
    env = dict(os.environ)
    if user is not None:
        import grp
        import pwd

        group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
        cmd = ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups", *cmd]
        env["HOME"] = "/tmp"
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


# -- 1. a second instance on a live ipc endpoint ---------------------------------------------------

def test_a_second_instance_refuses_a_live_ipc_endpoint_and_replaces_only_a_stale_one(tiny_bundle, tmp_path):
    sock_path = tmp_path / "bus.sock"
    endpoint = f"ipc://{sock_path}"
    config = write_config(tmp_path / "a.toml", {
        "engine": {"bundle": str(tiny_bundle)}, "publisher": {"endpoint": endpoint},
        "source": [{"uri": "synthetic:fps=20,size=64"}]})
    first = RunProcess(config, tmp_path / "first.log")
    try:
        _wait_log(first, "running:")
        second = _linegate("run", "--config", str(config), timeout=60)
        assert second.returncode == 3, second.stderr  # like a TCP port in use: a state that may pass
        assert f"another process (perhaps another linegate) serves {sock_path}" in second.stderr
        assert "Traceback" not in second.stderr
        # the first instance still owns the endpoint: a subscriber arriving now reaches it
        with Subscriber(endpoint) as sub:
            got = sub.recv(timeout_ms=20000)
        assert got is not None and got.header["model_id"] == "tiny-test"
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0, first.log()
    finally:
        first.kill()

    # a socket file nobody listens on (its process died without removing it): replaced, and said
    sock_path.unlink(missing_ok=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    write_grey_images(tmp_path / "parts", [30, 200])
    stale = _linegate("run", "--bundle", str(tiny_bundle), "--source", f"folder:{tmp_path / 'parts'}",
                      "--publish", endpoint)
    assert stale.returncode == 0, stale.stderr
    assert f"{sock_path}: a stale socket file" in stale.stderr and "done: 2 frames" in stale.stderr

    # anything else at the path is not ours to delete: a configuration error
    sock_path.unlink(missing_ok=True)
    sock_path.write_text("not a socket")
    other = _linegate("run", "--bundle", str(tiny_bundle), "--source", f"folder:{tmp_path / 'parts'}",
                      "--publish", endpoint)
    assert other.returncode == 2 and f"{sock_path} exists and is not a socket" in other.stderr
    config.write_text(config.read_text().replace("synthetic:fps=20,size=64", f"folder:{tmp_path / 'parts'}"))
    checked = _linegate("check-config", str(config))
    assert checked.returncode == 2 and f"{sock_path} exists and is not a socket" in checked.stderr
    assert sock_path.read_text() == "not a socket"


# -- 2. SIGHUP ----------------------------------------------------------------------------------------

def test_sighup_never_stops_the_run_nor_loses_a_decision(tiny_bundle, tmp_path):
    endpoint = free_tcp_endpoint()
    count = 60
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "publisher": {"endpoint": endpoint, "wait_subscribers": 1},
        "source": [{"uri": f"synthetic:count={count},fps=20,size=64"}]})
    sub = Collector(endpoint, topics=("decision",))
    sub.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        sub.wait_for(lambda: len(sub.decisions()) >= 5, 60, "5 decisions")
        run.proc.send_signal(signal.SIGHUP)  # systemctl reload
        _wait_log(run, "reload (sighup)")
        assert run.wait(timeout=60) == 0, run.log()  # the source ran to its end
        sub.wait_for(lambda: len(sub.decisions()) == count, 10, f"all {count} decisions")
    finally:
        run.kill()
        sub.stop()
    assert [d["frame_id"] for d in sub.decisions()] == list(range(count))
    assert f"done: {count} frames" in run.log()


# -- 3. an unreadable bundle --------------------------------------------------------------------------

@pytest.fixture()
def shared_dir():
    """A folder every user may enter (pytest's tmp_path is root's own when run as root)."""
    path = Path(tempfile.mkdtemp(prefix="linegate-harden-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _other_user() -> str | None:
    """Who to run as so that mode bits count: nobody when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot run the command as a user mode bits apply to")
    return "nobody"


@pytest.mark.parametrize("locked", ["model.onnx", ".", ".."])
def test_an_unreadable_bundle_is_a_configuration_error_naming_the_file_and_the_user(shared_dir, locked):
    user = _other_user()
    (shared_dir / "private").mkdir(mode=0o755)
    bundle = make_tiny_bundle(shared_dir / "private" / "bundle")
    write_grey_images(shared_dir / "parts", [30])
    for path in [shared_dir / "parts", *(shared_dir / "parts").iterdir(), bundle, *bundle.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    config = write_config(shared_dir / "c.toml", {
        "engine": {"bundle": str(bundle)}, "publisher": {"endpoint": "tcp://127.0.0.1:*"},
        "source": [{"uri": f"folder:{shared_dir / 'parts'}"}]})
    config.chmod(0o644)
    target = (bundle / locked).resolve()
    target.chmod(0o700 if target.is_dir() else 0o600)  # the owner's alone; the service user is another
    expected = str(target if locked != ".." else bundle)  # a folder above: the bundle, and who shuts it
    whom = user or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    for args in (("check-config", str(config)), ("run", "--config", str(config))):
        out = _linegate(*args, user=user, timeout=60)
        assert out.returncode == 2, (args, out.stderr)  # not 1 (a stop timeout), not restarted by systemd
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert f"{expected}: not readable by user {whom}" in lines[-1], out.stderr
        assert "key 'engine.bundle'" in lines[-1]
        if locked == "..":
            assert f"({target} does not let that user in)" in lines[-1]


# -- 4. a manifest that disagrees with its model --------------------------------------------------

@pytest.mark.parametrize("change, words", [
    (lambda m: m["input"].update(shape=[-1, 3, 16, 16]),
     "the manifest's input.shape is [-1, 3, 16, 16] but the model's 'pixels' is ['batch', 3, 32, 32]"),
    (lambda m: m["outputs"]["map"].update(name="heatmap"),
     "the manifest's outputs.map.name is 'heatmap' but the model's outputs are ['anomaly_map', 'score']"),
    (lambda m: m["outputs"]["map"].update(shape=[-1, 8, 8]),
     "the manifest's outputs.map.shape is [-1, 8, 8] but the model's 'anomaly_map' is ['batch', 16, 16]"),
])
def test_a_manifest_that_disagrees_with_its_model_is_refused_naming_both(tiny_bundle, tmp_path, change, words):
    edit_manifest(tiny_bundle, change)  # the model file is untouched: its checksum still holds
    write_grey_images(tmp_path / "parts", [30])
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(tiny_bundle)}, "publisher": {"endpoint": free_tcp_endpoint()},
        "source": [{"uri": f"folder:{tmp_path / 'parts'}"}]})
    for args in (("check-config", str(config)), ("run", "--config", str(config))):
        out = _linegate(*args, timeout=60)
        assert out.returncode == 2, (args, out.stderr)
        assert f"{tiny_bundle / 'model.onnx'} and {tiny_bundle / 'manifest.json'} disagree" in out.stderr
        assert words in out.stderr
        assert "running:" not in out.stderr  # refused before any frame


# -- 5. max_batch and memory ---------------------------------------------------------------------------

def test_warm_up_and_buffers_stop_at_the_batches_the_queue_can_form(tiny_bundle, tmp_path):
    write_grey_images(tmp_path / "parts", [30 + i for i in range(40)])
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "batching": {"max_batch": 1024, "queue_capacity": 8},  # the largest max_batch the config allows
        "publisher": {"endpoint": free_tcp_endpoint()},
        "source": [{"uri": f"folder:{tmp_path / 'parts'}"}]})
    out = _linegate("run", "--config", str(config), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "max_batch 1024 is more than the queue holds (queue_capacity 8): batches stop at 8" in out.stderr
    assert "engine warmed up at batch sizes 1-8 in" in out.stderr  # not 16, 32, ... 1024
    assert "done: 40 frames" in out.stderr


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/meminfo")


def test_a_max_batch_the_box_cannot_hold_is_refused_before_any_frame(tmp_path):
    # frames large enough that 1024 of them in the batch buffer, with 1024 more queued, need
    # twice the memory this box has free; the engine itself is only probed at 1 and 4 frames
    size = 512
    while 2 * 1024 * 3 * size * size * 4 < 2 * _mem_available():
        size *= 2
    bundle = make_tiny_bundle(tmp_path / "bundle", size=size)
    write_grey_images(tmp_path / "parts", [30])
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(bundle)},
        "batching": {"max_batch": 1024, "queue_capacity": 1024},
        "publisher": {"endpoint": free_tcp_endpoint()},
        "source": [{"uri": f"folder:{tmp_path / 'parts'}"}]})
    for args in (("check-config", str(config)), ("run", "--config", str(config))):
        out = _linegate(*args, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        assert "key 'batching.max_batch': max_batch 1024 needs about" in out.stderr
        found = re.search(r"needs about (\d+) MiB more .*; (\d+) MiB available on this box: it cannot fit; "
                          r"use max_batch <= (\d+)", out.stderr)
        assert found, out.stderr
        need, available, fits = map(int, found.groups())
        assert need > available and 1 <= fits < 1024
        assert "warming the engine up" not in out.stderr and "running:" not in out.stderr
    # the advice holds (at half the batch it names: other processes' memory moves meanwhile)
    smaller = max(1, fits // 2)
    config.write_text(config.read_text().replace("max_batch = 1024", f"max_batch = {smaller}")
                      .replace("queue_capacity = 1024", f"queue_capacity = {smaller}"))
    ok = _linegate("check-config", str(config), timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_a_bundle_the_box_cannot_hold_beside_the_running_one_is_refused_by_ctl_load(tiny_bundle, tmp_path):
    """The start's memory check, on a hot swap: a bundle whose max_batch cannot fit (probed at
    1 and 4 frames only) is refused before its warm-up would take the memory, and the running
    model goes on judging."""
    from control_helpers import start_line, wait_until
    from edge.control_api import ControlClient, ControlError

    size = 512
    while 2 * 1024 * 3 * size * size * 4 < 2 * _mem_available():  # batch buffer + queue, twice what is free
        size *= 2
    huge = make_tiny_bundle(tmp_path / "huge", size=size)
    run, col, endpoint, _ = start_line(tmp_path, tiny_bundle, [{"uri": "synthetic:fps=30,size=64", "id": "cam0"}],
                                       extra={"batching": {"max_batch": 1024, "queue_capacity": 1024}})
    client = ControlClient(endpoint)
    try:
        wait_until(lambda: len(col.decisions()) >= 5, 60, "first decisions")
        before = client.status()
        with pytest.raises(ControlError, match=r"with this bundle max_batch 1024 needs about \d+ MiB more .*"
                                               r"beside the model running now: it cannot fit; use "
                                               r"batching.max_batch <= \d+"):
            client.load(huge)
        assert client.status()["model_id"] == before["model_id"]
        seen = len(col.decisions())
        wait_until(lambda: len(col.decisions()) >= seen + 5, 30, "decisions after the refusal")
        assert "warm-up at batch size" not in run.log() and "keeps running" in run.log()
    finally:
        client.close()
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGTERM)
        code = run.wait(30)
        col.stop()
    assert code == 0, run.log()


# -- 6. SIGTERM during the warm-up ---------------------------------------------------------------------

def make_slow_bundle(path: Path, size: int = 128, channels: int = 64, layers: int = 4) -> Path:
    """A real ONNX bundle whose every frame costs a few GFLOP (stacked 3x3 convolutions), so
    that warming it up at batch 64 takes far longer than a stop timeout of 2 s."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, cin = [], [], "pixels", 3
    for i in range(layers):
        w = rng.normal(0, 0.05, (channels, cin, 3, 3)).astype(np.float32)
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.ravel()))
        nodes.append(helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev, cin = f"r{i}", channels
    nodes += [helper.make_node("ReduceMean", [prev, "axis1"], ["anomaly_map"], keepdims=0),
              helper.make_node("ReduceMean", ["anomaly_map", "axes12"], ["score"], keepdims=0)]
    inits += [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
              helper.make_tensor("axes12", TensorProto.INT64, [2], [1, 2])]
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path / "model.onnx")
    write_manifest(path, {
        "format_version": FORMAT_VERSION, "model_id": "slow-test", "detector": "slow",
        "input": {"name": "pixels", "shape": [-1, 3, size, size], "layout": "NCHW", "dtype": "float32",
                  "colour": "RGB", "resize": "stretch", "range": [0, 255],
                  "normalisation": {"where": "in_graph", "mean": 0.0, "std": 1.0}},
        "outputs": {"score": {"name": "score", "shape": [-1], "aggregate": "mean"},
                    "map": {"name": "anomaly_map", "shape": [-1, size, size]}},
        "decision": {"aggregate": "mean", "threshold": 1.0, "method": "youden",
                     "normalisation": {"min": 0.0, "max": 2.0}},
        "display_range": [0.0, 2.0], "classes": {"normal": "normal", "anomalous": ["bad"]},
        "files": {"model.onnx": {"kind": "onnx", "precision": "fp32"}}})
    return path


@pytest.mark.timeout(300)
def test_sigterm_during_the_warm_up_stops_at_once(tmp_path):
    bundle = make_slow_bundle(tmp_path / "bundle")
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(bundle)},
        "batching": {"max_batch": 64, "queue_capacity": 64},  # warm-up: 1-16, 32, 64 = 232 frames
        "publisher": {"endpoint": free_tcp_endpoint()},
        "service": {"stop_timeout_s": 2.0},
        "source": [{"uri": "synthetic:fps=5,size=64"}]})
    run = RunProcess(config, tmp_path / "run.log")
    try:
        _wait_log(run, "warming the engine up at batch sizes 1-16, 32, 64", timeout=120)
        run.proc.send_signal(signal.SIGTERM)
        # a hang guard, not a speed figure: the warm-up left takes minutes on this engine
        code = run.wait(timeout=60)
    finally:
        run.kill()
    log = run.log()
    assert code == 0, log
    assert "stopping (received SIGTERM) during the engine warm-up: no frame was read" in log
    assert "engine warmed up" not in log and "running:" not in log  # it did not wait for the warm-up


def test_sigterm_while_the_engine_loads_is_honoured_before_the_start(tiny_bundle, tmp_path):
    """The handlers are installed first thing: a SIGTERM while the bundle is checked and the
    engine loads (here: the memory probe of a large input) stops the run before it starts."""
    bundle = make_slow_bundle(tmp_path / "bundle", size=256)
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(bundle)}, "publisher": {"endpoint": free_tcp_endpoint()},
        "source": [{"uri": "synthetic:fps=5,size=64"}]})
    run = RunProcess(config, tmp_path / "run.log")
    try:
        _wait_log(run, "engine: ONNX Runtime", timeout=120)  # loaded; probing its memory now
        run.proc.send_signal(signal.SIGTERM)
        code = run.wait(timeout=120)
    finally:
        run.kill()
    log = run.log()
    assert code == 0, log  # not -15: the default handler would have killed it
    assert "received SIGTERM" in log and "running:" not in log


# -- weak cases: say what happened -------------------------------------------------------------------

def test_watch_says_publisher_restarted_and_counts_it_apart_from_gaps(tmp_path):
    endpoint = f"ipc://{tmp_path}/bus.sock"
    # each runtime with a context of its own, ended like a process ends: its listener is gone
    contexts = [zmq.Context(), zmq.Context()]
    first = Publisher(endpoint, context=contexts[0], run_id="a" * 32)
    watch = subprocess.Popen(linegate_cmd("watch", endpoint, "--count", "10", "--timeout", "60"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for run_id, pub, context in (("a" * 32, first, contexts[0]), ("b" * 32, None, contexts[1])):
            pub = pub or Publisher(endpoint, context=context, run_id=run_id)  # the runtime again: seq from 0
            assert pub.wait_for_subscribers(2, 30) >= 2  # watch: decision + stats
            for i in range(5):
                assert pub.publish("decision", {"camera_id": "cam0", "frame_id": i, "decision": "accept"})
            pub.close()
            context.term()  # waits for the linger: the 5 decisions are out
        out, err = watch.communicate(timeout=60)
    finally:
        watch.kill()
        first.close()
        for context in contexts:
            context.term()
    assert watch.returncode == 0, err
    assert len(out.splitlines()) == 10
    assert err.count("linegate watch: publisher restarted") == 1, err
    assert f"publisher restarted (new run_id {'b' * 32})" in err
    assert "the publisher restarted 1 time(s) (counted apart from missed messages)" in err
    assert "missed" not in err.replace("apart from missed messages", "")  # a restart is not a loss


def _make_keys(directory: Path, name: str) -> tuple[Path, Path]:
    from edge.auth import make_keypair

    return make_keypair(directory, name)


@pytest.mark.timeout(180)
def test_refused_curve_subscribers_are_logged_on_the_runtime_and_watch_says_why_it_hears_nothing(
        tiny_bundle, tmp_path):
    from edge.auth import load_public_key

    keys = tmp_path / "keys"
    server_public, server_secret = _make_keys(keys, "server")
    hmi_public, _ = _make_keys(keys, "hmi")
    _, stranger_secret = _make_keys(tmp_path / "elsewhere", "stranger")
    other_public, _ = _make_keys(tmp_path / "elsewhere", "notserver")
    allowed = keys / "allowed"
    allowed.mkdir()
    shutil.copy(hmi_public, allowed)
    endpoint = free_tcp_endpoint()
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "publisher": {"endpoint": endpoint,
                      "curve": {"secret_key": str(server_secret), "allowed_keys": str(allowed)}},
        "source": [{"uri": "synthetic:fps=20,size=64"}]})
    run = RunProcess(config, tmp_path / "run.log")
    try:
        _wait_log(run, "running:")
        attempts = {
            "stranger": ("--server-key", str(server_public), "--client-key", str(stranger_secret)),
            "stranger again": ("--server-key", str(server_public), "--client-key", str(stranger_secret)),
            "wrong server key": ("--server-key", str(other_public), "--client-key", str(stranger_secret)),
            "plain": (),
        }
        stranger_key = load_public_key(stranger_secret).decode()
        said = {"stranger": stranger_key, "stranger again": stranger_key,
                "wrong server key": "wrong server public key for this publisher",
                "plain": "a subscriber without CURVE (plain) tried to connect"}
        outs = {}
        for name, args in attempts.items():
            # A plain client also sees the mismatch and hangs up, without retrying; when it hangs
            # up before the runtime reads its greeting, the runtime logs a hang-up instead (CI saw
            # it once): three tries make the mismatch line itself all but certain.
            for _ in range(3 if name == "plain" else 1):
                outs[name] = _linegate("watch", endpoint, "--count", "1", "--timeout", "3", *args, timeout=60)
                try:
                    _wait_log(run, said[name], timeout=10 if name == "plain" else 30)
                    break  # the runtime's log says who it refused
                except AssertionError:
                    assert name == "plain" and "hung up during the handshake" in run.log(), run.log()
            assert said[name] in run.log(), run.log()
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 0, run.log()
    finally:
        run.kill()
    for name, out in outs.items():
        assert out.returncode == 1 and out.stdout == "", (name, out.stderr)
        assert f"no message in 3 s from {endpoint}: wrong key or wrong endpoint?" in out.stderr, (name, out.stderr)
    log = run.log()
    refused = [line for line in log.splitlines() if stranger_key in line]
    # it tried twice; the log says it once (rate-limited per key), with the key and the folder
    assert len(refused) == 1, log
    assert f"refused a subscriber whose public key {stranger_key} is not in the allow-list {allowed}" in refused[0]
    assert log.count("a subscriber without CURVE (plain) tried to connect") == 1, log
    assert log.count("wrong server public key for this publisher") == 1, log


def test_a_handshake_failure_is_told_apart_from_a_broken_connection():
    import errno

    import zmq

    from edge.auth import HandshakeMonitor

    mismatch = HandshakeMonitor.reason(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                                       zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
    assert mismatch.startswith("a subscriber without CURVE (plain) tried to connect")
    other = HandshakeMonitor.reason(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, 0x10000001)
    assert other == "a subscriber's handshake failed (ZeroMQ protocol error 0x10000001)"
    # a NO_DETAIL event carries an errno, not a protocol code: it is named as such
    broken = HandshakeMonitor.reason(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE)
    assert "hung up during the handshake (Broken pipe)" in broken and "--server-key" in broken
    assert "protocol error" not in broken


@pytest.mark.parametrize("change, key, words", [
    ({"decision": {"aggregate": "max"}}, "decision.aggregate", "give a threshold too"),
    ({"publisher": {"endpoint": "tcp://127.0.0.1"}}, "publisher.endpoint", "has no port"),
    ({"publisher": {"endpoint": "tcp://127.0.0.1:99999"}}, "publisher.endpoint",
     "port '99999' is not a port number (1-65535"),
    ({"publisher": {"endpoint": "tcp://127.0.0.1:0"}}, "publisher.endpoint", "port '0' is not a port number"),
    ({"publisher": {"endpoint": "ipc:///nonexistent-linegate/bus.sock"}}, "publisher.endpoint",
     "folder /nonexistent-linegate does not exist"),
    ({"publisher": {"endpoint": "udp://127.0.0.1:5556"}}, "publisher.endpoint", "binds tcp:// or ipc://"),
    ({"publisher": {"endpoint": "tcp://192.0.2.1:5556"}}, "publisher.endpoint",  # TEST-NET-1: nobody's
     "192.0.2.1 is not an address of this box"),
    ({"engine": {"kind": "tensorrt"}}, "engine.kind", "the bundle has no TensorRT engine"),
    ({"engine": {"precision": "fp16"}}, "engine.precision", "the bundle has no fp16 ONNX model"),
    ({"engine": {"threads": 100000}}, "engine.threads", "the cores this process may use on this box"),
])
def test_check_config_refuses_what_run_refuses_before_reading_a_frame(tiny_bundle, tmp_path, change, key, words):
    write_grey_images(tmp_path / "parts", [30])
    config = {"engine": {"bundle": str(tiny_bundle)}, "publisher": {"endpoint": free_tcp_endpoint()},
              "source": [{"uri": f"folder:{tmp_path / 'parts'}"}]}
    for section, values in change.items():
        config.setdefault(section, {}).update(values)
    path = write_config(tmp_path / "c.toml", config)
    for args in (("check-config", str(path)), ("run", "--config", str(path))):
        out = _linegate(*args, timeout=60)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert f"key '{key}'" in out.stderr and words in out.stderr, (args, out.stderr)
        assert "running:" not in out.stderr


@pytest.mark.parametrize("locked", ["publisher.curve.allowed_keys", "control.reader_keys"])
def test_an_unreadable_key_folder_is_named_with_the_user(shared_dir, locked):
    user = _other_user()
    _, server_secret = _make_keys(shared_dir / "keys", "server")
    hmi_public, _ = _make_keys(shared_dir / "keys", "hmi")
    recorder_public, _ = _make_keys(shared_dir / "keys", "recorder")
    allowed, readers = shared_dir / "allowed", shared_dir / "readers"
    for folder, public in ((allowed, hmi_public), (readers, recorder_public)):
        folder.mkdir()
        shutil.copy(public, folder)
    bundle = make_tiny_bundle(shared_dir / "bundle")
    write_grey_images(shared_dir / "parts", [30])
    for path in [shared_dir / "keys", shared_dir / "parts", *(shared_dir / "parts").iterdir(), bundle,
                 *bundle.iterdir(), allowed]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if user is not None:  # the service user owns its secret key
        os.chown(server_secret, pwd_uid(user), -1)
    locked_folder = allowed if locked == "publisher.curve.allowed_keys" else readers
    locked_folder.chmod(0o700)  # but not this folder (the other one is readable)
    raw = {"engine": {"bundle": str(bundle)},
           "publisher": {"endpoint": "tcp://127.0.0.1:*",
                         "curve": {"secret_key": str(server_secret), "allowed_keys": str(allowed)}},
           "source": [{"uri": f"folder:{shared_dir / 'parts'}"}]}
    if locked == "control.reader_keys":
        raw["control"] = {"endpoint": "tcp://127.0.0.1:5557", "allowed_keys": str(allowed),
                          "reader_keys": str(readers)}
    config = write_config(shared_dir / "c.toml", raw)
    config.chmod(0o644)
    whom = user or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    out = _linegate("check-config", str(config), user=user, timeout=60)
    assert out.returncode == 2, out.stderr
    assert f"key '{locked}': {locked_folder}: not readable by user {whom}" in out.stderr, out.stderr
    assert "no *.key files" not in out.stderr


def pwd_uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def test_a_dangling_symlink_in_a_folder_source_gets_an_error_decision(tiny_bundle, tmp_path):
    write_grey_images(tmp_path / "parts", [30, 40])  # part000.png, part001.png
    (tmp_path / "parts" / "part000b.png").symlink_to(tmp_path / "gone.png")  # between the two
    endpoint = free_tcp_endpoint()
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(tiny_bundle)}, "publisher": {"endpoint": endpoint, "wait_subscribers": 1},
        "source": [{"uri": f"folder:{tmp_path / 'parts'}"}]})
    sub = Collector(endpoint, topics=("decision",))
    sub.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        assert run.wait(timeout=60) == 0, run.log()
        sub.wait_for(lambda: len(sub.decisions()) == 3, 10, "3 decisions")
    finally:
        run.kill()
        sub.stop()
    decisions = sub.decisions()
    assert [d["source"] for d in decisions] == ["part000.png", "part000b.png", "part001.png"]
    assert [d["decision"] for d in decisions] == ["accept", "error", "accept"]
    assert "part000b.png" in decisions[1]["error"] and "No such file" in decisions[1]["error"]
    assert "done: 3 frames, 0 rejects, 1 errors" in run.log()


@pytest.mark.timeout(180)
def test_nodrop_counts_and_reports_what_a_stalled_subscriber_cost_everyone(tiny_bundle, tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    (tmp_path / "parts").mkdir()
    for i in range(200):  # noise: overlays that do not compress, so a stalled queue fills fast
        cv2.imwrite(str(tmp_path / "parts" / f"p{i:03d}.png"), rng.integers(0, 100, (120, 160, 3), np.uint8))
    endpoint = f"ipc://{tmp_path}/bus.sock"
    config = write_config(tmp_path / "c.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "overlay": {"accepts_every": 1},
        "publisher": {"endpoint": endpoint, "nodrop": True, "sndhwm": 10, "wait_subscribers": 3},
        "source": [{"uri": f"folder:{tmp_path / 'parts'}"}]})
    stalled = Subscriber(endpoint, topics=("",), rcvhwm=1)  # subscribes to everything, never reads
    healthy = Collector(endpoint, topics=("decision", "stats"))
    healthy.start()
    run = RunProcess(config, tmp_path / "run.log")
    try:
        assert run.wait(timeout=120) == 0, run.log()
        time.sleep(1.0)  # what the healthy one still has on its way
    finally:
        run.kill()
        healthy.stop()
        stalled.close()
    log = run.log()
    found = re.search(r"the publisher refused (\d+) message\(s\) \(([^)]*)\): a subscriber's queue was full "
                      r"\(nodrop\), so no subscriber got them", log)
    assert found, log
    refused = dict((topic, int(n)) for n, topic in (part.split() for part in found.group(2).split(", ")))
    assert refused.get("decision", 0) > 0
    # what the healthy subscriber lost (a stalled queue blocks every later message: no later
    # seq shows it as a gap) is exactly what the summary reports
    assert len(healthy.decisions()) + refused["decision"] == 200
