"""CURVE with pyzmq's own auth: `linegate run` publishes to allow-listed subscriber keys only.
Keys come from `linegate keys`; the allowed subscriber is `linegate watch --server-key
--client-key`; a subscriber with an unknown key and one without CURVE receive nothing."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess

import pytest

from conftest import free_tcp_endpoint, linegate_cmd
from edge.auth import CurveClient, CurveServer
from edge.publisher import Publisher
from edge.subscriber import Subscriber
from runtime_helpers import RunProcess, write_config


def make_keys(directory, name):
    out = subprocess.run(linegate_cmd("keys", str(directory), "--name", name), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def test_curve_allowed_subscriber_receives_unknown_key_and_plain_receive_nothing(tiny_bundle, tmp_path):
    keys = tmp_path / "keys"
    server_public, server_secret = make_keys(keys, "server")
    hmi_public, hmi_secret = make_keys(keys, "hmi")
    _, stranger_secret = make_keys(tmp_path / "elsewhere", "stranger")
    allowed = keys / "allowed"
    allowed.mkdir()
    shutil.copy(hmi_public, allowed)  # only the HMI's public key is on the allow-list
    endpoint = free_tcp_endpoint()
    config = write_config(tmp_path / "linegate.toml", {
        "engine": {"bundle": str(tiny_bundle)},
        "publisher": {"endpoint": endpoint, "wait_subscribers": 1,
                      "curve": {"secret_key": str(server_secret), "allowed_keys": str(allowed)}},
        "source": [{"uri": "synthetic:fps=40,size=64"}],
    })
    stranger = Subscriber(endpoint, curve=CurveClient.load(server_public, stranger_secret))
    plain = Subscriber(endpoint)
    run = RunProcess(config, tmp_path / "run.log")
    try:
        watch = subprocess.run(linegate_cmd("watch", endpoint, "--json", "--count", "20", "--timeout", "60",
                                            "--server-key", str(server_public), "--client-key", str(hmi_secret)),
                               capture_output=True, text=True, timeout=90)
        # the run kept publishing all along; the others have been connected since before it began
        stranger_got = [stranger.recv(timeout_ms=1000)] + [stranger.recv(timeout_ms=0) for _ in range(50)]
        plain_got = [plain.recv(timeout_ms=100)] + [plain.recv(timeout_ms=0) for _ in range(50)]
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(timeout=20) == 0, run.log()
    finally:
        run.kill()
        stranger.close()
        plain.close()
    assert watch.returncode == 0, watch.stderr
    decisions = [json.loads(line) for line in watch.stdout.splitlines()]
    assert len(decisions) == 20 and all(d["model_id"] == "tiny-test" for d in decisions)
    assert [d["seq"] for d in decisions] == list(range(decisions[0]["seq"], decisions[0]["seq"] + 20))
    assert stranger_got == [None] * 51 and plain_got == [None] * 51
    assert "CURVE on: 1 allowed subscriber key(s)" in run.log()


def test_curve_publisher_and_subscriber_library(tmp_path):
    server_public, server_secret = make_keys(tmp_path / "k", "server")
    client_public, client_secret = make_keys(tmp_path / "k", "client")
    (tmp_path / "allowed").mkdir()
    shutil.copy(client_public, tmp_path / "allowed")
    curve = CurveServer(server_secret, tmp_path / "allowed")
    with Publisher("tcp://127.0.0.1:*", curve=curve) as pub, \
            Subscriber(pub.endpoint, curve=CurveClient.load(server_public.read_text().split('"')[1],
                                                           client_secret)) as sub:  # Z85 text works too
        assert pub.wait_for_subscribers(1, 10) == 1
        for i in range(5):
            pub.publish("decision", {"frame_id": i})
        got = [sub.recv(timeout_ms=2000) for _ in range(5)]
    assert [m.header["frame_id"] for m in got] == list(range(5))


def test_curve_key_errors_are_clear(tmp_path):
    server_public, server_secret = make_keys(tmp_path / "k", "server")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.key files"):
        Publisher("tcp://127.0.0.1:*", curve=CurveServer(server_secret, tmp_path / "empty"))
    with pytest.raises(ValueError, match="holds only a public key; give the matching .key_secret"):
        CurveServer(server_public, tmp_path / "k").validate()
    with pytest.raises(ValueError, match="both --server-key"):
        from lineside.watch import watch

        watch("tcp://127.0.0.1:1", server_key=str(server_public))
    with pytest.raises(ValueError, match="missing.key: no such key file"):
        CurveClient.load(tmp_path / "missing.key", server_secret)


@pytest.mark.timeout(60)  # a ZAP thread left behind made the publisher's context block forever
def test_damaged_or_unreadable_key_files_are_named_and_leave_nothing_running(tmp_path):
    import os
    import threading

    server_public, server_secret = make_keys(tmp_path / "k", "server")
    client_public, _ = make_keys(tmp_path / "c", "client")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "client.key").write_bytes(client_public.read_bytes())
    assert os.stat(server_secret).st_mode & 0o777 == 0o600

    # one character too many in the secret key line: refused when read, naming the file
    damaged = tmp_path / "damaged.key_secret"
    damaged.write_text(server_secret.read_text().replace('secret-key = "', 'secret-key = "x'))
    threads = threading.active_count()
    with pytest.raises(ValueError, match=r"damaged.key_secret: its secret key is not 40 Z85 characters"):
        Publisher("tcp://127.0.0.1:*", curve=CurveServer(damaged, allowed))
    assert threading.active_count() == threads  # no ZAP thread left behind

    # a dangling link in the allow-list: a ValueError naming it (pyzmq raises a bare OSError)
    (allowed / "gone.key").symlink_to(tmp_path / "nowhere.key")
    with pytest.raises(ValueError, match="gone.key: not a ZeroMQ certificate"):
        CurveServer(server_secret, allowed).validate()
    (allowed / "gone.key").unlink()

    if os.geteuid() != 0:  # root reads any file: the permission case needs another user
        server_secret.chmod(0)
        with pytest.raises(ValueError, match="not readable by user"):
            CurveServer(server_secret, allowed).validate()
