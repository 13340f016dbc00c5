"""Helpers for tests that run the real `linegate run --config` process: a TOML writer, the
process with its log in a file, and a background subscriber that records what arrives."""
from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from conftest import linegate_cmd
from edge.subscriber import Message, Subscriber


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(config: dict[str, Any]) -> str:
    """TOML for {section: {key: value}} with "source" a list of tables ([[source]]) and one
    level of sub-tables (publisher.curve)."""
    lines: list[str] = []
    for section, table in config.items():
        if section == "source":
            continue
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in subtables]
        for name, sub in subtables.items():
            lines.append(f"[{section}.{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sub.items()]
    for source in config.get("source", []):
        lines.append("[[source]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in source.items()]
    return "\n".join(lines) + "\n"


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(toml_text(config))
    return path


class RunProcess:
    """`linegate run --config FILE` with its stderr (the log) going to a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(linegate_cmd("run", "--config", str(config)),
                                     stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


class Collector(threading.Thread):
    """A subscriber in a thread: records (arrival time, message) until stop()."""

    def __init__(self, endpoint: str, topics: tuple[str, ...] = ("decision", "stats"), **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.sub = Subscriber(endpoint, topics, **kwargs)
        self.got: list[tuple[float, Message]] = []
        self._stop_event = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                msg = self.sub.recv(timeout_ms=100)
                if msg is not None:
                    with self.lock:
                        self.got.append((time.monotonic(), msg))
        finally:
            self.sub.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def messages(self, topic: str | None = None, since: float = 0.0, until: float = float("inf")) -> list[Message]:
        with self.lock:
            return [m for t, m in self.got if since <= t <= until and (topic is None or m.topic == topic)]

    def decisions(self, camera: str | None = None, **window: float) -> list[dict]:
        return [m.header for m in self.messages("decision", **window)
                if camera is None or m.header["camera_id"] == camera]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)


class GatedEngine:
    """The real ONNX Runtime engine, except that the second batch of real frames never comes
    back until the test opens the gate: an engine call that hangs. No real engine hangs on
    cue, so this wrapper stands in for one; the warm-up (all-zero batches) and the first
    batch of frames go straight to the real session."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.batch_sizes: list[int] = []  # real frames' batches, in order
        self.entered = threading.Event()  # the hung call has begun
        self.gate = threading.Event()

    def infer(self, batch):
        if batch.any():  # frames, not the warm-up's zeros
            self.batch_sizes.append(len(batch))
            if len(self.batch_sizes) == 2:
                self.entered.set()
                self.gate.wait()
        return self.engine.infer(batch)
