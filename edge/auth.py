"""CURVE encryption and authentication for the publisher, with pyzmq's own auth (zmq.auth).

Keys are ZeroMQ certificate files as ``zmq.auth.create_certificates`` writes them (and
``linegate keys`` calls it): ``NAME.key`` holds the public key, ``NAME.key_secret`` both.
- The publisher (CURVE server) loads its ``.key_secret`` and an allow-list: a directory of
  subscribers' public ``.key`` files. A ThreadAuthenticator (ZAP) on the publisher's own
  context admits only those keys; any other client never completes the handshake and so
  receives nothing.
- A subscriber (CURVE client) needs the server's public key (its ``.key`` file or the
  40-character Z85 text) and its own ``.key_secret``.
The allow-list is read at start: restart the service after adding a subscriber's key.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

Z85_KEY_LENGTH = 40


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ValueError("this libzmq was built without CURVE (libsodium); install pyzmq from PyPI, "
                         "whose wheels include it")


def make_keypair(directory: str | Path, name: str) -> tuple[Path, Path]:
    """Write DIRECTORY/NAME.key (public, to share) and NAME.key_secret (mode 0600, keep private).

    Refuses to overwrite an existing pair: a replaced key locks its subscribers out.
    """
    _require_curve()
    directory = Path(directory)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ValueError(f"{path} exists; remove it first or pick another --name")
    directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret is never readable by others, not even briefly
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    return Path(public_file), Path(secret_file)


def _check_z85(key: bytes | None, path: Path, what: str) -> None:
    """A key pyzmq read from a certificate file is 40 Z85 characters, or the file is damaged
    (setting a bad key on a socket fails later, far from the file)."""
    try:
        ok = key is not None and len(key) == Z85_KEY_LENGTH and len(z85.decode(key)) == 32
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{path}: its {what} key is not 40 Z85 characters (the file is damaged); "
                         "make a new pair with `linegate keys DIR --name NAME`")


def _read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except PermissionError:
        raise ValueError(f"{path}: not readable by user {_user()}; the service runs as that user: give its "
                         "group read access (chgrp linegate FILE; chmod 640 FILE for a secret key)") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a ZeroMQ certificate ({exc})") from exc


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def load_secret_key(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file, or ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such key file; make a pair with `linegate keys DIR --name NAME`")
    public, secret = _read_certificate(path)
    if secret is None:
        raise ValueError(f"{path}: holds only a public key; give the matching .key_secret file")
    _check_z85(public, path, "public")
    _check_z85(secret, path, "secret")
    if path.stat().st_mode & 0o004:
        log.warning("%s: the secret key is readable by every user on this box; chmod o-r it", path)
    return public, secret


def load_public_key(text_or_path: str | Path) -> bytes:
    """A public key from a certificate file (``.key`` or ``.key_secret``) or its 40-char Z85 text."""
    text = str(text_or_path)
    if len(text) == Z85_KEY_LENGTH and not Path(text).exists():
        try:
            z85.decode(text)
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"server key {text!r}: not a Z85 key ({exc})") from exc
        return text.encode("ascii")
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"{path}: no such key file (give the publisher's .key file or its 40-character "
                         "public key)")
    public = _read_certificate(path)[0]
    _check_z85(public, path, "public")
    return public


def allowed_keys(directory: str | Path) -> list[bytes]:
    """The public keys of the ``*.key`` files in an allow-list directory; ValueError if none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory; it must hold the allowed subscribers' "
                         "public .key files")
    if not os.access(directory, os.R_OK | os.X_OK):  # glob() would quietly find nothing in it
        raise ValueError(f"{directory}: not readable by user {_user()}, which runs linegate; give that user "
                         "read access to the allow-list folder (chgrp linegate DIR; chmod 750 DIR)")
    keys = [key for _, key in _allowed_files(directory)]
    if not keys:
        raise ValueError(f"{directory}: no *.key files; copy each allowed subscriber's public key "
                         "(made by `linegate keys`) into it")
    return keys


