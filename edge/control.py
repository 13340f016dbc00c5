"""Operating a running line: the control endpoint, the replay buffer, events, config reload.

- ``Controller``: what may change while the pipeline runs: thresholds (line-wide or per
  camera), pause/resume, a hot swap of the bundle (``load``: validated, opened and warmed in
  the calling thread while the old model keeps judging, then put in force between two
  batches), and a reload of the config file (SIGHUP). Every change bumps
  ``settings_version``, is logged with who made it, and is published as an ``event``
  message (by the publishing thread: the Controller is also a pipeline Monitor, and its
  tick() sends what is queued).
- ``ReplayBuffer``: the last N decisions and events, and overlays and reject frames within
  a byte budget, as they were published (packed headers), so that a client that missed
  messages (a recorder that was down) can ask for a seq range again.
- ``ControlServer``: a ROUTER socket (clients use REQ) in its own thread answering the
  requests of edge.control_api. With CURVE it is a CURVE server with its own allow-list
  (operators' keys; a key that may only watch is refused at the handshake, logged) and,
  optionally, reader keys that may only run status and replay (a recorder's: any other
  command is refused, logged), and ``who`` is the key's name (its file's stem). A load runs
  in a worker thread so that status requests are answered meanwhile.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import msgpack
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .active import SWAP_WARM_PACE, ActiveModel, EngineSettings, batch_sizes, check_memory, open_model, warm_up
from .auth import READ_COMMANDS, control_keys, load_secret_key
from .config import Config, ConfigError, is_local_endpoint
from .control_api import (COMMANDS, CONTROL_VERSION, REPLAY_TOPICS, ControlError, pack, reply_body,
                          unpack)
from .decision import DecisionRule
from .overlay import OverlayPolicy

log = logging.getLogger(__name__)

EVENTS_HELD = 10_000
REPLY_BYTES = 64 << 20  # a replay reply stops adding frames past this (at least one goes): the client pages
REFUSAL_LOG_EVERY_S = 60.0  # a refused client retries every 100 ms: one log line per key a minute
# Config keys a reload applies while running; every other changed key is named in the log and
# waits for a restart.
LIVE_KEYS = ("decision.threshold", "decision.aggregate", "overlay.accepts_every", "overlay.jpeg_quality",
             "batching.max_batch", "batching.max_wait_ms", "publisher.frames", "logging.level",
             "engine.bundle", "engine.kind", "engine.precision", "engine.threads", "engine.spin_between_calls")


# -- replay -------------------------------------------------------------------------------------

class ReplayBuffer:
    """What was published lately, per topic, by seq; written by the publishing thread
    (Publisher.on_publish), read by the control thread."""

    def __init__(self, decisions: int = 100_000, frames_bytes: int = 256 << 20, events: int = EVENTS_HELD) -> None:
        self._held: dict[str, deque] = {t: deque() for t in REPLAY_TOPICS}
        self._limits = {"decision": decisions, "event": events}
        self.frames_bytes = frames_bytes
        self._bytes = 0  # overlay + frame payloads and headers held
        self._order = itertools.count()  # which of overlay / frame is older
        self.last: dict[str, int] = {}  # last seq published per topic
        self._lock = threading.Lock()

    def record(self, topic: str, seq: int, header: bytes, payload: bytes | None) -> None:
        held = self._held.get(topic)
        if held is None:  # stats: not replayed
            return
        with self._lock:
            self.last[topic] = seq
            if topic in self._limits:
                if self._limits[topic] <= 0:
                    return
                held.append((seq, header, payload))
                if len(held) > self._limits[topic]:
                    held.popleft()
                return
            size = len(header) + (len(payload) if payload else 0)
            held.append((seq, header, payload, next(self._order), size))
            self._bytes += size
            while self._bytes > self.frames_bytes:  # drop the oldest overlay or frame
                heads = [q for q in (self._held["overlay"], self._held["frame"]) if q]
                oldest = min(heads, key=lambda q: q[0][3])
                self._bytes -= oldest.popleft()[4]

    def held(self, topic: str) -> tuple[int | None, int | None]:
        with self._lock:
            q = self._held[topic]
            return (q[0][0], q[-1][0]) if q else (None, None)

    def replay(self, topic: str, from_seq: int, to_seq: int | None = None, limit: int = 1000,
               max_bytes: int = REPLY_BYTES) -> dict[str, Any]:
        """The messages held with from_seq <= seq <= to_seq (at most ``limit``, and payloads of
        about ``max_bytes``), and which requested seqs are no longer held (``missing``:
        [first, last] ranges)."""
        if topic not in self._held:
            raise ControlError(f"replay topic {topic!r}: expected one of {', '.join(REPLAY_TOPICS)}")
        with self._lock:
            q = self._held[topic]
            last = self.last.get(topic)
            oldest = q[0][0] if q else (last + 1 if last is not None else None)
            newest = q[-1][0] if q else None
            end = last if to_seq is None else (to_seq if last is None else min(to_seq, last))
            missing = []
            if oldest is not None and end is not None and from_seq < oldest and from_seq <= end:
                missing.append([from_seq, min(oldest - 1, end)])
            picked, size = [], 0
            if q and end is not None:
                start = max(from_seq, oldest) - oldest
                for item in itertools.islice(q, start, None):
                    if item[0] > end or len(picked) >= limit or (picked and size >= max_bytes):
                        break
                    picked.append((item[1], item[2]))
                    size += len(item[2]) if item[2] else 0
        messages = [[msgpack.unpackb(h, raw=False), p] for h, p in picked]
        return {"messages": messages, "missing": missing, "oldest_seq": oldest if q else None,
                "newest_seq": newest}


# -- the controller -------------------------------------------------------------------------------

def _flatten(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if section.name == "path":
            continue
        if section.name == "sources":
            out["source"] = [dataclasses.asdict(s) for s in value]
            continue
        for key, v in dataclasses.asdict(value).items():
            out[f"{section.name}.{key}"] = v
    return out


def _manifest_digest(bundle_dir: str | Path) -> str | None:
    try:
        return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


class Controller:
    """The live settings of a pipeline and every change to them (see the module doc).

    ``reload_config``: reads and validates the config file again (SIGHUP); None: no reload.
    """

    def __init__(self, pipeline: Any, config: Config | None = None, engine: EngineSettings | None = None,
                 replay: ReplayBuffer | None = None,
                 reload_config: Callable[[], Config] | None = None) -> None:
        self.pipeline = pipeline
        self.config = config
        self.engine = engine or EngineSettings()
        self.replay = replay
        self.reload_config = reload_config
        self.settings_version = 0
        self.warm_pace = SWAP_WARM_PACE  # see edge.active
        self.started_mono = time.monotonic()
        self.bundle_path = str(pipeline.model.bundle.path)
        self._manifest = _manifest_digest(self.bundle_path)
        self._lock = threading.RLock()  # one change at a time
        self._loading = threading.Lock()  # one load (or reload) at a time
        self._events: deque[dict[str, Any]] = deque()
        self._reload_requested = threading.Event()
        self.camera_ids = [s.camera_id for s in pipeline.sources]
        self.event("local", "start", None, self._settings())

    # -- events --------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        m = self.pipeline.model
        return {"model_id": m.model_id, "bundle": self.bundle_path, "threshold": m.threshold,
                "thresholds": m.thresholds(self.camera_ids), "paused": self.pipeline.paused,
                "config_file": self.config.path if self.config else None}

    def event(self, who: str, what: str, before: Any, after: Any, camera_id: str | None = None) -> None:
        """Log a change and queue its `event` message (the publishing thread sends it)."""
        if what != "start":
            self.settings_version += 1
        header = {"who": who, "what": what, "before": before, "after": after,
                  "settings_version": self.settings_version, "camera_id": camera_id, "ts": time.time()}
        log.info("event %s by %s%s: %s -> %s (settings version %d)", what, who,
                 f" on {camera_id}" if camera_id else "", before, after, self.settings_version)
        self._events.append(header)

    # Monitor protocol: called by the pipeline's publishing thread
    def tick(self, pipeline: Any, now: float) -> None:
        while self._events:
            self.pipeline.publisher.publish("event", self._events.popleft())
        if self._reload_requested.is_set():
            self._reload_requested.clear()
            threading.Thread(target=self.reload, args=("sighup",), name="reload", daemon=True).start()

    def stats(self, message: dict[str, Any]) -> None:
        pass

    def stopping(self) -> None:
        while self._events:
            self.pipeline.publisher.publish("event", self._events.popleft())

    def request_reload(self) -> None:
        """From a signal handler: only sets a flag (the reload runs in a thread of its own)."""
        self._reload_requested.set()

    # -- commands ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        p = self.pipeline
        m = p.model
        now = time.time()
        cameras = {}
        for s in p.sources:
            last = p.last_frame_ts.get(s.camera_id)
            cameras[s.camera_id] = {"state": s.state, "fps": p.camera_fps.get(s.camera_id, 0.0),
                                    "last_frame_age_s": None if last is None else round(now - last, 3),
                                    "frames": s.counters["frames"], "paused": p.paused_frames[s.camera_id]}
        pub = p.publisher
        return {"model_id": m.model_id, "bundle": self.bundle_path, "threshold": m.threshold,
                "thresholds": m.thresholds(self.camera_ids), "paused": p.paused, "cameras": cameras,
                "queues": p.queue_depths(), "uptime_s": round(time.monotonic() - self.started_mono, 3),
                "config_file": self.config.path if self.config else None,
                "settings_version": self.settings_version, "run_id": pub.run_id,
                "seq": {t: pub.last_seq(t) for t in ("decision", "overlay", "frame", "event", "stats")}}

    def set_threshold(self, value: float | None, camera: str | None, who: str) -> dict[str, Any]:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ControlError(f"threshold {value!r}: give a number")
            value = float(value)
        if camera is not None and camera not in self.camera_ids:
            raise ControlError(f"camera {camera!r}: no such camera; this line has {', '.join(self.camera_ids)}")
        with self._lock:
            old = self.pipeline.model
            try:
                new = old.with_thresholds(value, camera)
            except ValueError as exc:
                raise ControlError(str(exc)) from None
            self.pipeline.swap_model(new)
            before = old.threshold_for(camera) if camera else old.threshold
            after = new.threshold_for(camera) if camera else new.threshold
            if camera is None and old.camera_thresholds:  # a line-wide threshold replaces the cameras' own
                before = {"line": old.threshold, **old.camera_thresholds}
            self.event(who, "threshold", before, after, camera)
        return self.status()

    def pause(self, who: str) -> dict[str, Any]:
        with self._lock:
            if self.pipeline.pause():
                self.event(who, "pause", False, True)
        return self.status()

    def resume(self, who: str) -> dict[str, Any]:
        with self._lock:
            if self.pipeline.resume():
                self.event(who, "resume", True, False)
        return self.status()

    def load(self, bundle: str, who: str) -> dict[str, Any]:
        """Validate, open and warm ``bundle`` here while the old model judges; then swap."""
        if not isinstance(bundle, str) or not bundle:
            raise ControlError("load needs bundle: the path of a bundle directory on the runtime's machine")
        if not self._loading.acquire(blocking=False):
            raise ControlError("another load or reload is in progress; try again when it is done")
        try:
            new = self._open(bundle, self.engine, who)
            with self._lock:
                before = {"model_id": self.pipeline.model.model_id, "bundle": self.bundle_path}
                self._swap(new, bundle)
                self.event(who, "load", before, {"model_id": new.model_id, "bundle": bundle})
        finally:
            self._loading.release()
        return self.status()

    def _open(self, bundle: str, engine: EngineSettings, who: str, threshold: float | None = None,
              aggregate: str | None = None) -> ActiveModel:
        log.info("loading bundle %s (asked by %s); the current model keeps judging meanwhile", bundle, who)
        try:
            return open_model(bundle, engine, threshold, aggregate, self.pipeline.options.max_batch,
                              pace=self.warm_pace, queue_capacity=self.pipeline.options.queue_capacity)
        except (ValueError, RuntimeError, OSError) as exc:
            log.warning("load of %s (asked by %s) refused: %s; %s keeps running", bundle, who, exc,
                        self.pipeline.model.model_id)
            raise ControlError(f"bundle {bundle} refused: {exc}; {self.pipeline.model.model_id} keeps running") from None

    def _swap(self, new: ActiveModel, bundle: str) -> None:
        old = self.pipeline.swap_model(new)
        if old.engine is not new.engine:  # free the old engine (GPU memory) once its last call returned
            threading.Thread(target=self.pipeline.retire_engine, args=(old.engine,), name="retire",
                             daemon=True).start()
        self.pipeline.publisher.model_id = new.model_id  # stats and events from now on
        self.bundle_path = bundle
        self._manifest = _manifest_digest(bundle)
        log.info("model %s in force from the next batch (bundle %s)", new.model_id, bundle)

    # -- config reload -------------------------------------------------------------------------

    def reload(self, who: str = "sighup") -> bool:
        """Read the config file again and apply what can change live (LIVE_KEYS); name the
        rest in the log. A file that does not validate, or a bundle that does not load,
        changes nothing. True if the reload was applied."""
        if self.reload_config is None or self.config is None:
            log.warning("reload asked (%s) but this run has no config file to read again", who)
            return False
        if not self._loading.acquire(blocking=False):
            log.warning("reload (%s) refused: a load is in progress; send it again when it is done", who)
            return False
        try:
            return self._reload(who)
        finally:
            self._loading.release()

    def _reload(self, who: str) -> bool:
        try:
            new_config = self.reload_config()
        except (ConfigError, ValueError, OSError) as exc:
            log.error("reload (%s) refused, the running settings stay: %s", who, exc)
            return False
        old, new = _flatten(self.config), _flatten(new_config)
        changed = {k for k in new if new[k] != old.get(k)}
        bundle_changed = _manifest_digest(new_config.engine.bundle) != self._manifest
        if bundle_changed:
            changed.add("engine.bundle")
        live = {k for k in changed if k in LIVE_KEYS}
        stays = sorted(changed - live)
        if stays:
            log.warning("reload (%s): %s changed in the file but cannot change while running; they take effect "
                        "at the next restart (systemctl restart linegate)", who, ", ".join(stays))
        if not live:
            log.info("reload (%s): nothing that can change live changed", who)
            return True
        try:
            model = self._reloaded_model(new_config, live, who)
        except (ControlError, ValueError, RuntimeError) as exc:
            log.error("reload (%s) refused, the running settings stay: %s", who, exc)
            return False
        before = {k: old.get(k) for k in sorted(live)}
        after = {k: new.get(k) for k in sorted(live)}
        with self._lock:
            before["model_id"] = self.pipeline.model.model_id
            opts = self.pipeline.options
            if model is not None:
                if {"engine.bundle", "engine.kind", "engine.precision", "engine.threads",
                        "engine.spin_between_calls"} & live:
                    self._swap(model, new_config.engine.bundle)
                else:
                    self.pipeline.swap_model(model)
            opts.max_wait_ms = new_config.batching.max_wait_ms
            opts.max_batch = new_config.batching.max_batch
            opts.jpeg_quality = new_config.overlay.jpeg_quality
            opts.publish_frames = new_config.publisher.frames
            if "overlay.accepts_every" in live:
                self.pipeline.overlays = OverlayPolicy(new_config.overlay.accepts_every)
            if "logging.level" in live:
                logging.getLogger().setLevel(new_config.logging.level.upper())
            # what was applied is now the running config; what was not stays as it runs
            running = dataclasses.replace(new_config)
            for key in stays:
                section, _, name = key.partition(".")
                if key == "source":
                    running.sources = self.config.sources
                elif name:
                    table = dataclasses.replace(getattr(running, section))
                    setattr(table, name, getattr(getattr(self.config, section), name))
                    setattr(running, section, table)
            self.config = running
            after["model_id"] = self.pipeline.model.model_id
            self.event(who, "reload", before, after)
        return True

    def _reloaded_model(self, cfg: Config, live: set[str], who: str) -> ActiveModel | None:
        """The model the reloaded file asks for (opened and warmed), or None if unchanged."""
        engine_keys = {"engine.bundle", "engine.kind", "engine.precision", "engine.threads",
                       "engine.spin_between_calls"}
        current = self.pipeline.model
        if engine_keys & live:
            settings = EngineSettings(cfg.engine.kind, cfg.engine.precision, cfg.engine.threads,
                                      cfg.engine.spin_between_calls)
            try:
                model = open_model(cfg.engine.bundle, settings, cfg.decision.threshold, cfg.decision.aggregate,
                                   cfg.batching.max_batch, pace=self.warm_pace,
                                   queue_capacity=self.pipeline.options.queue_capacity)
            except (ValueError, RuntimeError, OSError) as exc:
                raise ControlError(f"bundle {cfg.engine.bundle} refused: {exc}") from None
            self.engine = settings
            return model
        model = None
        if {"decision.threshold", "decision.aggregate"} & live:
            try:
                rule = DecisionRule.from_bundle(current.bundle, cfg.decision.threshold, cfg.decision.aggregate)
            except ValueError as exc:
                raise ControlError(f"key 'decision': {exc}") from None
            # the file's threshold is line-wide: the cameras' own (set by ctl) give way to it
            model = dataclasses.replace(current, rule=rule, threshold_override=None, camera_thresholds={})
        if "batching.max_batch" in live and cfg.batching.max_batch > self.pipeline.options.max_batch:
            judged = model or current
            check_memory(judged.engine, judged.bundle, cfg.batching.max_batch, self.pipeline.options.queue_capacity,
                         "key 'batching.max_batch':")
            warm_up(judged, batch_sizes(cfg.batching.max_batch), strict=True)
        return model


# -- the control socket ----------------------------------------------------------------------------

class _KeyNames:
    """The control endpoint's keys (edge.auth.ControlKeys: operators and readers) and their
    names (file stems). Used as pyzmq's CURVE credentials provider: a key in either folder
    completes the handshake; refusals are logged here."""

    def __init__(self, allowed_dir: str | Path, reader_dir: str | Path | None = None) -> None:
        self.directory = Path(allowed_dir)
        self.reader_directory = Path(reader_dir) if reader_dir is not None else None
        self.keys = control_keys(allowed_dir, reader_dir)  # ValueError naming the folder or the files
        self.names: dict[bytes, str] = self.keys.names
        self.readers = set(self.keys.readers.values())  # names that may only read (unique: see control_keys)
        self._logged: dict[bytes, float] = {}  # key -> when its refusal was last logged
        self._refused: dict[bytes, int] = {}  # key -> handshakes refused since then

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.names:
            return True
        now = time.monotonic()
        self._refused[key] = self._refused.get(key, 0) + 1
        if now - self._logged.get(key, -REFUSAL_LOG_EVERY_S) >= REFUSAL_LOG_EVERY_S:
            lists = str(self.directory) + (f" or {self.reader_directory}" if self.reader_directory else "")
            log.warning("control: refused a CURVE client with key %s: not in the control allow-list %s "
                        "(a key that may watch may not steer); %d attempt(s) since the last such line",
                        key.decode("ascii", "replace"), lists, self._refused[key])
            self._logged[key] = now
            self._refused[key] = 0
        return False


class _NamingAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with the User-Id of an allowed key set to its name."""

    def __init__(self, context: zmq.Context, names: _KeyNames) -> None:
        super().__init__(context, log=logging.getLogger("edge.control.zap"))
        self._names = names

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names.names.get(z85.encode(client_public_key), "unknown")


