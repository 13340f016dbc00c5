"""Running the pipeline as a service: config -> parts, signals, and systemd's notify protocol.

sd_notify is implemented here directly rather than taken from a library: the protocol is one
datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
or an abstract socket when it starts with "@"), see sd_notify(3). That is a few lines, and
the PyPI packages for it are either unmaintained (sdnotify) or need libsystemd headers to
build (systemd-python).

What is sent, and when:
- ``READY=1`` once the engine is loaded (the Pipeline exists) and the first source delivered
  a frame; with ``MAINPID`` and a first ``STATUS``.
- ``WATCHDOG=1`` every WatchdogSec/2 ($WATCHDOG_USEC), but only while frames flow and
  publishing works: a decision was handed to ZeroMQ within ``service.frame_stall_s``. A
  pipeline that hangs, or whose cameras are all gone that long, stops feeding it and
  systemd restarts the service (the unit sets StartLimitIntervalSec=0 so it keeps trying).
- ``STATUS=...`` with the frame rate and each camera's state, once per stats message.
- ``STOPPING=1`` when the pipeline starts to stop (a signal, or the sources ended).

Exit codes of run_service: 0 clean stop; 1 the stop timeout ran out; 3 the engine failed on
``service.max_engine_failures`` batches in a row (systemd's Restart=on-failure restarts it);
configuration errors raise ConfigError (the CLI exits 2, and the unit does not restart on 2).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .active import EngineSettings
from .auth import CurveServer
from .config import Checked, Config, check_files, load_config
from .control import ControlServer, Controller, Monitors, ReplayBuffer
from .decision import DecisionRule
from .engine import Engine, open_engine
from .memory import BatchMemory
from .memory import measure as measure_memory
from .pipeline import Pipeline, RunOptions
from .publisher import Publisher

log = logging.getLogger(__name__)

# 2 (set by the CLI) is a configuration error, which systemd does not restart
# (RestartPreventExitStatus=2): every other non-zero status is one a restart may cure.
EXIT_OK, EXIT_STOP_TIMEOUT, EXIT_CONFIG, EXIT_RUN_FAILED = 0, 1, 2, 3


class Notifier:
    """systemd's notify protocol; does nothing when $NOTIFY_SOCKET is not set."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        if address and address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._target = address
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Notifier":
        env = os.environ if environ is None else environ
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False (logged at debug) if it could not go."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(assignments).encode("utf-8"), self._target)
            return True
        except OSError as exc:  # systemd gone (or a test's socket closed): not worth dying for
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(stats: dict[str, Any]) -> str:
    """One line for systemctl status: ``12.5 frames/s; cam0 connected 10.0 fps, cam1 down; 1234 decisions``
    (``PAUSED (frames counted, not judged); ...`` first while paused)."""
    cams = ", ".join(f"{cid} {c.get('state', '?')}" + (f" {c['fps']:.1f} fps" if c.get("fps") else "")
                     for cid, c in stats.get("cameras", {}).items())
    paused = "PAUSED (frames counted, not judged); " if stats.get("paused") else ""
    return f"{paused}{stats.get('fps', 0.0):.1f} frames/s; {cams}; {stats.get('frames', 0)} decisions"


class ServiceMonitor:
    """The pipeline's Monitor for systemd: READY, WATCHDOG, STATUS, STOPPING (see the module doc)."""

    def __init__(self, notifier: Notifier, frame_stall_s: float = 10.0) -> None:
        self.notifier = notifier
        self.frame_stall_s = frame_stall_s
        self.ready = False
        self.watchdog_pings = 0
        self._ready_at = 0.0
        self._next_ping = 0.0
        self._starving_logged = False

    def tick(self, pipeline: Any, now: float) -> None:
        if not self.ready and pipeline.first_frame_seen():
            self.ready = True
            self._ready_at = now
            self.notifier.notify("READY=1", f"MAINPID={os.getpid()}", "STATUS=running: first frame received")
            log.info("ready: engine loaded, first frame received%s",
                     " (told systemd)" if self.notifier.enabled else "")
        watchdog = self.notifier.watchdog_s
        if not self.ready or watchdog is None or now < self._next_ping or pipeline.stopping:
            return
        # the first decision may still be in the engine when READY goes out: until it comes,
        # the stall counts from READY
        # (while paused, frames counted and not judged are progress too)
        last = pipeline.last_progress_mono if pipeline.last_progress_mono is not None else self._ready_at
        if now - last <= self.frame_stall_s:
            self.notifier.notify("WATCHDOG=1")
            self.watchdog_pings += 1
            self._next_ping = now + watchdog / 2
            if self._starving_logged:
                log.info("frames flow again: feeding the systemd watchdog")
                self._starving_logged = False
        elif not self._starving_logged:
            log.warning("no decision published for %.0f s: not feeding the systemd watchdog "
                        "(systemd restarts linegate after WatchdogSec)", self.frame_stall_s)
            self._starving_logged = True

    def stats(self, message: dict[str, Any]) -> None:
        if self.ready:
            self.notifier.notify(f"STATUS={status_line(message)}")

    def stopping(self) -> None:
        self.notifier.notify("STOPPING=1", "STATUS=stopping: finishing the batch in flight")


