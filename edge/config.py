"""The runtime's TOML config (``linegate run --config FILE``), read with tomllib and validated
before anything starts.

Every key has a type, a default (or is required) and its limits here, in one place; an
unknown key (with the nearest known one suggested), a wrong type or an impossible value
raises ConfigError naming the file and the key. ``linegate check-config FILE`` runs the
same validation plus the checks that touch the disk (check_files: the bundle and its
checksums, folders and videos of the sources, CURVE key files). systemd/linegate.toml is the
commented example; the command-line flags of ``linegate run`` map onto the same keys.

    [engine]     bundle (required), kind, precision, threads, spin_between_calls
    [batching]   max_batch, max_wait_ms, queue_capacity
    [decision]   threshold, aggregate               (overrides of the bundle's calibration)
    [overlay]    accepts_every, jpeg_quality
    [publisher]  endpoint, sndhwm, linger_ms, nodrop, wait_subscribers, wait_timeout_s,
                 stats_interval_s, frames; [publisher.curve] secret_key, allowed_keys
    [control]    endpoint, allowed_keys, reader_keys, allow_remote, replay_decisions,
                 replay_frames_mb
    [metrics]    listen
    [service]    stop_timeout_s, max_engine_failures, frame_stall_s
    [logging]    level
    [[source]]   uri (required), id, policy, roi, size, backoff_s, backoff_max_s, io_timeout_s,
                 reopen_after_s
"""
from __future__ import annotations

import difflib
import math
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (pyproject pulls tomli there)
    import tomli as tomllib

import numpy as np

from .auth import READ_COMMANDS, allowed_keys, control_keys, load_secret_key
from .batcher import POLICIES
from .bundle import Bundle, load_bundle
from .decision import DecisionRule, aggregate_maps
from .engine import choose_engine
from .publisher import check_endpoint
from .sources import CAMERA_OPTIONS, Source, parse_source

