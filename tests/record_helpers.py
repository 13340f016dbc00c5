"""Helpers for the recorder's tests: a PostgreSQL database per test run, the recorder and the
runtime as real processes, and a second subscriber that notes every decision it receives."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import pytest

from conftest import linegate_cmd
from edge.subscriber import Subscriber

PG_ADMIN = os.environ.get("LINEGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_database() -> tuple[str, Callable[[], None]]:
    """A fresh database on the test server -> (its URL, drop()). Skips, saying why, when no
    server answers at LINEGATE_TEST_PG (default postgresql://postgres@127.0.0.1:5432/postgres)."""
    try:
        import psycopg
    except ModuleNotFoundError:
        pytest.skip("psycopg is not installed (pip install 'linegate[dev]'): PostgreSQL tests skipped")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server reachable at {PG_ADMIN} ({str(exc).strip()[:120]}); "
                    "set LINEGATE_TEST_PG to test against one")
    name = f"linegate_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE DATABASE {name}")
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()

    return url, drop


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request, tmp_path) -> str:
    """The record's target for each back end: an SQLite file, or a database of its own on the
    PostgreSQL server (dropped afterwards)."""
    if request.param == "sqlite":
        yield str(tmp_path / "record.db")
        return
    url, drop = pg_database()
    try:
        yield url
    finally:
        drop()


_STARTED: list["Proc"] = []


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """A test that fails half way leaves no recorder or runtime running."""
    yield
    while _STARTED:
        proc = _STARTED.pop().proc
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Proc:
    """A linegate subcommand as a process, its stderr (the log) in a file."""

    def __init__(self, args: list[str], log: Path) -> None:
        _STARTED.append(self)
        self.log_path = log
        self._log = open(log, "a")
        self.proc = subprocess.Popen(linegate_cmd(*args), stdout=subprocess.DEVNULL, stderr=self._log)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log()[start:])
            if match:
                return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in the log after {timeout} s "
                             f"(exit {self.proc.poll()}):\n{self.log()[-3000:]}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def wait(self, timeout: float = 60.0) -> int:
        """Let it end on its own (a finite source); its exit status."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_recorder(endpoint: str, db: str, log: Path, *extra: str) -> Proc:
    proc = Proc(["record", endpoint, "--db", db, *extra], log)
    proc.wait_log(r"recording tcp://")
    return proc


class Collector(threading.Thread):
    """A second subscriber: every decision header it receives, in order."""

    def __init__(self, endpoint: str, topics: tuple[str, ...] = ("decision",)) -> None:
        super().__init__(daemon=True)
        self.sub = Subscriber(endpoint, topics, rcvhwm=1_000_000)
        self.headers: list[dict] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                msg = self.sub.recv(50)
                if msg is not None:
                    self.headers.append({**msg.header, "_topic": msg.topic})
        finally:
            self.sub.close()

    def finish(self) -> list[dict]:
        self.stop_event.set()
        self.join(5)
        return self.headers


def runtime_count(log: str) -> tuple[int, int]:
    """(frames, rejects) from `linegate run`'s final log line."""
    match = re.search(r"done: (\d+) frames, (\d+) rejects", log)
    assert match, f"no final count in the runtime's log:\n{log[-2000:]}"
    return int(match[1]), int(match[2])


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not reached after {timeout} s")
