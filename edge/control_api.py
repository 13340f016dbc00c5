"""The control endpoint's contract (request and reply bodies) and a small client.

ZeroMQ request/reply with msgpack bodies; the runtime binds (edge.control), clients connect:

    request  {"v": 1, "cmd": str, "args": {...}, "on_behalf_of": str | None}
    reply    {"v": 1, "ok": bool, "error": str | None, "result": {...}}

Commands (see COMMANDS): status; threshold {value, camera}; pause; resume; load {bundle};
replay {topic, from_seq, to_seq, max}. ``on_behalf_of`` names a person a client acts for (a
web page's user); the runtime logs it and puts it into the event's ``who``.

Bus clients (lineside) import this module, never edge.control (the server).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import zmq

from edge.auth import CurveClient

CONTROL_VERSION = 1
COMMANDS = ("status", "threshold", "pause", "resume", "load", "replay")
REPLAY_TOPICS = ("decision", "overlay", "frame", "event")
# What the event topic's `what` says (edge.control publishes one event per change).
EVENT_KINDS = ("threshold", "pause", "resume", "load", "reload", "start")
LOAD_TIMEOUT_S = 600.0  # a load validates and warms a model: minutes on a slow box


class ControlError(RuntimeError):
    """The runtime refused a command; the message is its reason."""


def pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def request_body(cmd: str, args: dict[str, Any] | None = None, on_behalf_of: str | None = None) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "cmd": cmd, "args": args or {}, "on_behalf_of": on_behalf_of}


def reply_body(ok: bool, result: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    return {"v": CONTROL_VERSION, "ok": ok, "error": error, "result": result or {}}


class ControlClient:
    """A REQ socket to a runtime's control endpoint. Use from one thread.

    server_key: the runtime's public key (its .key file or the 40-character text) and
    client_key: this client's .key_secret, when the runtime uses CURVE. A key the runtime's
    control allow-list does not hold gets no reply: TimeoutError, as for a runtime that is down.
    """

    def __init__(self, endpoint: str, server_key: str | Path | None = None,
                 client_key: str | Path | None = None, timeout_s: float = 5.0,
                 context: zmq.Context | None = None) -> None:
        if (server_key is None) != (client_key is None):
            raise ValueError("CURVE needs both --server-key (the runtime's public key) and --client-key "
                             "(this client's .key_secret)")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._curve = CurveClient.load(server_key, client_key) if server_key is not None else None
        self._context = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._context.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._curve.apply(sock)
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                sock.close()
                raise ValueError(f"cannot connect to {self.endpoint!r}: {exc.strerror}; give the runtime's "
                                 "control endpoint, e.g. tcp://127.0.0.1:5557") from exc
            self._sock = sock
        return self._sock

    def request(self, cmd: str, on_behalf_of: str | None = None, timeout_s: float | None = None,
                **args: Any) -> dict[str, Any]:
        """Send one command; its result. ControlError when the runtime refused it (its reason),
        TimeoutError when no reply came (runtime down, or this key not allowed to steer)."""
        sock = self._socket()
        sock.send(pack(request_body(cmd, args, on_behalf_of)))
        wait = self.timeout_s if timeout_s is None else timeout_s
        if not sock.poll(int(wait * 1000), zmq.POLLIN):
            # A REQ socket that got no reply cannot send again: start afresh next time.
            self.close()
            raise TimeoutError(f"no reply from {self.endpoint} within {wait:g} s (runtime not running, "
                               "wrong endpoint, or this key is not on its control allow-list)")
        reply = unpack(sock.recv())
        if not isinstance(reply, dict) or reply.get("v") != CONTROL_VERSION:
            raise ControlError(f"{self.endpoint}: not a linegate control reply: {reply!r:.200}")
        if not reply.get("ok"):
            raise ControlError(reply.get("error") or "refused (no reason given)")
        return reply.get("result") or {}

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def threshold(self, value: float | None, camera: str | None = None, **kw: Any) -> dict[str, Any]:
        return self.request("threshold", value=value, camera=camera, **kw)

    def pause(self, **kw: Any) -> dict[str, Any]:
        return self.request("pause", **kw)

    def resume(self, **kw: Any) -> dict[str, Any]:
        return self.request("resume", **kw)

    def load(self, bundle: str | Path, timeout_s: float = LOAD_TIMEOUT_S, **kw: Any) -> dict[str, Any]:
        return self.request("load", bundle=str(bundle), timeout_s=timeout_s, **kw)

    def replay(self, topic: str, from_seq: int, to_seq: int | None = None, max: int = 1000,
               **kw: Any) -> dict[str, Any]:
        return self.request("replay", topic=topic, from_seq=from_seq, to_seq=to_seq, max=max, **kw)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