ENGINE_KINDS = ("auto", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""

    def __init__(self, where: str, key: str | None, message: str) -> None:
        self.where, self.key = where, key
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# -- the schema: dataclass fields carry their type and limits ----------------------------------

def _key(default: Any = MISSING, kind: Any = str, *, ge: float | None = None, gt: float | None = None,
         le: float | None = None, choices: tuple | None = None, length: int | None = None,
         optional: bool = False) -> Any:
    """One config key. kind: int, float, str, bool, list (of ints, ``length`` long) or a section class."""
    meta = {"kind": kind, "ge": ge, "gt": gt, "le": le, "choices": choices, "length": length,
            "optional": optional}
    return field(default=default, metadata=meta)


@dataclass
class EngineConfig:
    bundle: str = _key()
    kind: str = _key("auto", choices=ENGINE_KINDS)
    precision: str | None = _key(None, choices=PRECISIONS, optional=True)
    threads: int = _key(0, int, ge=0)  # ONNX Runtime intra-op threads; 0 = its default
    # ONNX Runtime's workers keep spinning after each call (its default; edge.engine.session_options)
    spin_between_calls: bool = _key(False, bool)


@dataclass
class BatchingConfig:
    max_batch: int = _key(8, int, ge=1, le=1024)
    max_wait_ms: float = _key(5.0, float, ge=0, le=10_000)
    queue_capacity: int = _key(64, int, ge=1)


@dataclass
class DecisionConfig:
    threshold: float | None = _key(None, float, optional=True)
    aggregate: str | None = _key(None, optional=True)


@dataclass
class OverlayConfig:
    accepts_every: int = _key(0, int, ge=0)  # rejects always get one; 0 = never for accepts
    jpeg_quality: int = _key(85, int, ge=1, le=100)


@dataclass
class CurveConfig:
    secret_key: str = _key()  # the publisher's .key_secret
    allowed_keys: str = _key()  # directory of allowed subscribers' public .key files


@dataclass
class PublisherConfig:
    endpoint: str = _key("tcp://127.0.0.1:5556")
    sndhwm: int = _key(1000, int, ge=1)
    linger_ms: int = _key(1000, int, ge=0)
    nodrop: bool = _key(False, bool)
    wait_subscribers: int = _key(0, int, ge=0)
    wait_timeout_s: float = _key(10.0, float, ge=0)
    stats_interval_s: float = _key(1.0, float, gt=0)
    frames: str = _key("none", choices=("none", "reject"))  # full frames of rejects on the `frame` topic
    curve: CurveConfig | None = _key(None, CurveConfig, optional=True)


@dataclass
class ControlConfig:
    endpoint: str | None = _key(None, optional=True)  # REQ/REP for `linegate ctl` (none: no control)
    allowed_keys: str | None = _key(None, optional=True)  # operators' public keys (with CURVE): who may steer
    reader_keys: str | None = _key(None, optional=True)  # public keys that may only run status and replay (CURVE)
    allow_remote: bool = _key(False, bool)  # without CURVE, bind beyond loopback / ipc://
    replay_decisions: int = _key(100_000, int, ge=0)  # decisions (and events) held for replay
    replay_frames_mb: float = _key(256.0, float, ge=0)  # overlays and reject frames held for replay


@dataclass
class MetricsConfig:
    listen: str | None = _key(None, optional=True)  # HOST:PORT of the Prometheus /metrics page


@dataclass
class ServiceConfig:
    stop_timeout_s: float = _key(10.0, float, gt=0)
    max_engine_failures: int = _key(5, int, ge=0)  # failed batches in a row; 0 = never give up
    frame_stall_s: float = _key(10.0, float, gt=0)  # no decision this long: the watchdog starves


@dataclass
class LoggingConfig:
    level: str = _key("info", choices=LOG_LEVELS)


@dataclass
class SourceConfig:
    uri: str = _key()  # the --source forms: camera:0, rtsp://..., folder:PATH, ...
    id: str | None = _key(None, optional=True)
    policy: str | None = _key(None, choices=POLICIES, optional=True)
    roi: list[int] | None = _key(None, list, length=4, optional=True)  # x, y, width, height
    size: list[int] | None = _key(None, list, length=2, optional=True)  # expected width, height
    backoff_s: float | None = _key(None, float, gt=0, optional=True)
    backoff_max_s: float | None = _key(None, float, gt=0, optional=True)
    io_timeout_s: float | None = _key(None, float, gt=0, optional=True)
    reopen_after_s: float | None = _key(None, float, gt=0, optional=True)

    def camera_options(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in CAMERA_OPTIONS if getattr(self, k) is not None}


SECTIONS = {"engine": EngineConfig, "batching": BatchingConfig, "decision": DecisionConfig,
            "overlay": OverlayConfig, "publisher": PublisherConfig, "service": ServiceConfig,
            "logging": LoggingConfig, "control": ControlConfig, "metrics": MetricsConfig}


@dataclass
class Config:
    path: str  # where it came from: a file, or "command line"
    engine: EngineConfig
    batching: BatchingConfig
    decision: DecisionConfig
    overlay: OverlayConfig
    publisher: PublisherConfig
    service: ServiceConfig
    logging: LoggingConfig
    sources: list[SourceConfig]
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(self.path, key, message)


# -- validation ----------------------------------------------------------------------------------

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    return f"{names.get(type(value), type(value).__name__)} {value!r}"


def _check_value(value: Any, meta: dict, where: str, label: str) -> Any:
    kind = meta["kind"]
    fail = lambda msg: ConfigError(where, label, msg)  # noqa: E731
    if kind is bool:
        if not isinstance(value, bool):
            raise fail(f"should be true or false, got {_describe(value)}")
        return value
    if kind is int or kind is float:
        ok = isinstance(value, int) or (kind is float and isinstance(value, float))
        if not ok or isinstance(value, bool):
            raise fail(f"should be {_KIND_NAMES[kind]}, got {_describe(value)}")
        value = float(value) if kind is float else value
        if not math.isfinite(value):  # TOML allows nan and inf
            raise fail(f"must be a finite number, not {value}")
        for bound, test, text in ((meta["ge"], lambda b: value >= b, ">="), (meta["gt"], lambda b: value > b, ">"),
                                  (meta["le"], lambda b: value <= b, "<=")):
            if bound is not None and not test(bound):
                raise fail(f"must be {text} {bound} (got {value})")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise fail(f"should be a string, got {_describe(value)}")
        if not value.strip():
            raise fail("must not be empty")
        if meta["choices"] and value not in meta["choices"]:
            raise fail(f"must be one of {', '.join(meta['choices'])} (got {value!r})")
        return value
    if kind is list:
        n = meta["length"]
        if (not isinstance(value, list) or len(value) != n
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise fail(f"should be an array of {n} integers, got {_describe(value)}")
        return value
    return _section(kind, value, where, label)  # a nested table


def _section(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(where, prefix, f"should be a table, got {_describe(raw)}")
    known = {f.name: f for f in fields(cls)}
    for name in raw:
        if name not in known:
            near = difflib.get_close_matches(name, list(known), n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(where, _join(prefix, name), f"unknown key; {hint}known keys here: "
                              f"{', '.join(known)}")
    values = {}
    for name, f in known.items():
        label = _join(prefix, name)
        if name not in raw:
            if f.default is MISSING:
                raise ConfigError(where, label, "missing; it is required")
            values[name] = f.default
            continue
        values[name] = _check_value(raw[name], f.metadata, where, label)
    return cls(**values)


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return f"key '{name}'"
    if prefix.startswith("key '"):
        return f"key '{prefix[5:-1]}.{name}'"
    return f"{prefix}, key '{name}'"


def _sources(raw: Any, where: str) -> list[SourceConfig]:
    if raw is None:
        raise ConfigError(where, "[[source]]", "no sources; add at least one [[source]] table with a uri")
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise ConfigError(where, "key 'source'", "should be [[source]] tables (an array of tables)")
    if not raw:
        raise ConfigError(where, "[[source]]", "no sources; add at least one [[source]] table with a uri")
    sources, seen = [], {}
    for i, table in enumerate(raw):
        label = f"[[source]] #{i + 1}"
        src = _section(SourceConfig, table, where, label)
        src.id = src.id or f"cam{i}"
        if src.id in seen:
            raise ConfigError(where, f"{label}, key 'id'", f"id {src.id!r} is already used by [[source]] "
                              f"#{seen[src.id] + 1}; ids must be unique")
        seen[src.id] = i
        if src.roi is not None:
            x, y, w, h = src.roi
            if x < 0 or y < 0 or w < 1 or h < 1:
                raise ConfigError(where, f"{label}, key 'roi'", f"[x, y, width, height] needs x, y >= 0 "
                                  f"and width, height >= 1 (got {src.roi})")
        if src.size is not None:
            if min(src.size) < 1:
                raise ConfigError(where, f"{label}, key 'size'", f"[width, height] must be >= 1 (got {src.size})")
            if src.roi is not None and (src.roi[0] + src.roi[2] > src.size[0] or src.roi[1] + src.roi[3] > src.size[1]):
                raise ConfigError(where, f"{label}, key 'roi'", f"{src.roi} does not fit in size {src.size}")
        lo = src.backoff_s if src.backoff_s is not None else 0.5
        if src.backoff_max_s is not None and src.backoff_max_s < lo:
            raise ConfigError(where, f"{label}, key 'backoff_max_s'",
                              f"must be >= backoff_s ({lo}), got {src.backoff_max_s}")
        sources.append(src)
    return sources


def validate(raw: dict[str, Any], where: str) -> Config:
    """A Config from a parsed TOML document (or the same shape built from flags)."""
    allowed = [*SECTIONS, "source"]
    for name in raw:
        if name not in allowed:
            near = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(where, f"key '{name}'", f"unknown section; {hint}known: "
                              f"{', '.join(f'[{s}]' for s in SECTIONS)}, [[source]]")
    if "engine" not in raw:
        raise ConfigError(where, "[engine]", "missing; it needs at least bundle = \"/path/to/bundle\"")
    sections = {name: _section(cls, raw.get(name, {}), where, f"key '{name}'") for name, cls in SECTIONS.items()}
    config = Config(path=where, sources=_sources(raw.get("source"), where), **sections)
    if config.decision.aggregate is not None:
        try:  # the decision rule's own check of the name
            aggregate_maps(np.zeros((1, 1, 1), np.float32), config.decision.aggregate)
        except ValueError as exc:
            raise config.error("key 'decision.aggregate'", str(exc)) from None
    endpoint = config.publisher.endpoint
    if "://" not in endpoint:
        raise config.error("key 'publisher.endpoint'", f"{endpoint!r} is not a ZeroMQ endpoint; use e.g. "
                           "tcp://*:5556 or ipc:///run/linegate/decisions.sock")
    cores = usable_cores()
    if config.engine.threads > cores:
        raise config.error("key 'engine.threads'", f"must be <= {cores}, the cores this process may use on "
                           f"this box (got {config.engine.threads}); 0 lets ONNX Runtime choose")
    _check_control(config)
    return config


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as taskset and systemd's CPUAffinity= set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def is_local_endpoint(endpoint: str) -> bool:
    """ipc:// and inproc:// or a TCP endpoint bound to a loopback address only."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
        return host in LOOPBACK_HOSTS or host.startswith("127.")
    return False


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" -> (host, port); ValueError saying what is expected."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT; use e.g. 127.0.0.1:9108 (or 0.0.0.0:9108 for every "
                         "interface)")
    return host.strip("[]"), int(port)


def _check_control(config: Config) -> None:
    control = config.control
    if config.metrics.listen is not None:
        try:
            parse_listen(config.metrics.listen)
        except ValueError as exc:
            raise config.error("key 'metrics.listen'", str(exc)) from None
    for key, what in (("allowed_keys", "operator keys"), ("reader_keys", "reader keys")):
        if config.publisher.curve is None and getattr(control, key) is not None:  # a list that would protect nothing
            raise config.error(f"key 'control.{key}'", f"{what} need [publisher.curve]: without CURVE the "
                               f"control endpoint knows no keys (anyone who reaches it may steer); turn CURVE on "
                               f"or remove {key}")
    if control.endpoint is None:
        return
    if "://" not in control.endpoint:
        raise config.error("key 'control.endpoint'", f"{control.endpoint!r} is not a ZeroMQ endpoint; use e.g. "
                           "tcp://127.0.0.1:5557 or ipc:///run/linegate/control.sock")
    if control.endpoint == config.publisher.endpoint:
        raise config.error("key 'control.endpoint'", "is the publisher's endpoint; give the control socket "
                           "its own, e.g. tcp://127.0.0.1:5557")
    if config.publisher.curve is not None:
        if control.allowed_keys is None:
            raise config.error("key 'control.allowed_keys'", "missing: the publisher uses CURVE, so the control "
                               "endpoint does too and needs its own allow-list: a directory of the operators' "
                               "public .key files (keys that may only watch must not be in it)")
    elif not control.allow_remote and not is_local_endpoint(control.endpoint):
        raise config.error("key 'control.endpoint'", f"{control.endpoint!r} is reachable from other machines, "
                           "and without CURVE ([publisher.curve]) anyone there could steer the line; bind it to "
                           "127.0.0.1 or ipc://, turn CURVE on, or set [control] allow_remote = true")


def parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, None, f"not valid TOML: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any],
                    sources: list[str] | None = None) -> dict[str, Any]:
    """A copy of a parsed config with dotted keys replaced (``{"batching.max_batch": 4}``),
    e.g. from command-line flags; ``sources`` (URIs) replace every [[source]] table."""
    out = {name: dict(table) if isinstance(table, dict) else table for name, table in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        table = out.setdefault(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"cannot set {dotted}: [{section}] is not a table")
        table[key] = value
    if sources is not None:
        out["source"] = [{"uri": uri} for uri in sources]
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None,
                sources: list[str] | None = None) -> Config:
    """Read and validate a config file (with apply_overrides' changes first, if any);
    ConfigError naming the file and key otherwise."""
    return validate(apply_overrides(read_toml(path), overrides or {}, sources), str(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "no such file; see systemd/linegate.toml for an example") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, f"cannot read it ({exc})") from None
    return parse_toml(text, str(path))


@dataclass
class Checked:
    """What check_files found: the loaded bundle, the sources (not started) and a summary."""

    bundle: Bundle
    sources: list[Source]
    lines: list[str]


def build_sources(config: Config) -> list[Source]:
    """The configured sources with their policy, ROI and expected size (nothing opened yet,
    except that a video file is tried once so a bad path fails now)."""
    sources = []
    for i, sc in enumerate(config.sources):
        try:
            source = parse_source(sc.uri, sc.id, **sc.camera_options())
        except ValueError as exc:
            raise config.error(f"[[source]] #{i + 1}, key 'uri'", str(exc)) from None
        source.policy = sc.policy
        source.roi = (sc.roi[0], sc.roi[1], sc.roi[2], sc.roi[3]) if sc.roi else None
        source.expect_size = (sc.size[0], sc.size[1]) if sc.size else None
        sources.append(source)
    return sources


def check_files(config: Config) -> Checked:
    """The checks that touch the disk, as ``linegate check-config`` and the start run them:
    the bundle (manifest and checksums), each source (folder or video exists and opens;
    cameras are not opened), the CURVE key files."""
    try:
        bundle = load_bundle(config.engine.bundle)
    except ValueError as exc:
        raise config.error("key 'engine.bundle'", str(exc)) from None
    lines = [f"bundle {bundle.path}: model {bundle.model_id}, input {bundle.input_size[1]}x"
             f"{bundle.input_size[0]}, files {', '.join(sorted(bundle.manifest['files']))}",
             f"frame geometry: {bundle.geometry.describe()}"]
    # What `run` would refuse later, before reading a frame, is refused here (check-config too).
    try:
        DecisionRule.from_bundle(bundle, config.decision.threshold, config.decision.aggregate)
    except ValueError as exc:
        raise config.error("key 'decision.aggregate'", str(exc)) from None
    try:
        choice = choose_engine(bundle, config.engine.kind, config.engine.precision)
    except (ValueError, RuntimeError) as exc:  # BundleError, TensorRTUnavailable
        key = "engine.precision" if config.engine.precision and "no " + config.engine.precision in str(exc) \
            else "engine.kind"
        raise config.error(f"key '{key}'", str(exc)) from None
    lines.append(f"engine: {choice.kind} {choice.model.name} ({choice.reason})")
    try:
        check_endpoint(config.publisher.endpoint)
    except ValueError as exc:
        raise config.error("key 'publisher.endpoint'", str(exc)) from None
    sources = build_sources(config)
    for sc, source in zip(config.sources, sources):
        policy = sc.policy or source.default_policy
        lines.append(f"source {sc.id}: {sc.uri} ({type(source).__name__}, policy {policy}"
                     f"{', roi ' + str(sc.roi) if sc.roi else ''}{', size ' + str(sc.size) if sc.size else ''})")
    control = config.control
    control_at = len(lines)  # the control line goes here, once the CURVE keys are counted below
    control_keys_text = ""
    if config.metrics.listen is not None:
        lines.append(f"metrics: http://{config.metrics.listen}/metrics")
    curve = config.publisher.curve
    if curve is not None:
        try:
            load_secret_key(curve.secret_key)
        except ValueError as exc:
            raise config.error("key 'publisher.curve.secret_key'", str(exc)) from None
        try:
            n = len(allowed_keys(curve.allowed_keys))
        except ValueError as exc:
            raise config.error("key 'publisher.curve.allowed_keys'", str(exc)) from None
        lines.append(f"CURVE: server key {curve.secret_key}, {n} allowed subscriber key(s)")
        if control.endpoint is not None and control.allowed_keys is not None:
            for key in ("allowed_keys", "reader_keys"):  # each folder's own checks, named by its key
                folder = getattr(control, key)
                if folder is not None:
                    try:
                        allowed_keys(folder)
                    except ValueError as exc:
                        raise config.error(f"key 'control.{key}'", str(exc)) from None
            try:  # one name (file stem) for two different keys across the folders
                keys = control_keys(control.allowed_keys, control.reader_keys)
            except ValueError as exc:
                raise config.error("key 'control.reader_keys'", str(exc)) from None
            lines.append(f"control allow-list: {control.allowed_keys}, {len(keys.operators)} operator key(s)")
            if control.reader_keys is not None:
                lines.append(f"control reader keys: {control.reader_keys}, {len(keys.readers)} reader key(s) "
                             f"(may only run {', '.join(READ_COMMANDS)})")
            for operator_file, reader_file in keys.both:
                lines.append(f"control: {operator_file} is in both lists (as {reader_file}): an operator")
            control_keys_text = f", {len(keys.operators)} operator key(s), {len(keys.readers)} reader key(s)"
    if control.endpoint is not None:
        lines.insert(control_at, f"control: {control.endpoint} ({'CURVE' if curve else 'no CURVE'}"
                     f"{control_keys_text}; replay {control.replay_decisions} decisions, "
                     f"{control.replay_frames_mb:g} MB of frames)")
    return Checked(bundle, sources, lines)
