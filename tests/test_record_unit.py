"""The recorder's systemd unit: valid for systemd, hardened as the runtime's, and its
environment file names a command line `linegate record` accepts."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "linegate-record.service"
RUNTIME_UNIT = REPO / "systemd" / "linegate.service"
INSTALLED_BINARY = "/opt/linegate/venv/bin/linegate"


def settings(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_recorder_unit_is_hardened_like_the_runtime_unit():
    record, runtime = settings(UNIT), settings(RUNTIME_UNIT)
    hardening = ["NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                 "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
                 "ProtectHostname", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                 "LockPersonality", "RestrictAddressFamilies", "SystemCallArchitectures", "CapabilityBoundingSet",
                 "UMask", "User", "RestartPreventExitStatus", "Restart", "StartLimitIntervalSec"]
    for key in hardening:
        assert record.get(key) == runtime.get(key), key
    assert record["StateDirectory"] == ["linegate-record"]
    assert "linegate.service" in record["After"][0]


def test_the_environment_file_gives_a_command_line_record_accepts():
    from linegate.cli import build_parser

    env = dict(line.split("=", 1) for line in (REPO / "systemd" / "linegate-record.env").read_text().splitlines()
               if line and not line.startswith("#"))
    exec_start = settings(UNIT)["ExecStart"][0]
    argv = shlex.split(exec_start.replace("${LINEGATE_ENDPOINT}", env["LINEGATE_ENDPOINT"])
                       .replace("${LINEGATE_RECORD_DB}", env["LINEGATE_RECORD_DB"])
                       .replace("$LINEGATE_RECORD_ARGS", env["LINEGATE_RECORD_ARGS"]))
    assert argv[0] == INSTALLED_BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == "record" and args.db == "/var/lib/linegate-record/record.db"
    assert args.max_gb == 20 and args.keep_days == 90


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_recorder_unit_passes_systemd_analyze_verify(tmp_path):
    stand_in = tmp_path / "bin" / "linegate"
    stand_in.parent.mkdir()
    stand_in.write_text(f"#!/bin/sh\nexec {sys.executable} -m linegate.cli \"$@\"\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "linegate-record.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(stand_in)))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "linegate-record.service" not in out.stdout + out.stderr, out.stdout + out.stderr
    broken = tmp_path / "broken" / "linegate-record.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("StateDirectoryMode=0750", "StateDirectoryMode=rwx"))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(broken)], capture_output=True, text=True,
                         timeout=60)
    assert "linegate-record.service:" in out.stdout + out.stderr


def test_the_recorder_imports_from_edge_only_the_bus_and_control_contracts():
    import ast

    allowed = {"edge.subscriber", "edge.auth", "edge.control_api", "edge.publisher"}
    for module in ("record", "store", "imagestore", "history"):
        tree = ast.parse((REPO / "lineside" / f"{module}.py").read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        edge = {n for n in names if n.split(".")[0] == "edge"}
        assert edge <= allowed, (module, edge - allowed)
        assert not {n for n in names if n.split(".")[0] in ("torch", "training", "export")}, module
    code = "import sys, lineside.record, lineside.history; print(sorted(m for m in sys.modules if m == 'psycopg'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"  # psycopg only for postgresql://: an SQLite recorder runs without it
