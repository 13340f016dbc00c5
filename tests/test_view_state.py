"""The view's live state and its users file, without a browser: the last-hour window and the
chart move with the clock, a new run_id counts as a restart, pause and resume come from the
event topic, and a bad users file is refused with the key and what to do."""
from __future__ import annotations

import pytest

from lineside.view.auth import Users, check_password, hash_password
from lineside.view.state import HOUR_S, LiveState


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def decision(decision: str, camera: str = "cam0", run_id: str = "r1", **extra) -> dict:
    return {"v": 1, "topic": "decision", "camera_id": camera, "decision": decision, "score": 0.5,
            "threshold": 0.4, "model_id": "m1", "run_id": run_id, **extra}


def test_counts_since_start_and_in_the_last_hour():
    clock = Clock()
    state = LiveState(clock=clock)
    for i in range(10):
        state.on_message("decision", decision("reject" if i % 5 == 0 else "accept"), None)
    clock.t += HOUR_S - 30  # 59.5 minutes later: still in the hour
    state.on_message("decision", decision("reject", camera="cam1"), None)
    snap = state.snapshot()
    assert (snap["parts"], snap["rejects"]) == (11, 3)
    assert (snap["hour"]["parts"], snap["hour"]["rejects"]) == (11, 3)
    assert snap["cameras"]["cam1"]["rejects"] == 1 and snap["cameras"]["cam0"]["parts"] == 10
    clock.t += 60  # the first ten are now more than an hour old
    snap = state.snapshot()
    assert (snap["parts"], snap["rejects"]) == (11, 3)
    assert (snap["hour"]["parts"], snap["hour"]["rejects"]) == (1, 1)
    assert snap["hour"]["reject_rate"] == 1.0
    chart = snap["chart"]
    assert sum(b[1] for b in chart["buckets"]) == 1  # the chart shows the last hour only
    assert len(chart["buckets"]) <= 60


def test_chart_buckets_sum_to_the_counts_of_a_short_run():
    clock = Clock()
    state = LiveState(clock=clock)
    for second in range(30):
        for i in range(4):
            state.on_message("decision", decision("reject" if i == 0 else "accept"), None)
        clock.t += 1
    buckets = state.snapshot()["chart"]["buckets"]
    assert sum(b[1] for b in buckets) == 120 and sum(b[2] for b in buckets) == 30
    assert all(b[2] / b[1] == 0.25 for b in buckets if b[1])


def test_quiet_paused_restart_and_error_scores():
    clock = Clock()
    state = LiveState(quiet_after_s=5, clock=clock)
    assert state.snapshot()["quiet"]  # nothing yet
    state.on_message("decision", decision("error", score=float("nan")), None)
    snap = state.snapshot()
    assert not snap["quiet"] and snap["errors"] == 1
    assert snap["cameras"]["cam0"]["last"]["score"] is None  # NaN is not JSON
    state.on_message("event", {"what": "pause", "who": "local (for alice)", "seq": 0}, None)
    assert state.snapshot()["paused"] is True
    state.on_message("event", {"what": "resume", "who": "local (for alice)", "seq": 1}, None)
    assert state.snapshot()["paused"] is False
    assert [e["what"] for e in state.snapshot()["events"]] == ["resume", "pause"]
    state.on_message("decision", decision("accept", run_id="r2"), None)
    assert state.snapshot()["restarts"] == 1
    state.on_message("stats", {"paused": False, "cameras": {"cam0": {"state": "stalled", "fps": 0.0,
                                                                       "frame_age_s": 12.5, "decisions": 3}},
                               "latency_ms": {"end_to_end": {"n": 9, "p50": 4.2, "p99": 9.9}}}, None)
    snap = state.snapshot()
    assert snap["health"]["cam0"]["state"] == "stalled" and snap["health"]["cam0"]["frame_age_s"] == 12.5
    assert (snap["latency_ms"]["p50"], snap["latency_ms"]["p99"]) == (4.2, 9.9)
    clock.t += 6
    assert state.snapshot()["quiet"]


