"""The record: decisions, events, images and gaps in SQLite (default, WAL) or PostgreSQL.

One schema for both back ends, created and migrated by the recorder (``open_store(target,
create=True)``), with its version in ``schema_version``. Readers (``linegate history``, the
view) open an existing record and refuse one made by a newer linegate.

Tables (version 1):
  decisions  every decision header: typed columns to query by, plus the whole header as JSON
             text (keys a later runtime adds are kept too). Unique (run_id, seq): replays and
             restarts never store a decision twice.
  events     every `event` message (threshold, pause, load, ...), unique (run_id, seq).
  images     one row per overlay or full-resolution frame written to the image store, linked to
             its decision by (run_id, decision_seq); retention sets deleted_ts and removes the
             file, the row stays (it says an image existed and when it went).
  gaps       seqs of a topic that are not on record and never will be: which, and when noticed.
  runs       each publisher run (run_id) seen: its line and when.
  lines      per line (a recorder's --line), its image root, so readers find the files.

Design choices: the header is kept as JSON *text* (not JSONB) because PostgreSQL's json types
refuse NaN, which an `error` decision's score is; typed float columns hold NULL instead. SQL is
written once with ``?`` placeholders and adapted to psycopg's ``%s``.
"""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

SCHEMA_VERSION = 1

# Header keys with a typed column of their own in `decisions` (others live in `header` only).
DECISION_COLUMNS = {
    "v": "INTEGER", "camera_id": "TEXT", "frame_id": "BIGINT", "capture_ts": "DOUBLE PRECISION",
    "publish_ts": "DOUBLE PRECISION", "score": "DOUBLE PRECISION", "score_norm": "DOUBLE PRECISION",
    "threshold": "DOUBLE PRECISION", "decision": "TEXT", "aggregate": "TEXT", "model_id": "TEXT",
    "source": "TEXT", "label": "TEXT", "batch": "BIGINT", "error": "TEXT",
}
EVENT_COLUMNS = {
    "publish_ts": "DOUBLE PRECISION", "who": "TEXT", "what": "TEXT", "settings_version": "BIGINT",
    "camera_id": "TEXT",
}


def _migrations(pg: bool) -> dict[int, list[str]]:
    """DDL per schema version. Only append versions; never edit a released one."""
    ident = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY" if pg else "INTEGER PRIMARY KEY AUTOINCREMENT"
    dcols = ", ".join(f"{name} {kind}" for name, kind in DECISION_COLUMNS.items())
    ecols = ", ".join(f"{name} {kind}" for name, kind in EVENT_COLUMNS.items())
    return {1: [
        f"CREATE TABLE runs (run_id TEXT PRIMARY KEY, line TEXT, first_seen_ts DOUBLE PRECISION, "
        f"last_seen_ts DOUBLE PRECISION)",
        "CREATE TABLE lines (line TEXT PRIMARY KEY, image_root TEXT, endpoint TEXT, updated_ts DOUBLE PRECISION)",
        f"CREATE TABLE decisions (id {ident}, run_id TEXT NOT NULL, seq BIGINT NOT NULL, line TEXT, "
        f"{dcols}, header TEXT NOT NULL, recorded_ts DOUBLE PRECISION NOT NULL, "
        f"replayed INTEGER NOT NULL DEFAULT 0, UNIQUE (run_id, seq))",
        "CREATE INDEX decisions_capture ON decisions (capture_ts)",
        "CREATE INDEX decisions_camera_capture ON decisions (camera_id, capture_ts)",
        f"CREATE TABLE events (id {ident}, run_id TEXT NOT NULL, seq BIGINT NOT NULL, line TEXT, "
        f"{ecols}, before_value TEXT, after_value TEXT, header TEXT NOT NULL, "
        f"recorded_ts DOUBLE PRECISION NOT NULL, UNIQUE (run_id, seq))",
        f"CREATE TABLE images (id {ident}, run_id TEXT NOT NULL, topic TEXT NOT NULL, seq BIGINT NOT NULL, "
        f"decision_seq BIGINT, line TEXT, camera_id TEXT, capture_ts DOUBLE PRECISION, path TEXT NOT NULL, "
        f"bytes BIGINT NOT NULL, written_ts DOUBLE PRECISION NOT NULL, deleted_ts DOUBLE PRECISION, "
        f"UNIQUE (run_id, topic, seq))",
        "CREATE INDEX images_decision ON images (run_id, decision_seq)",
        "CREATE INDEX images_age ON images (deleted_ts, capture_ts)",
        f"CREATE TABLE gaps (id {ident}, run_id TEXT NOT NULL, topic TEXT NOT NULL, first_seq BIGINT NOT NULL, "
        f"last_seq BIGINT, line TEXT, noticed_ts DOUBLE PRECISION NOT NULL, reason TEXT NOT NULL)",
    ]}


