"""The recorder's image store: reject overlays and full-resolution reject frames on disk.

Layout: ``ROOT/YYYY-MM-DD/CAMERA/HHMMSS.mmm_RUN8_DSEQ_TOPIC.EXT`` (UTC capture date and time,
the first 8 hex digits of the run id, the seq of the decision the image belongs to). The name
depends only on the message, so a replayed image lands on the file an earlier attempt wrote.

A full file system (ENOSPC/EDQUOT, or less free than ``min_free_bytes``, which keeps room for
the database when it shares the disk) stops image writes: the store logs it once, skips images
(the recorder writes them down as gap rows), checks again every ``retry_s`` and logs when
writes resume. It never raises for a full disk: decisions keep flowing.

Retention (``enforce``): images older than ``keep_days`` and, over ``max_bytes``, the oldest
images go first; their rows in the record stay, marked deleted.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .store import Store

log = logging.getLogger("linegate.record")

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png"}


def _safe(text: Any) -> str:
    """A path component from a camera id ("line1/cam:0" -> "line1_cam_0")."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text)) or "_"


def image_path(header: dict[str, Any], topic: str, run_id: str, decision_seq: int | None) -> str:
    """The image's path relative to the store's root (see the module docstring)."""
    ts = header.get("capture_ts")
    if not isinstance(ts, (int, float)) or not math.isfinite(ts):
        ts = header.get("publish_ts") if isinstance(header.get("publish_ts"), (int, float)) else time.time()
    day = time.strftime("%Y-%m-%d", time.gmtime(ts))
    clock = time.strftime("%H%M%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    ext = EXTENSIONS.get(str(header.get("encoding", "")).lower(), "png" if topic == "frame" else "jpg")
    dseq = decision_seq if decision_seq is not None else f"o{header.get('seq')}"
    return f"{day}/{_safe(header.get('camera_id', 'cam'))}/{clock}_{_safe(run_id)[:8]}_{dseq}_{topic}.{ext}"


class ImageStore:
    def __init__(self, root: str | Path, line: str, max_bytes: int | None = None, keep_days: float | None = None,
                 min_free_bytes: int = 100 * 2**20, retry_s: float = 5.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.line = line
        self.max_bytes, self.keep_days = max_bytes, keep_days
        self.min_free_bytes, self.retry_s = min_free_bytes, retry_s
        self.full_since: float | None = None  # monotonic time the store went full, None while writing
        self._next_try = 0.0
        self.skipped = 0  # images not written since the store went full (reset when it recovers)
        self.skipped_total = 0
        self.written = 0
        self.deleted = 0
        self.bytes = 0  # bytes of this line's images on disk (as recorded), kept by the recorder
        self._next_age_check = 0.0
        self._remove_partial_files()

    def _remove_partial_files(self) -> None:
        """A recorder killed mid-write leaves NAME.part; only the newest two days can hold one."""
        for day in sorted(p for p in self.root.iterdir() if p.is_dir())[-2:]:
            for part in day.glob("*/*.part"):
                part.unlink(missing_ok=True)
                log.info("removed %s, left by a recorder stopped while writing it", part)

    def load_usage(self, store: Store) -> None:
        self.bytes = store.image_bytes(self.line)

    def write(self, rel_path: str, data: bytes) -> bool:
        """Write one image; False when the store is full (the image is skipped and counted)."""
        now = time.monotonic()
        if self.full_since is not None and now < self._next_try:
            return self._skip()
        free = shutil.disk_usage(self.root).free
        if free - len(data) < self.min_free_bytes:
            return self._went_full(f"{free / 2**20:.1f} MiB free, the floor is --min-free-mb "
                                   f"{self.min_free_bytes / 2**20:g}")
        path = self.root / rel_path
        tmp = path.with_name(path.name + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replaced = path.stat().st_size if path.exists() else 0  # a replayed image, written before
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers never see half an image
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in FULL_ERRNOS:
                return self._went_full(os.strerror(exc.errno))
            log.error("image %s not written: %s; the decision is recorded without it", path, exc)
            self.skipped_total += 1
            return False
        if self.full_since is not None:
            log.warning("image store %s has room again: image writes resumed after %.0f s; %d image(s) "
                        "were not stored while it was full (recorded as gap rows)",
                        self.root, now - self.full_since, self.skipped)
            self.full_since, self.skipped = None, 0
        self.written += 1
        self.bytes += len(data) - replaced
        return True

    def _went_full(self, why: str) -> bool:
        now = time.monotonic()
        if self.full_since is None:
            self.full_since = now
            log.error("image store %s is FULL (%s): image writes stopped; decisions and events are still "
                      "recorded; trying again every %g s", self.root, why, self.retry_s)
        self._next_try = now + self.retry_s
        return self._skip()

    def _skip(self) -> bool:
        self.skipped += 1
        self.skipped_total += 1
        return False

    def enforce(self, store: Store) -> int:
        """Apply retention; returns the number of images deleted."""
        deleted = 0
        now = time.monotonic()
        if self.keep_days is not None and now >= self._next_age_check:
            self._next_age_check = now + 60.0
            cutoff = time.time() - self.keep_days * 86400
            while batch := store.oldest_images(self.line, 500, before_ts=cutoff):
                deleted += self._delete(store, batch)
        while self.max_bytes is not None and self.bytes > self.max_bytes:
            batch = store.oldest_images(self.line, 200)
            if not batch:
                break  # the images over budget are not committed yet; next time
            # Only as many as needed: the newest images stay.
            take, excess = [], self.bytes - self.max_bytes
            for item in batch:
                if excess <= 0:
                    break
                take.append(item)
                excess -= item[2]
            deleted += self._delete(store, take)
        if deleted:
            log.info("retention: %d image(s) deleted (image store now %.1f MiB%s)", deleted, self.bytes / 2**20,
                     f", budget {self.max_bytes / 2**20:.1f} MiB" if self.max_bytes else "")
        return deleted

    def _delete(self, store: Store, batch: list[tuple[int, str, int]]) -> int:
        dirs = set()
        for _, rel, size in batch:
            path = self.root / rel
            try:
                path.unlink()
            except FileNotFoundError:
                pass  # gone already (removed by hand): the row is marked all the same
            except OSError as exc:
                log.warning("retention: cannot delete %s (%s)", path, exc)
            dirs.add(path.parent)
            self.bytes -= size
        store.mark_deleted([row_id for row_id, _, _ in batch])
        for folder in dirs:  # drop emptied camera and day folders
            for d in (folder, folder.parent):
                try:
                    if d != self.root:
                        d.rmdir()
                except OSError:
                    break  # not empty
        self.deleted += len(batch)
        return len(batch)