def test_overlays_keep_only_the_newest_picture_per_camera():
    state = LiveState()
    for i in range(5):
        state.on_message("overlay", decision("reject", frame_id=i), f"jpeg{i}".encode())
    version, jpeg, header = state.overlay("cam0")
    assert (version, jpeg, header["frame_id"]) == (5, b"jpeg4", 4)


def test_users_file(tmp_path):
    stored = hash_password("s3cret", 1000)
    assert check_password("s3cret", stored) and not check_password("s3cre", stored)
    good = tmp_path / "users.toml"
    good.write_text(f'anonymous = "none"\n[[user]]\nname = "alice"\nrole = "operator"\npassword = "{stored}"\n'
                    '[[user]]\nname = "hmi"\ntoken = "0123456789abcdefXYZ"\n')
    users = Users.load(good)
    assert users.anonymous is None
    assert users.by_password("alice", "s3cret").operator
    assert users.by_password("alice", "wrong") is None and users.by_password("bob", "s3cret") is None
    assert users.by_token("0123456789abcdefXYZ").role == "viewer"  # the default role
    assert users.by_token("0123456789abcdefXY") is None
    sid = users.open_session(users.by_token("0123456789abcdefXYZ"))
    assert users.by_session(sid).name == "hmi"
    users.close_session(sid)
    assert users.by_session(sid) is None
    for text, says in (('[[user]]\nname = "a"\npassword = "plain"\n', "linegate view --hash-password"),
                       ('[[user]]\nname = "a"\nrole = "admin"\ntoken = "0123456789abcdefXYZ"\n', "role = 'admin'"),
                       ('[[user]]\nname = "a"\ntoken = "short"\n', "at least 16"),
                       ('[[user]]\nname = "a"\n', "give a password"),
                       ('anonymous = "guest"\n', "anonymous"),
                       ('users = []\n', "unknown key")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match="bad.toml") as err:
            Users.load(bad)
        assert says in str(err.value)


def test_the_cli_does_not_need_the_view_extra():
    """`linegate --help`, `run` and `watch` parse without Starlette or uvicorn: the view's
    web framework is imported only when `linegate view` runs."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys, linegate.cli; linegate.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'playwright')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_view_imports_from_edge_only_the_bus_and_control_contracts():
    import ast

    from conftest import REPO

    allowed = {"edge.subscriber", "edge.auth", "edge.control_api"}
    for path in sorted((REPO / "lineside" / "view").glob("*.py")):
        tree = ast.parse(path.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        edge = {n for n in names if n.split(".")[0] == "edge"}
        assert edge <= allowed, (path.name, edge - allowed)
        assert not {n for n in names if n.split(".")[0] in ("torch", "training", "export")}, path.name


def _view_unit_command() -> list[str]:
    import shlex

    from conftest import REPO

    unit = (REPO / "systemd" / "linegate-view.service").read_text()
    env = dict(line.split("=", 1) for line in (REPO / "systemd" / "linegate-view.env").read_text().splitlines()
               if line and not line.startswith("#"))
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    for key, value in env.items():
        exec_start = exec_start.replace("${" + key + "}", value).replace("$" + key, value)
    return shlex.split(exec_start)


def test_the_view_unit_and_its_environment_file_give_a_command_line_view_accepts():
    from linegate.cli import build_parser

    argv = _view_unit_command()
    assert argv[0] == "/opt/linegate/venv/bin/linegate"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "view" and args.bus == "tcp://127.0.0.1:5556" and args.http == ("0.0.0.0", 8080)
    assert args.db == "/var/lib/linegate-record/record.db" and args.auth == "/etc/linegate/view-users.toml"


def test_the_view_unit_passes_systemd_analyze_verify(tmp_path):
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    stand_in = tmp_path / "bin" / "linegate"
    stand_in.parent.mkdir()
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m linegate.cli \"$@\"\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "linegate-view.service"
    unit.write_text((REPO / "systemd" / "linegate-view.service").read_text()
                    .replace("/opt/linegate/venv/bin/linegate", str(stand_in)))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "linegate-view.service" not in out.stdout + out.stderr, out.stdout + out.stderr