class StoreError(RuntimeError):
    """The record cannot be opened or used (named target, and what to do)."""


class StoreUnavailable(StoreError):
    """The database server does not answer: a state that may pass (a restart may cure it)."""


def _finite(value: Any) -> Any:
    """NULL for NaN/inf (an `error` decision's score): SQLite and PostgreSQL disagree on NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _typed(value: Any, kind: str) -> Any:
    """A header value for a typed column, or None when it does not fit (the JSON keeps it)."""
    if value is None:
        return None
    if kind in ("INTEGER", "BIGINT"):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "DOUBLE PRECISION":
        return _finite(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return value if isinstance(value, str) else str(value)


def header_json(header: dict[str, Any]) -> str:
    """The header as JSON text; bytes values (none expected) become their length."""
    return json.dumps(header, default=lambda o: f"<{len(o)} bytes>" if isinstance(o, bytes) else str(o))


def _load_header(text: str) -> dict[str, Any]:
    return json.loads(text)  # Python's json reads back the NaN it wrote


class Store:
    """A connection to the record. Thread safe (one lock around the connection)."""

    def __init__(self, target: str, conn: Any, pg: bool) -> None:
        self.target = target
        self._conn = conn
        self.pg = pg
        self._lock = threading.RLock()

    # -- plumbing -----------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            cur = self._conn.execute(self._sql(sql), tuple(params))
            rows = cur.fetchall()
            if not self.pg:
                cur.close()
            return rows

    @contextmanager
    def _transaction(self, exclusive: bool = False) -> Iterator[Any]:
        """A cursor inside one transaction: committed on success, rolled back on any error."""
        with self._lock:
            if self.pg:
                with self._conn.transaction(), self._conn.cursor() as cur:
                    yield cur
                return
            cur = self._conn.cursor()
            # IMMEDIATE takes the write lock up front, so a reader can't make us fail half way.
            cur.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
            try:
                yield cur
            except BaseException:
                self._conn.rollback()
                raise
            else:
                self._conn.commit()
            finally:
                cur.close()

    def _execute_many(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            cur.executemany(self._sql(sql), rows)

    def _version(self) -> int | None:
        try:
            rows = self._query("SELECT MAX(version) FROM schema_version")
        except Exception:  # noqa: BLE001 - no such table: sqlite3 and psycopg raise different types
            return None
        return rows[0][0] if rows else None

    def migrate(self) -> int:
        """Create or upgrade the schema to SCHEMA_VERSION; returns the version found before (0: new)."""
        with self._transaction(exclusive=True) as cur:
            if self.pg:
                # Many recorders may start at once against one plant database: one migrates.
                cur.execute("SELECT pg_advisory_xact_lock(7233470)")
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, "
                        "applied_ts DOUBLE PRECISION NOT NULL)")
            cur.execute("SELECT MAX(version) FROM schema_version")
            found = cur.fetchone()[0] or 0
            if found > SCHEMA_VERSION:
                raise StoreError(f"{self.target}: the record has schema version {found}, this linegate "
                                 f"knows up to {SCHEMA_VERSION}; upgrade linegate on this machine")
            for version, statements in sorted(_migrations(self.pg).items()):
                if version <= found:
                    continue
                for statement in statements:
                    cur.execute(statement)
                cur.execute(self._sql("INSERT INTO schema_version (version, applied_ts) VALUES (?, ?)"),
                            (version, time.time()))
        return found

    def check_readable(self) -> None:
        version = self._version()
        if version is None:
            raise StoreError(f"{self.target}: not a linegate record (no schema_version table); "
                             "`linegate record ENDPOINT --db TARGET` creates one")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.target}: the record has schema version {version}, this linegate "
                             f"reads up to {SCHEMA_VERSION}; upgrade linegate on this machine")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing (the recorder) ---------------------------------------------------------------

    def write(self, decisions: Iterable[tuple[dict, bool]] = (), events: Iterable[dict] = (),
              images: Iterable[dict] = (), gaps: Iterable[dict] = (), runs: Iterable[tuple[str, str]] = (),
              line: str | None = None) -> None:
        """Store a batch in one transaction. Duplicates (same run_id and seq) are ignored.

        decisions: (header, replayed); events: headers; images: dicts with run_id, topic, seq,
        decision_seq, camera_id, capture_ts, path, bytes; gaps: run_id, topic, first_seq,
        last_seq, noticed_ts, reason; runs: (run_id, line).
        """
        now = time.time()
        dnames = list(DECISION_COLUMNS)
        drows = [(h["run_id"], h["seq"], line, *(_typed(h.get(k), DECISION_COLUMNS[k]) for k in dnames),
                  header_json(h), now, int(replayed)) for h, replayed in decisions]
        enames = list(EVENT_COLUMNS)
        erows = [(h["run_id"], h["seq"], line, *(_typed(h.get(k), EVENT_COLUMNS[k]) for k in enames),
                  json.dumps(h.get("before"), default=str), json.dumps(h.get("after"), default=str),
                  header_json(h), now) for h in events]
        irows = [(i["run_id"], i["topic"], i["seq"], i.get("decision_seq"), line, i.get("camera_id"),
                  _typed(i.get("capture_ts"), "DOUBLE PRECISION"), i["path"], i["bytes"], now) for i in images]
        grows = [(g["run_id"], g["topic"], g["first_seq"], g.get("last_seq"), line, g["noticed_ts"], g["reason"])
                 for g in gaps]
        run_rows = [(run_id, run_line, now, now) for run_id, run_line in runs]
        with self._transaction() as cur:
            self._execute_many(cur, "INSERT INTO runs (run_id, line, first_seen_ts, last_seen_ts) "
                                    "VALUES (?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                                    "last_seen_ts = excluded.last_seen_ts", run_rows)
            self._execute_many(cur, f"INSERT INTO decisions (run_id, seq, line, {', '.join(dnames)}, header, "
                                    f"recorded_ts, replayed) VALUES ({', '.join('?' * (len(dnames) + 6))}) "
                                    "ON CONFLICT (run_id, seq) DO NOTHING", drows)
            self._execute_many(cur, f"INSERT INTO events (run_id, seq, line, {', '.join(enames)}, before_value, "
                                    f"after_value, header, recorded_ts) VALUES "
                                    f"({', '.join('?' * (len(enames) + 7))}) ON CONFLICT (run_id, seq) DO NOTHING",
                               erows)
            self._execute_many(cur, "INSERT INTO images (run_id, topic, seq, decision_seq, line, camera_id, "
                                    "capture_ts, path, bytes, written_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                                    "ON CONFLICT (run_id, topic, seq) DO UPDATE SET deleted_ts = NULL, "
                                    "path = excluded.path, bytes = excluded.bytes", irows)
            self._execute_many(cur, "INSERT INTO gaps (run_id, topic, first_seq, last_seq, line, noticed_ts, "
                                    "reason) VALUES (?, ?, ?, ?, ?, ?, ?)", grows)

    def set_line(self, line: str, image_root: str | None, endpoint: str) -> None:
        with self._transaction() as cur:
            cur.execute(self._sql(
                "INSERT INTO lines (line, image_root, endpoint, updated_ts) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (line) DO UPDATE SET image_root = excluded.image_root, "
                "endpoint = excluded.endpoint, updated_ts = excluded.updated_ts"),
                (line, image_root, endpoint, time.time()))

    def max_seq(self, run_id: str, topic: str) -> int | None:
        """The highest seq on record for (run_id, topic), gaps rows included (they are on record
        too: as known losses), or None."""
        if topic == "decision":
            sql, params = "SELECT MAX(seq) FROM decisions WHERE run_id = ?", (run_id,)
        elif topic == "event":
            sql, params = "SELECT MAX(seq) FROM events WHERE run_id = ?", (run_id,)
        else:
            sql, params = "SELECT MAX(seq) FROM images WHERE run_id = ? AND topic = ?", (run_id, topic)
        stored = self._query(sql, params)[0][0]
        lost = self._query("SELECT MAX(last_seq) FROM gaps WHERE run_id = ? AND topic = ?", (run_id, topic))[0][0]
        values = [v for v in (stored, lost) if v is not None]
        return max(values) if values else None

    def latest_run(self, line: str) -> str | None:
        rows = self._query("SELECT run_id FROM runs WHERE line = ? ORDER BY last_seen_ts DESC LIMIT 1", (line,))
        return rows[0][0] if rows else None

    def image_bytes(self, line: str) -> int:
        """Bytes of this line's images still in the image store."""
        rows = self._query("SELECT COALESCE(SUM(bytes), 0) FROM images WHERE deleted_ts IS NULL AND "
                           "line = ?", (line,))
        return int(rows[0][0])

    def oldest_images(self, line: str, limit: int, before_ts: float | None = None) -> list[tuple[int, str, int]]:
        """(id, path, bytes) of this line's oldest images still present (by capture time)."""
        sql = "SELECT id, path, bytes FROM images WHERE deleted_ts IS NULL AND line = ?"
        params: list[Any] = [line]
        if before_ts is not None:
            sql += " AND capture_ts < ?"
            params.append(before_ts)
        sql += " ORDER BY capture_ts, id LIMIT ?"
        return [(int(r[0]), r[1], int(r[2])) for r in self._query(sql, [*params, limit])]

    def mark_deleted(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        now = time.time()
        with self._transaction() as cur:
            self._execute_many(cur, "UPDATE images SET deleted_ts = ? WHERE id = ?", [(now, i) for i in ids])

    # -- reading (history, view): the read API of CONTRACT.md --------------------------------------

    @property
    def image_root(self) -> Path | None:
        """Where frame_path and overlay_path are relative to (the most recently started line's)."""
        rows = self._query("SELECT image_root FROM lines WHERE image_root IS NOT NULL "
                           "ORDER BY updated_ts DESC LIMIT 1")
        return Path(rows[0][0]) if rows else None

    def image_roots(self) -> dict[str, Path]:
        """Each line's image root (several lines may share a PostgreSQL record); a decision's
        "line" says which root its paths are relative to."""
        rows = self._query("SELECT line, image_root FROM lines WHERE image_root IS NOT NULL")
        return {line: Path(root) for line, root in rows}

    _DECISION_SELECT = (
        "SELECT d.id, d.header, d.line, d.recorded_ts, d.replayed, "
        "(SELECT i.path FROM images i WHERE i.run_id = d.run_id AND i.decision_seq = d.seq AND "
        " i.topic = 'frame' AND i.deleted_ts IS NULL ORDER BY i.id DESC LIMIT 1), "
        "(SELECT i.path FROM images i WHERE i.run_id = d.run_id AND i.decision_seq = d.seq AND "
        " i.topic = 'overlay' AND i.deleted_ts IS NULL ORDER BY i.id DESC LIMIT 1) "
        "FROM decisions d")

    @staticmethod
    def _decision_dict(row: tuple) -> dict[str, Any]:
        header = _load_header(row[1])
        header.update(id=int(row[0]), line=row[2], recorded_ts=row[3], replayed=bool(row[4]),
                      frame_path=row[5], overlay_path=row[6])
        return header

    def decisions(self, since: float | None = None, until: float | None = None, camera: str | None = None,
                  decision: str | None = None, limit: int = 1000, run_id: str | None = None,
                  seq: int | None = None, oldest_first: bool = False, line: str | None = None) -> list[dict[str, Any]]:
        """Decisions, newest first (by capture time): every header field plus "id" (row id),
        "frame_path" and "overlay_path" (relative to image_root; None when not kept or gone
        to retention), "line", "recorded_ts" and "replayed" (came by a replay request)."""
        where, params = [], []
        for clause, value in (("d.capture_ts >= ?", since), ("d.capture_ts < ?", until),
                              ("d.camera_id = ?", camera), ("d.decision = ?", decision),
                              ("d.run_id = ?", run_id), ("d.seq = ?", seq), ("d.line = ?", line)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = self._DECISION_SELECT + (" WHERE " + " AND ".join(where) if where else "")
        order = "ASC" if oldest_first else "DESC"
        sql += f" ORDER BY d.capture_ts {order}, d.id {order} LIMIT ?"
        return [self._decision_dict(r) for r in self._query(sql, [*params, int(limit)])]

    def decision_by_id(self, row_id: int) -> dict[str, Any] | None:
        rows = self._query(self._DECISION_SELECT + " WHERE d.id = ?", (int(row_id),))
        return self._decision_dict(rows[0]) if rows else None

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """Events, newest first: every header field plus "id" and "recorded_ts"."""
        rows = self._query("SELECT id, header, recorded_ts FROM events ORDER BY publish_ts DESC, id DESC LIMIT ?",
                           (int(limit),))
        return [{**_load_header(r[1]), "id": int(r[0]), "recorded_ts": r[2]} for r in rows]

    def scores(self, limit: int) -> list[tuple[float, float, str]]:
        """(score, threshold, decision) of the last `limit` decisions, newest first. An `error`
        decision has no score: NaN (and its threshold as published)."""
        rows = self._query("SELECT score, threshold, decision FROM decisions ORDER BY capture_ts DESC, id DESC "
                           "LIMIT ?", (int(limit),))
        nan = float("nan")
        return [(nan if s is None else float(s), nan if t is None else float(t), d) for s, t, d in rows]

    def gaps(self, limit: int = 1000, run_id: str | None = None) -> list[dict[str, Any]]:
        """Known losses, newest first: run_id, topic, first_seq, last_seq (None: unknown end),
        line, noticed_ts, reason."""
        sql = "SELECT id, run_id, topic, first_seq, last_seq, line, noticed_ts, reason FROM gaps"
        params: list[Any] = []
        if run_id is not None:
            sql += " WHERE run_id = ?"
            params.append(run_id)
        rows = self._query(sql + " ORDER BY noticed_ts DESC, id DESC LIMIT ?", [*params, int(limit)])
        keys = ("id", "run_id", "topic", "first_seq", "last_seq", "line", "noticed_ts", "reason")
        return [dict(zip(keys, r)) for r in rows]

    def images_of(self, run_id: str, decision_seq: int) -> list[dict[str, Any]]:
        rows = self._query("SELECT topic, path, bytes, deleted_ts FROM images WHERE run_id = ? AND decision_seq = ? "
                           "ORDER BY id", (run_id, int(decision_seq)))
        return [dict(zip(("topic", "path", "bytes", "deleted_ts"), r)) for r in rows]

    def count(self, table: str, run_id: str | None = None) -> int:
        if table not in ("decisions", "events", "images", "gaps"):
            raise ValueError(f"no table {table!r}")
        sql, params = f"SELECT COUNT(*) FROM {table}", []
        if run_id is not None:
            sql += " WHERE run_id = ?"
            params.append(run_id)
        return int(self._query(sql, params)[0][0])

    def seqs(self, run_id: str, table: str = "decisions") -> list[int]:
        """Every stored seq of a run (decisions or events), ascending: for audits and tests."""
        if table not in ("decisions", "events"):
            raise ValueError(f"no seq table {table!r}")
        return [int(r[0]) for r in self._query(f"SELECT seq FROM {table} WHERE run_id = ? ORDER BY seq", (run_id,))]


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def open_store(target: str, create: bool = False) -> Store:
    """Open the record at ``target``: a file path (SQLite, WAL) or a postgresql:// URL.

    ``create``: make the database file / schema if needed and migrate it (the recorder); without
    it the record must exist and be readable by this linegate (history, view).
    """
    target = str(target)
    if is_postgres(target):
        try:
            import psycopg
        except ModuleNotFoundError:
            raise StoreError(f"{target}: PostgreSQL needs psycopg 3; pip install 'linegate[record]'") from None
        try:
            conn = psycopg.connect(target, autocommit=True, connect_timeout=10)  # transactions: _transaction()
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"cannot connect to {target}: {str(exc).strip()}; check the URL, that the "
                             "server runs and that this user may connect") from None
        store = Store(target, conn, pg=True)
    else:
        path = Path(target)
        if not create and not path.is_file():
            raise StoreError(f"{target}: no such record; `linegate record ENDPOINT --db {target}` creates it")
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; _transaction() says BEGIN/COMMIT itself.
            conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")  # readers (history, view) never block the recorder
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a crash of the process
            conn.execute("PRAGMA busy_timeout=30000")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{target}: cannot open as SQLite ({exc}); give a writable file path "
                             "or a postgresql:// URL") from None
        store = Store(target, conn, pg=False)
    try:
        if create:
            store.migrate()
        else:
            store.check_readable()
    except BaseException:
        store.close()
        raise
    return store
