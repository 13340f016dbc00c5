"""Who may do what on the view: roles `viewer` (read-only, the default) and `operator` (steers).

Users come from a TOML file (``linegate view --auth FILE``)::

    anonymous = "viewer"        # someone not logged in: "viewer" (default) or "none"
    [[user]]
    name = "alice"
    role = "operator"
    password = "pbkdf2_sha256$600000$..."   # from `linegate view --hash-password`
    [[user]]
    name = "hmi-screen"
    role = "viewer"
    token = "a long random string"          # for a kiosk or a script: ?token=... or
                                            # Authorization: Bearer ...

A login (password or token) gets a random session id in an HttpOnly, SameSite=Strict cookie.
Passwords are stored as PBKDF2-SHA256 hashes (hashlib), tokens compared in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROLES = ("viewer", "operator")
PBKDF2_ITERATIONS = 600_000
SESSION_S = 12 * 3600  # one shift and a half


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def operator(self) -> bool:
        return self.role == "operator"


ANONYMOUS = User("anonymous", "viewer")


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), iterations).hex()
    return f"pbkdf2_sha256${iterations}${salt}${digest}"


def check_password(password: str, stored: str) -> bool:
    try:
        kind, iterations, salt, digest = stored.split("$")
        if kind != "pbkdf2_sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations)).hex()
    except ValueError:
        return False
    return hmac.compare_digest(got, digest)


class Users:
    """The users of one auth file, and the sessions of those who logged in."""

    def __init__(self, users: list[dict] | None = None, anonymous: str = "viewer", where: str = "--auth") -> None:
        if anonymous not in ("viewer", "none"):
            raise ValueError(f"{where}: anonymous = {anonymous!r}: use \"viewer\" or \"none\"")
        self.anonymous = ANONYMOUS if anonymous == "viewer" else None
        self._passwords: dict[str, tuple[User, str]] = {}
        self._tokens: list[tuple[User, str]] = []
        for i, entry in enumerate(users or []):
            what = f"{where}: [[user]] #{i + 1}"
            name, role = entry.get("name"), entry.get("role", "viewer")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{what}: needs name = \"...\"")
            if role not in ROLES:
                raise ValueError(f"{what} ({name}): role = {role!r}: use one of {', '.join(ROLES)}")
            unknown = set(entry) - {"name", "role", "password", "token"}
            if unknown:
                raise ValueError(f"{what} ({name}): unknown key(s) {', '.join(sorted(unknown))}")
            user = User(name, role)
            if "password" in entry:
                if not str(entry["password"]).startswith("pbkdf2_sha256$"):
                    raise ValueError(f"{what} ({name}): password must be a hash made by "
                                     "`linegate view --hash-password`, not the password itself")
                self._passwords[name] = (user, entry["password"])
            if "token" in entry:
                if len(str(entry["token"])) < 16:
                    raise ValueError(f"{what} ({name}): token must be at least 16 characters "
                                     "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe())')")
                self._tokens.append((user, str(entry["token"])))
            if "password" not in entry and "token" not in entry:
                raise ValueError(f"{what} ({name}): give a password (hash) or a token")
        self._sessions: dict[str, tuple[User, float]] = {}

    @classmethod
    def load(cls, path: str | Path | None) -> Users:
        if path is None:
            return cls()
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"--auth {path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--auth {path}: not valid TOML ({exc})") from None
        unknown = set(data) - {"anonymous", "user"}
        if unknown:
            raise ValueError(f"--auth {path}: unknown key(s) {', '.join(sorted(unknown))}; "
                             "expected anonymous and [[user]] tables")
        return cls(data.get("user", []), data.get("anonymous", "viewer"), f"--auth {path}")

    def by_password(self, name: str, password: str) -> User | None:
        found = self._passwords.get(name)
        if found is None:
            check_password(password, hash_password("x", 1000))  # same shape of work either way
            return None
        return found[0] if check_password(password, found[1]) else None

    def by_token(self, token: str) -> User | None:
        match = None
        for user, known in self._tokens:  # every entry compared: no early exit to time
            if hmac.compare_digest(token.encode(), known.encode()):
                match = user
        return match

    def open_session(self, user: User) -> str:
        now = time.time()
        self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = (user, now + SESSION_S)
        return sid

    def close_session(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def by_session(self, sid: str) -> User | None:
        found = self._sessions.get(sid)
        if found is None or found[1] < time.time():
            return None
        return found[0]