class ControlServer:
    """The control endpoint in a thread of its own (see the module doc)."""

    def __init__(self, controller: Controller, endpoint: str, curve_secret_key: str | None = None,
                 allowed_keys_dir: str | None = None, allow_remote: bool = False,
                 reader_keys_dir: str | None = None) -> None:
        self.controller = controller
        self.curve = curve_secret_key is not None
        if self.curve and allowed_keys_dir is None:
            raise ValueError("control with CURVE needs an allow-list directory of operator keys")
        if not self.curve and reader_keys_dir is not None:
            raise ValueError("control reader keys need CURVE ([publisher.curve]): without it no key is known")
        self._readers: set[str] = set()  # key names that may only run READ_COMMANDS
        if not self.curve and not allow_remote and not is_local_endpoint(endpoint):
            raise ValueError(f"control endpoint {endpoint!r} is reachable from other machines without CURVE; "
                             "bind it to 127.0.0.1 or ipc://, or set [control] allow_remote = true")
        self._context = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.curve:
                names = _KeyNames(allowed_keys_dir, reader_keys_dir)  # type: ignore[arg-type]
                self._readers = names.readers
                public, secret = load_secret_key(curve_secret_key)  # type: ignore[arg-type]
                sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
                self._auth = _NamingAuthenticator(self._context, names)
                self._auth.start()
                self._auth.configure_curve_callback(domain="*", credentials_provider=names)
            sock.bind(endpoint)
        except (zmq.ZMQError, ValueError) as exc:
            sock.close(linger=0)
            self._stop_auth()
            self._context.term()
            if isinstance(exc, zmq.ZMQError):
                raise ValueError(f"cannot bind the control endpoint {endpoint!r}: {exc.strerror}") from exc
            raise
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # handshakes that fail before ZAP is asked (a client without CURVE, a wrong server key)
        # (a refused key fails with _AUTH, already logged by _KeyNames with the key)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) if self.curve else None
        self._failed_handshakes = 0
        self._failed_logged = -REFUSAL_LOG_EVERY_S
        self._done: deque[tuple[list[bytes], dict]] = deque()  # replies of finished loads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        if self.curve:
            log.info("control endpoint on %s (CURVE: only the %d operator key(s) in %s may steer; %s)", self.endpoint,
                     len(names.keys.operators), allowed_keys_dir,
                     f"{len(names.keys.readers)} reader key(s) in {reader_keys_dir} may only read: "
                     f"{', '.join(READ_COMMANDS)}" if reader_keys_dir is not None else "no reader keys")
            for operator_file, reader_file in names.keys.both:
                log.info("control: %s is in both lists (as %s): an operator, it may steer", operator_file,
                         reader_file)
        else:
            log.info("control endpoint on %s without CURVE: %s", self.endpoint,
                     "anyone who can reach it may steer the line ([control] allow_remote = true)"
                     if not is_local_endpoint(endpoint) else "only this machine can reach it (loopback/ipc)")

    def start(self) -> "ControlServer":
        self._thread.start()
        return self

    def _serve(self) -> None:
        sock = self._sock
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            while self._done:
                envelope, reply = self._done.popleft()
                sock.send_multipart([*envelope, pack(reply)])
            ready = dict(poller.poll(50))
            if self._monitor is not None and self._monitor in ready:
                self._handshake_failed()
            if sock not in ready:
                continue
            frames = sock.recv_multipart(copy=False)
            envelope, body = [f.bytes for f in frames[:-1]], frames[-1]
            who = "local"
            if self.curve:
                try:
                    who = body.get("User-Id") or "unknown"
                except zmq.ZMQError:
                    who = "unknown"
            try:
                reply = self._dispatch(envelope, body.bytes, who)
            except Exception as exc:  # noqa: BLE001 - a bug answers with its message, the server lives
                log.exception("control: request failed")
                reply = reply_body(False, error=f"internal error: {type(exc).__name__}: {exc}")
            if reply is not None:
                sock.send_multipart([*envelope, pack(reply)])
        if self._monitor is not None:
            sock.disable_monitor()
            self._monitor.close(linger=0)
        sock.close(linger=0)

    def _handshake_failed(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            self._failed_handshakes += 1
            now = time.monotonic()
            if now - self._failed_logged >= REFUSAL_LOG_EVERY_S:
                log.warning("control: refused a connection whose CURVE handshake failed (%s: a client without "
                            "CURVE or with the wrong server key); %d since the last such line",
                            getattr(event.get("event"), "name", event.get("event")), self._failed_handshakes)
                self._failed_logged = now
                self._failed_handshakes = 0

    def _dispatch(self, envelope: list[bytes], data: bytes, key_name: str) -> dict | None:
        try:
            req = unpack(data)
        except Exception:  # noqa: BLE001 - msgpack raises several types
            return reply_body(False, error="not a msgpack request; use edge.control_api.ControlClient")
        if not isinstance(req, dict) or req.get("v") != CONTROL_VERSION or not isinstance(req.get("cmd"), str):
            return reply_body(False, error=f"not a control request of version {CONTROL_VERSION}: "
                              "{'v': 1, 'cmd': ..., 'args': {...}}")
        cmd, args = req["cmd"], req.get("args") or {}
        behalf = req.get("on_behalf_of")
        who = f"{key_name} (for {behalf})" if isinstance(behalf, str) and behalf else key_name
        if cmd not in COMMANDS:
            return reply_body(False, error=f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
        if not isinstance(args, dict):
            return reply_body(False, error="args must be a map")
        if key_name in self._readers and cmd not in READ_COMMANDS:
            log.warning("control: refused %s from %s: a reader key (in [control] reader_keys) may only run %s",
                        cmd, who, ", ".join(READ_COMMANDS))
            return reply_body(False, error=f"{cmd} refused: key {key_name!r} may only read "
                              f"({', '.join(READ_COMMANDS)}); put its public key in [control] allowed_keys "
                              "to steer")
        if cmd not in READ_COMMANDS:
            log.info("control: %s%s from %s", cmd, f" {args}" if args else "", who)
        if cmd == "load":  # minutes, maybe: in a thread, answered when done
            def run() -> None:
                self._done.append((envelope, self._call(cmd, args, who)))
            threading.Thread(target=run, name="control-load", daemon=True).start()
            return None
        return self._call(cmd, args, who)

    def _call(self, cmd: str, args: dict, who: str) -> dict:
        c = self.controller
        try:
            if cmd == "status":
                result = c.status()
            elif cmd == "threshold":
                if "value" not in args:
                    raise ControlError("threshold needs value (a number, or nil for the bundle's calibrated one)")
                result = c.set_threshold(args["value"], args.get("camera"), who)
            elif cmd == "pause":
                result = c.pause(who)
            elif cmd == "resume":
                result = c.resume(who)
            elif cmd == "load":
                result = c.load(args.get("bundle"), who)
            else:
                result = self._replay(args)
        except ControlError as exc:
            return reply_body(False, error=str(exc))
        return reply_body(True, result)

    def _replay(self, args: dict) -> dict:
        buffer = self.controller.replay
        if buffer is None:
            raise ControlError("this runtime keeps no replay buffer")
        topic, from_seq = args.get("topic"), args.get("from_seq", 0)
        to_seq, limit = args.get("to_seq"), args.get("max", 1000)
        for name, v, optional in (("from_seq", from_seq, False), ("to_seq", to_seq, True), ("max", limit, False)):
            if (v is None and not optional) or (v is not None and (isinstance(v, bool) or not isinstance(v, int))):
                raise ControlError(f"replay {name}: give an integer")
        if limit < 1:
            raise ControlError("replay max: must be >= 1")
        result = buffer.replay(topic, from_seq, to_seq, min(limit, 10_000))
        result["run_id"] = self.controller.pipeline.publisher.run_id
        return result

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        elif not self._sock.closed:
            self._sock.close(linger=0)
        self._stop_auth()
        self._context.term()


class Monitors:
    """Several pipeline Monitors as one (the service's systemd monitor and the Controller)."""

    def __init__(self, *monitors: Any) -> None:
        self.monitors = [m for m in monitors if m is not None]

    def tick(self, pipeline: Any, now: float) -> None:
        for m in self.monitors:
            m.tick(pipeline, now)

    def stats(self, message: dict[str, Any]) -> None:
        for m in self.monitors:
            m.stats(message)

    def stopping(self) -> None:
        for m in self.monitors:
            m.stopping()