def _allowed_files(directory: Path) -> list[tuple[Path, bytes]]:
    """(file, public key) of each ``*.key`` file in an allow-list folder, each named on error."""
    out = []
    for path in sorted(directory.glob("*.key")):  # what zmq.auth.load_certificates reads
        public = _read_certificate(path)[0]
        _check_z85(public, path, "public")
        out.append((path, public))
    return out


READ_COMMANDS = ("status", "replay")  # what a control reader key may run


@dataclass(frozen=True)
class ControlKeys:
    """The control endpoint's keys under CURVE, Z85 key -> name (its file stem, the ``who`` of
    a change): operators ([control] allowed_keys) may run every command, readers
    ([control] reader_keys) only READ_COMMANDS. A key in both folders is an operator only;
    ``both`` holds its two files."""

    operators: dict[bytes, str]
    readers: dict[bytes, str]
    both: list[tuple[Path, Path]]

    @property
    def names(self) -> dict[bytes, str]:
        return {**self.readers, **self.operators}


def control_keys(allowed_dir: str | Path, reader_dir: str | Path | None = None) -> ControlKeys:
    """Read both control folders (the checks of ``allowed_keys``); ValueError naming a folder,
    or both files when one name (file stem) stands for two different keys."""
    files = {}
    for directory in (allowed_dir, reader_dir):
        if directory is not None:
            allowed_keys(directory)  # the folder exists, is readable and holds keys
            files[directory] = [(p, z85.encode(z85.decode(k))) for p, k in _allowed_files(Path(directory))]
    operators = {key: path for path, key in files[allowed_dir]}
    stems = {path.stem: (path, key) for path, key in files[allowed_dir]}
    readers, both = {}, []
    for path, key in files.get(reader_dir, []):
        same = stems.get(path.stem)
        if same is not None and same[1] != key:
            raise ValueError(f"{same[0]} and {path} are two different keys with one name ({path.stem!r}), "
                             "and a control key's name is who made a change: rename one of them")
        if key in operators:
            both.append((operators[key], path))
        else:
            readers[key] = path.stem
    return ControlKeys({k: p.stem for k, p in operators.items()}, readers, both)


@dataclass(frozen=True)
class CurveServer:
    """The publisher's side of CURVE: its secret key file and the allow-list directory."""

    secret_key: Path
    allowed_keys: Path

    def validate(self) -> int:
        """Check both exist and hold keys; the number of allowed subscriber keys."""
        _require_curve()
        load_secret_key(self.secret_key)
        return len(allowed_keys(self.allowed_keys))

    def start(self, context: zmq.Context, socket: zmq.Socket) -> "CurveGuard":
        """Start the ZAP authenticator on ``context`` and make ``socket`` a CURVE server.

        Call before bind(); stop the returned authenticator after closing the socket.
        """
        count = self.validate()
        public, secret = load_secret_key(self.secret_key)
        try:  # the socket's keys first: a key the socket refuses must not leave a ZAP thread behind
            socket.curve_secretkey = secret
            socket.curve_publickey = public
            socket.curve_server = True
        except zmq.ZMQError as exc:
            raise ValueError(f"{self.secret_key}: ZeroMQ refused the key pair ({exc}); make a new pair "
                             "with `linegate keys DIR --name NAME`") from None
        auth = ThreadAuthenticator(context, log=logging.getLogger("edge.auth.zap"))
        auth.start()
        try:
            # our own check of the allow-list (pyzmq's ZAP callback hook), so that a refused
            # key is logged here, on the runtime: the refused client is told nothing
            auth.configure_curve_callback(domain="*", credentials_provider=AllowList(self.allowed_keys))
            guard = CurveGuard(auth, HandshakeMonitor(socket))
        except Exception:
            auth.stop()
            raise
        log.info("CURVE on: %d allowed subscriber key(s) from %s", count, self.allowed_keys)
        return guard


