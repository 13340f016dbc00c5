"""The small dataclass that flows from sources through the batcher to the publisher."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class Frame:
    camera_id: str
    frame_id: int
    capture_ts: float  # wall clock (time.time()) when the source got the frame
    image: np.ndarray  # H x W x 3 uint8, RGB, as captured (overlays are drawn on it)
    source_name: str | None = None  # file name for folder sources: which part was judged
    label: str | None = None  # ground truth when the source knows it (synthetic parts)
    tensor: np.ndarray | None = None  # preprocessed model input (C x H x W float32)
    enqueue_mono: float = field(default=0.0)  # time.monotonic() when it entered the batch queue
    # Why this frame cannot be inspected (wrong size or channel count, ROI outside it...):
    # it still travels through the queue, in order, and gets an `error` decision.
    error: str | None = None
    # The frame as the camera gave it, when `image` is a crop of it (ROI): the `frame` topic's image.
    full_image: np.ndarray | None = None
    geometry: Any = None  # the edge.active.Geometry `tensor` was made for (None: not preprocessed)
