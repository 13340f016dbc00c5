"""Reading the record (lineside.store) for the rejects and threshold pages.

The store's connection belongs to one thread (SQLite connections do), so every call runs on a
single worker thread of its own; the web loop awaits it and never blocks on a query or a file.
"""
from __future__ import annotations

import asyncio
import functools
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

THUMB_WIDTH = 240
THUMBS_CACHED = 512


class RecordReader:
    def __init__(self, target: str) -> None:
        self.target = target
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="view-record")
        self._store: Any = None
        self._thumbs: OrderedDict[tuple[int, str], bytes] = OrderedDict()

    def _open(self) -> Any:
        if self._store is None:
            from lineside.store import open_store  # the record's own package (linegate record)

            self._store = open_store(self.target)
        return self._store

    async def _run(self, fn, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def decisions(self, **query: Any) -> list[dict[str, Any]]:
        return await self._run(lambda: self._open().decisions(**query))

    async def decision(self, row_id: int) -> dict[str, Any] | None:
        return await self._run(lambda: self._open().decision_by_id(row_id))

    async def scores(self, limit: int) -> list[tuple[float, float, str]]:
        return await self._run(lambda: self._open().scores(limit))

    async def events(self, limit: int) -> list[dict[str, Any]]:
        return await self._run(lambda: self._open().events(limit=limit))

    async def image(self, row_id: int, kind: str, thumb: bool) -> bytes | None:
        """The frame or overlay file of a recorded decision (a thumbnail of it with `thumb`);
        None when the record has none. Paths are kept inside the store's image root."""
        return await self._run(self._image, row_id, kind, thumb)

    def _image(self, row_id: int, kind: str, thumb: bool) -> bytes | None:
        key = (row_id, kind)
        if thumb and key in self._thumbs:
            self._thumbs.move_to_end(key)
            return self._thumbs[key]
        store = self._open()
        row = store.decision_by_id(row_id)
        rel = None if row is None else row.get(f"{kind}_path")
        if not rel:
            return None
        root = Path(store.image_root).resolve() if store.image_root is not None else None
        path = (root / rel).resolve() if root is not None else Path(rel).resolve()
        if root is not None and not path.is_relative_to(root):
            raise PermissionError(f"record row {row_id}: {kind}_path {rel!r} leaves the image root")
        data = path.read_bytes()
        if not thumb:
            return data
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"record row {row_id}: {path} is not an image OpenCV can read")
        if image.shape[1] > THUMB_WIDTH:
            height = max(1, round(image.shape[0] * THUMB_WIDTH / image.shape[1]))
            image = cv2.resize(image, (THUMB_WIDTH, height), interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 85])
        self._thumbs[key] = jpeg.tobytes()
        if len(self._thumbs) > THUMBS_CACHED:
            self._thumbs.popitem(last=False)
        return self._thumbs[key]

    def close(self) -> None:
        def close_store() -> None:
            if self._store is not None:
                self._store.close()
        self._pool.submit(close_store).result(timeout=10)
        self._pool.shutdown()