class RateLimitedLog:
    """Log the first occurrence of each key at once, then at most one line per ``every_s``
    with the count since: a client retrying every 100 ms must not flood the journal."""

    def __init__(self, every_s: float = 60.0, max_keys: int = 1000, clock=time.monotonic) -> None:
        self.every_s, self.max_keys, self.clock = every_s, max_keys, clock
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last logged, suppressed since)

    def __call__(self, key: str, message: str, *args: object) -> bool:
        now = self.clock()
        last, suppressed = self._seen.get(key, (None, 0))
        if last is not None and now - last < self.every_s:
            self._seen[key] = (last, suppressed + 1)
            return False
        if len(self._seen) >= self.max_keys and key not in self._seen:
            self._seen.pop(next(iter(self._seen)))  # the oldest key: memory stays bounded
        self._seen[key] = (now, 0)
        more = f" ({suppressed} more time(s) in the last {self.every_s:.0f} s)" if suppressed else ""
        log.warning(message + more, *args)
        return True


class AllowList:
    """The CURVE allow-list as pyzmq's ZAP handler asks it (``callback(domain, key)``): the
    public keys of the folder's ``*.key`` files, by name (the file stem)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.names = {z85_key: path.stem for path, z85_key in _allowed_files(self.directory)}
        self._refused = RateLimitedLog()

    def callback(self, _domain: str, key: bytes) -> bool:
        if key in self.names:
            return True
        text = key.decode("ascii", "replace")
        self._refused(text, "CURVE: refused a subscriber whose public key %s is not in the allow-list %s; "
                      "to let it in, copy its .key file there and restart linegate", text, self.directory)
        return False


class HandshakeMonitor:
    """Handshakes that fail before ZAP is asked: a plain (non-CURVE) subscriber against this
    CURVE publisher, or one that has the wrong server key. libzmq reports them only as
    socket monitor events; this thread reads them and logs them (rate-limited)."""

    REASONS = {
        zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "a subscriber without CURVE (plain) tried to connect; "
                                                    "give it --server-key and --client-key",
        zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a subscriber's CURVE handshake failed to decrypt: it has "
                                               "the wrong server public key for this publisher",
    }

    def __init__(self, socket: zmq.Socket) -> None:
        events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        self._pair = socket.get_monitor_socket(events)
        self._log = RateLimitedLog()
        self.thread = threading.Thread(target=self._run, name="curve-monitor", daemon=True)
        self.thread.start()

    @classmethod
    def reason(cls, event: int, value: int) -> str:
        """What a failed handshake means, for the log. A PROTOCOL event's value is a ZMTP
        protocol code; a NO_DETAIL event's value is an errno (the connection broke)."""
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return cls.REASONS.get(value, f"a subscriber's handshake failed (ZeroMQ protocol error {value:#x})")
        # A plain subscriber sees the mismatch too and hangs up; when it hangs up before this
        # side has read its greeting, the only trace here is a broken connection (EPIPE or
        # ECONNRESET), and a plain libzmq client does not retry after a mismatch.
        return (f"a subscriber hung up during the handshake ({os.strerror(value)}): most often one without "
                "CURVE (plain), which gives up at the mismatch, or one with the wrong server key; give it "
                "--server-key and --client-key")

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        try:
            while True:
                event = recv_monitor_message(self._pair)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                self._log(f"{event['event']}:{event['value']}", "CURVE: %s",
                          self.reason(event["event"], event["value"]))
        except zmq.ZMQError:  # the context is ending
            return
        finally:
            self._pair.close(linger=0)

    def stop(self, timeout_s: float = 2.0) -> None:
        """After the monitored socket closed (which sends MONITOR_STOPPED)."""
        self.thread.join(timeout_s)


@dataclass
class CurveGuard:
    """What CurveServer.start leaves running: the ZAP authenticator and the handshake monitor."""

    auth: ThreadAuthenticator
    monitor: HandshakeMonitor

    def stop(self) -> None:
        self.monitor.stop()
        self.auth.stop()


@dataclass(frozen=True)
class CurveClient:
    """A subscriber's side of CURVE: the server's public key and the client's own key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: str | Path, client_secret_key: str | Path) -> "CurveClient":
        _require_curve()
        public, secret = load_secret_key(client_secret_key)
        return cls(load_public_key(server_key), public, secret)

    def apply(self, socket: zmq.Socket) -> None:
        """Set the keys on a socket before connect()."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
