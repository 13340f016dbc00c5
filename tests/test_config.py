"""The TOML config: validation messages that name the file and the key, `linegate check-config`,
flags over the file, the example config in systemd/, and `linegate keys`."""
from __future__ import annotations

import stat
import subprocess

import pytest
import zmq.auth

from conftest import REPO, free_tcp_endpoint, linegate_cmd, write_grey_images
from edge.config import ConfigError, check_files, load_config
from runtime_helpers import toml_text

EXAMPLE = REPO / "systemd" / "linegate.toml"


def good(bundle, **sections) -> dict:
    config = {"engine": {"bundle": str(bundle)}, "source": [{"uri": "synthetic:count=3"}]}
    config.update(sections)
    return config


def test_example_config_is_valid_and_passes_check_config_with_a_real_bundle(tiny_bundle, tmp_path):
    config = load_config(EXAMPLE)
    assert [s.id for s in config.sources] == ["cam0", "cam1"]
    assert config.sources[0].policy == "latest" and config.publisher.endpoint == "tcp://*:5556"
    assert config.service.stop_timeout_s == 10.0
    # the same file, pointing at a bundle that exists here
    copy = tmp_path / "linegate.toml"
    copy.write_text(EXAMPLE.read_text().replace("/var/lib/linegate/bundle", str(tiny_bundle)))
    out = subprocess.run(linegate_cmd("check-config", str(copy)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{copy}: ok" in out.stdout
    assert "model tiny-test" in out.stdout and "source cam1: rtsp://" in out.stdout


def test_defaults_and_values(tiny_bundle, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(toml_text(good(tiny_bundle, batching={"max_wait_ms": 2}, source=[
        {"uri": "synthetic", "roi": [2, 4, 20, 10], "size": [64, 48], "policy": "queue"},
        {"id": "line2", "uri": "camera:0", "backoff_s": 0.2, "backoff_max_s": 1, "reopen_after_s": 30}])))
    config = load_config(path)
    assert config.batching.max_batch == 8 and config.batching.max_wait_ms == 2.0
    assert config.engine.spin_between_calls is False  # ONNX Runtime's threads stop when a call returns
    assert isinstance(config.batching.max_wait_ms, float)  # an integer is fine where a number goes
    assert [s.id for s in config.sources] == ["cam0", "line2"]
    sources = check_files(config).sources
    assert sources[0].roi == (2, 4, 20, 10) and sources[0].expect_size == (64, 48)
    assert sources[0].policy == "queue" and sources[1].policy is None
    assert sources[1].backoff_s == 0.2 and sources[1].backoff_max_s == 1.0
    assert sources[1].reopen_after_s == 30.0


BAD = [
    # (what to change, the key the message must name, words it must hold)
    ({"batching": {"max_btach": 4}}, "key 'batching.max_btach'", ["unknown key", "did you mean 'max_batch'"]),
    ({"batching": {"max_batch": "8"}}, "key 'batching.max_batch'", ["should be an integer", "string '8'"]),
    ({"batching": {"max_batch": 0}}, "key 'batching.max_batch'", ["must be >= 1", "got 0"]),
    ({"batching": {"max_batch": True}}, "key 'batching.max_batch'", ["should be an integer", "boolean"]),
    ({"batching": {"max_wait_ms": -1.0}}, "key 'batching.max_wait_ms'", ["must be >= 0"]),
    ({"publisher": {"endpoint": "localhost:5556"}}, "key 'publisher.endpoint'", ["not a ZeroMQ endpoint"]),
    ({"publisher": {"nodrop": "yes"}}, "key 'publisher.nodrop'", ["true or false"]),
    ({"engine": {"bundle": "/b", "spin_between_calls": 1}}, "key 'engine.spin_between_calls'", ["true or false"]),
    ({"publisher": {"curve": {"secret_key": "/k"}}}, "key 'publisher.curve.allowed_keys'", ["missing"]),
    ({"overlay": {"jpeg_quality": 101}}, "key 'overlay.jpeg_quality'", ["<= 100"]),
    ({"decision": {"aggregate": "median"}}, "key 'decision.aggregate'", ["mean, max or topk:P"]),
    ({"engine": {"bundle": "/b", "kind": "cuda"}}, "key 'engine.kind'", ["auto, onnxruntime, tensorrt"]),
    ({"logging": {"level": "loud"}}, "key 'logging.level'", ["debug, info"]),
    ({"servce": {}}, "key 'servce'", ["unknown section", "did you mean 'service'"]),
    ({"engine": {}}, "key 'engine.bundle'", ["missing; it is required"]),
    ({"source": []}, "[[source]]", ["no sources"]),
    ({"source": [{"id": "x"}]}, "[[source]] #1, key 'uri'", ["missing"]),
    ({"source": [{"uri": "camera:0", "policy": "newest"}]}, "[[source]] #1, key 'policy'", ["queue, latest"]),
    ({"source": [{"uri": "synthetic"}, {"uri": "camera:0", "roi": [0, 0, 10]}]}, "[[source]] #2, key 'roi'",
     ["array of 4 integers"]),
    ({"source": [{"uri": "camera:0", "roi": [0, 0, 0, 10]}]}, "[[source]] #1, key 'roi'", ["width, height >= 1"]),
    ({"source": [{"uri": "camera:0", "roi": [0, 0, 100, 10], "size": [64, 48]}]}, "[[source]] #1, key 'roi'",
     ["does not fit"]),
    ({"source": [{"uri": "camera:0", "backoff_s": 2.0, "backoff_max_s": 1.0}]},
     "[[source]] #1, key 'backoff_max_s'", [">= backoff_s"]),
    ({"source": [{"uri": "synthetic"}, {"uri": "camera:0", "id": "cam0"}]}, "[[source]] #2, key 'id'",
     ["already used"]),
]


@pytest.mark.parametrize("change, key, words", BAD, ids=[b[1] + " " + b[2][0] for b in BAD])
def test_bad_values_name_the_file_and_the_key(tiny_bundle, tmp_path, change, key, words):
    path = tmp_path / "linegate.toml"
    path.write_text(toml_text(good(tiny_bundle, **change)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("text, words", [
    ("[engine]\nbundle = '/b'\nmax_batch = \n", ["not valid TOML", "line 3"]),
    ("[engine\nbundle = '/b'\n", ["not valid TOML", "line 1"]),
    ("source = 'camera:0'\n[engine]\nbundle = '/b'\n", ["key 'source'", "[[source]] tables"]),
])
def test_malformed_toml(tmp_path, text, words):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    for word in words:
        assert word in str(info.value)


def test_check_config_cli_reports_bad_files_clearly(tiny_bundle, tmp_path):
    def check(config: dict) -> subprocess.CompletedProcess:
        path = tmp_path / "linegate.toml"
        path.write_text(toml_text(config))
        return subprocess.run(linegate_cmd("check-config", str(path)), capture_output=True, text=True, timeout=60)

    out = check(good(tiny_bundle, batching={"max_batch": -2}))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{tmp_path / 'linegate.toml'}: key 'batching.max_batch': must be >= 1" in out.stderr
    out = check(good(tiny_bundle, decision={"threshold": float("inf")}))  # TOML's inf: never rejects
    assert out.returncode == 2 and "key 'decision.threshold': must be a finite number, not inf" in out.stderr
    out = check(good(tiny_bundle, source=[{"uri": f"folder:{tmp_path / 'nowhere'}"}]))
    assert out.returncode == 2 and "[[source]] #1, key 'uri'" in out.stderr and "nowhere" in out.stderr
    out = check(good(tiny_bundle, publisher={"curve": {"secret_key": str(tmp_path / "none.key_secret"),
                                                       "allowed_keys": str(tmp_path)}}))
    assert out.returncode == 2 and "key 'publisher.curve.secret_key'" in out.stderr and "linegate keys" in out.stderr
    # a bundle whose model file does not match its checksum
    with open(tiny_bundle / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    out = check(good(tiny_bundle))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "key 'engine.bundle'" in out.stderr and "model.onnx: sha256 does not match the manifest" in out.stderr


def test_run_refuses_a_bad_config_before_starting_anything(tiny_bundle, tmp_path):
    endpoint = free_tcp_endpoint()
    path = tmp_path / "linegate.toml"
    path.write_text(toml_text(good(tiny_bundle, publisher={"endpoint": endpoint},
                                   source=[{"uri": "synthetic", "polcy": "queue"}])))
    out = subprocess.run(linegate_cmd("run", "--config", str(path)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{path}: [[source]] #1, key 'polcy': unknown key; did you mean 'policy'?" in out.stderr
    assert "running:" not in out.stderr and "publishing on" not in out.stderr


def _control_curve(tiny_bundle, tmp_path, readers: dict[str, str] | None) -> dict:
    """A config with CURVE and a control endpoint: operator.key in the operators' folder and,
    unless readers is None, a reader folder with these files (name -> whose key)."""
    from edge.auth import make_keypair

    keys = tmp_path / "keys"
    for name in ("server", "operator", "recorder"):
        make_keypair(keys, name)
    (tmp_path / "operators").mkdir()
    (tmp_path / "operators" / "operator.key").write_text((keys / "operator.key").read_text())
    control = {"endpoint": "tcp://127.0.0.1:5557", "allowed_keys": str(tmp_path / "operators")}
    if readers is not None:
        (tmp_path / "readers").mkdir()
        for file, whose in readers.items():
            (tmp_path / "readers" / file).write_text((keys / f"{whose}.key").read_text())
        control["reader_keys"] = str(tmp_path / "readers")
    return good(tiny_bundle, publisher={"curve": {"secret_key": str(keys / "server.key_secret"),
                                                  "allowed_keys": str(tmp_path / "operators")}}, control=control)


@pytest.mark.parametrize("readers, lines", [
    (None, ["(CURVE, 1 operator key(s), 0 reader key(s); replay"]),
    ({"recorder.key": "recorder"}, ["(CURVE, 1 operator key(s), 1 reader key(s); replay",
                                    "control reader keys: {readers}, 1 reader key(s) (may only run status, replay)"]),
    ({"operator.key": "operator"}, ["(CURVE, 1 operator key(s), 0 reader key(s); replay",  # in both: an operator
                                    "control: {operators}/operator.key is in both lists (as {readers}/operator.key)"]),
])
def test_control_reader_keys_are_counted_and_a_key_in_both_folders_is_an_operator(tiny_bundle, tmp_path, readers,
                                                                                    lines):
    path = tmp_path / "linegate.toml"
    path.write_text(toml_text(_control_curve(tiny_bundle, tmp_path, readers)))
    text = "\n".join(check_files(load_config(path)).lines)
    for line in lines:
        assert line.format(readers=tmp_path / "readers", operators=tmp_path / "operators") in text, text


@pytest.mark.parametrize("readers, words", [
    ("missing", ["{readers}: not a directory"]),
    ({}, ["{readers}: no *.key files"]),
    ({"operator.key": "recorder"}, ["{operators}/operator.key and {readers}/operator.key are two different keys "
                                    "with one name ('operator')", "rename one"]),
])
def test_control_reader_keys_folder_errors_name_the_key_and_the_files(tiny_bundle, tmp_path, readers, words):
    config = _control_curve(tiny_bundle, tmp_path, None if readers == "missing" else readers)
    config["control"]["reader_keys"] = str(tmp_path / "readers")
    path = tmp_path / "linegate.toml"
    path.write_text(toml_text(config))
    with pytest.raises(ConfigError) as info:
        check_files(load_config(path))
    assert str(info.value).startswith(f"{path}: key 'control.reader_keys': ")
    for word in words:
        assert word.format(readers=tmp_path / "readers", operators=tmp_path / "operators") in str(info.value)


def test_run_and_check_config_refuse_one_name_for_two_control_keys(tiny_bundle, tmp_path):
    path = tmp_path / "linegate.toml"
    config = _control_curve(tiny_bundle, tmp_path, {"operator.key": "recorder"})
    config["publisher"]["endpoint"] = free_tcp_endpoint()
    path.write_text(toml_text(config))
    for args in (("check-config", str(path)), ("run", "--config", str(path))):
        out = subprocess.run(linegate_cmd(*args), capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert (f"key 'control.reader_keys': {tmp_path / 'operators' / 'operator.key'} and "
                f"{tmp_path / 'readers' / 'operator.key'} are two different keys") in out.stderr
        assert "publishing on" not in out.stderr


def test_flags_override_the_file_and_are_named_in_messages(tiny_bundle, tmp_path):
    write_grey_images(tmp_path / "parts", [10, 250])
    path = tmp_path / "linegate.toml"
    path.write_text(toml_text(good(tiny_bundle, batching={"max_batch": 4})))
    out = subprocess.run(linegate_cmd("run", "--config", str(path), "--max-batch", "0"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"{path} (with command-line overrides): key 'batching.max_batch': must be >= 1" in out.stderr
    out = subprocess.run(linegate_cmd("run", "--bundle", str(tiny_bundle), "--source", "synthetic:count=2",
                                      "--max-wait-ms", "-5"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "command line: --max-wait-ms (batching.max_wait_ms): must be >= 0" in out.stderr
    out = subprocess.run(linegate_cmd("run", "--source", "synthetic"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--config FILE.toml, or --bundle DIR" in out.stderr
    # a flag really replaces the file's value: --source replaces the [[source]] tables
    out = subprocess.run(linegate_cmd("run", "--config", str(path), "--source", f"folder:{tmp_path / 'parts'}",
                                      "--publish", free_tcp_endpoint()), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "done: 2 frames, 1 rejects" in out.stderr


def test_keys_makes_a_pair_that_zeromq_loads(tmp_path):
    out = subprocess.run(linegate_cmd("keys", str(tmp_path / "keys"), "--name", "hmi"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "keys" / "hmi.key", tmp_path / "keys" / "hmi.key_secret"
    pub_key, none = zmq.auth.load_certificate(public)
    assert none is None and len(pub_key) == 40 and pub_key.decode() in out.stdout
    assert zmq.auth.load_certificate(secret)[0] == pub_key
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    again = subprocess.run(linegate_cmd("keys", str(tmp_path / "keys"), "--name", "hmi"),
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "hmi.key exists" in again.stderr