def install_signal_handlers(stop: Callable[[str], None]) -> dict[int, Any]:
    """SIGTERM and SIGINT call stop(reason) (which only sets an event); SIGHUP, until the
    reload handler replaces it, only logs (Python's default would end the process at once);
    returns the old handlers."""
    def handler(signum: int, _frame: Any) -> None:
        stop(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _sighup_while_starting)
    return previous


def _sighup_while_starting(_signum: int, _frame: Any) -> None:
    # log from a thread: the handler may interrupt a log call of the main thread, and a
    # stream is not reentrant
    threading.Thread(target=log.warning, daemon=True, args=(
        "received SIGHUP while starting: the config read for this start stays; ignored (send it again "
        "once running to reload)",)).start()


def install_reload_handler(reload: Callable[[], None]) -> Any:
    """SIGHUP calls reload() (which only sets a flag); returns the old handler."""
    def handler(_signum: int, _frame: Any) -> None:
        reload()

    return signal.signal(signal.SIGHUP, handler)


class StopRequest:
    """A stop asked for by a signal, before or after the pipeline exists: the handlers are
    installed first thing, so a SIGTERM while the bundle loads or the engine warms up is
    honoured (within the stop timeout) rather than killing the process or waiting."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._target: Callable[[str], None] | None = None

    def __call__(self, reason: str) -> None:
        self.reason = self.reason or reason
        if self._target is not None:
            self._target(reason)

    def forward_to(self, stop: Callable[[str], None]) -> None:
        self._target = stop
        if self.reason is not None:
            stop(self.reason)


@dataclass
class Preflight:
    """Everything `run` checks before reading a frame (check-config runs the same)."""

    checked: Checked
    rule: DecisionRule
    engine: Engine
    max_batch: int  # what batches can really reach: max_batch, bounded by the queue
    memory: BatchMemory


def preflight(config: Config) -> Preflight:
    """Files, decision rule, engine (its inputs and outputs against the manifest), and the
    memory the batch size will take; ConfigError/BundleError name what to fix."""
    checked = check_files(config)  # bundle checksums, sources, keys: errors name the file and key
    bundle = checked.bundle
    rule = DecisionRule.from_bundle(bundle, config.decision.threshold, config.decision.aggregate)
    engine_kwargs: dict[str, Any] = {}
    if config.engine.precision:
        engine_kwargs["precision"] = config.engine.precision
    if config.engine.threads:
        engine_kwargs["threads"] = config.engine.threads
    if config.engine.spin_between_calls:
        engine_kwargs["spin_between_calls"] = True
    engine = open_engine(bundle, config.engine.kind, **engine_kwargs)  # logs which engine and why
    batching = config.batching
    # A batch is taken from the frame queue, so it never holds more than the queue does:
    # buffers and warm-up beyond that would take memory no batch can use.
    max_batch = min(batching.max_batch, batching.queue_capacity)
    if max_batch < batching.max_batch:
        log.info("batching: max_batch %d is more than the queue holds (queue_capacity %d): batches stop at %d",
                 batching.max_batch, batching.queue_capacity, max_batch)
    memory = measure_memory(engine, bundle.input_size, max_batch, batching.queue_capacity,
                            bundle.geometry.tile_count)
    if not memory.fits():
        raise config.error("key 'batching.max_batch'", f"{memory.describe()}: it cannot fit; use max_batch "
                           f"<= {memory.largest_fitting()} (and a smaller queue_capacity) or a box with more memory")
    checked.lines.append(f"memory: {memory.describe()}")
    return Preflight(checked, rule, engine, max_batch, memory)


def run_service(config: Config, notifier: Notifier | None = None,
                reload: Callable[[], Config] | None = None) -> int:
    """Build everything from a validated config, run until stopped, return the exit code.

    reload: reads and validates the config again on SIGHUP (default: the config's file, when
    it came from one)."""
    notifier = notifier or Notifier.from_env()
    stop = StopRequest()
    previous = install_signal_handlers(stop)
    try:
        return _run_service(config, notifier, stop, reload)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        notifier.close()


def _run_service(config: Config, notifier: Notifier, stop: StopRequest,
                 reload: Callable[[], Config] | None) -> int:
    ready = preflight(config)
    if stop.reason is not None:
        log.info("stopping (%s) before the start: no frame was read", stop.reason)
        return EXIT_OK
    bundle, sources, rule, engine = ready.checked.bundle, ready.checked.sources, ready.rule, ready.engine
    pub = config.publisher
    curve = CurveServer(Path(pub.curve.secret_key), Path(pub.curve.allowed_keys)) if pub.curve else None
    publisher = Publisher(pub.endpoint, model_id=bundle.model_id, sndhwm=pub.sndhwm, linger_ms=pub.linger_ms,
                          nodrop=pub.nodrop, curve=curve)
    log.info("publishing on %s%s (run %s)", publisher.endpoint, " (CURVE)" if curve else "", publisher.run_id)
    replay = ReplayBuffer(config.control.replay_decisions, int(config.control.replay_frames_mb * (1 << 20)))
    publisher.on_publish = replay.record
    options = RunOptions(
        max_batch=ready.max_batch, max_wait_ms=config.batching.max_wait_ms,
        queue_capacity=config.batching.queue_capacity,
        overlay_accepts_every=config.overlay.accepts_every, jpeg_quality=config.overlay.jpeg_quality,
        wait_subscribers=pub.wait_subscribers, wait_timeout_s=pub.wait_timeout_s, linger_ms=pub.linger_ms,
        stats_interval_s=pub.stats_interval_s, stop_timeout_s=config.service.stop_timeout_s,
        max_engine_failures=config.service.max_engine_failures, publish_frames=pub.frames)
    monitor = ServiceMonitor(notifier, config.service.frame_stall_s)
    pipeline = Pipeline(bundle, engine, rule, sources, publisher, options)
    if reload is None and Path(config.path).is_file():
        path = config.path
        reload = lambda: load_config(path)  # noqa: E731
    engine_settings = EngineSettings(config.engine.kind, config.engine.precision, config.engine.threads,
                                     config.engine.spin_between_calls)
    controller = Controller(pipeline, config, engine_settings, replay, reload)
    pipeline.monitor = Monitors(monitor, controller)
    server = metrics = None
    try:
        if config.control.endpoint:
            server = ControlServer(controller, config.control.endpoint,
                                   pub.curve.secret_key if pub.curve else None, config.control.allowed_keys,
                                   config.control.allow_remote, config.control.reader_keys).start()
        if config.metrics.listen:
            from .metrics import serve_metrics

            metrics = serve_metrics(config.metrics.listen, pipeline, controller)
    except ValueError as exc:
        if server is not None:
            server.close()
        publisher.close(linger_ms=0)
        raise config.error("key 'control.endpoint'" if server is None else "key 'metrics.listen'", str(exc)) from None
    stop.forward_to(pipeline.stop)
    install_reload_handler(controller.request_reload)  # run_service restores the original
    try:
        summary = pipeline.run()
    except Exception as exc:  # noqa: BLE001 - a bug or a resource gone mid-run is not a config error
        log.exception("the run failed: %s", exc)
        return EXIT_RUN_FAILED
    finally:
        if server is not None:
            server.close()
        if metrics is not None:
            metrics.close()
    log.info("done: %d frames, %d rejects, %d errors, %.1f frames/s; dropped %s, bad frames %s%s",
             summary.frames, summary.rejects, summary.errors, summary.fps, summary.dropped or "none",
             {k: v for k, v in summary.bad_frames.items() if v} or "none",
             (f", {summary.discarded} discarded at the stop timeout" if summary.discarded else "")
             + (f", {summary.unqueued} read after the stop and not inspected" if summary.unqueued else "")
             + _refused_text(publisher))
    if summary.fatal:
        log.error("exiting with status %d: %s", EXIT_RUN_FAILED, summary.fatal)
        return EXIT_RUN_FAILED
    if summary.timed_out:
        return EXIT_STOP_TIMEOUT
    return EXIT_OK


def _refused_text(publisher: Publisher) -> str:
    """The messages the publisher could not hand to ZeroMQ (nodrop: a subscriber's queue was
    full, and then every subscriber lost them); ``dropped`` above is the sources' policy."""
    refused = {topic: n for topic, n in publisher.dropped.items() if n}
    if not refused:
        return ""
    return (f"; the publisher refused {sum(refused.values())} message(s) "
            f"({', '.join(f'{n} {t}' for t, n in refused.items())}): a subscriber's queue was full "
            "(nodrop), so no subscriber got them")
