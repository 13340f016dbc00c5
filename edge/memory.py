"""How much memory a batch size will take, measured on the engine itself, against what the
box has: `linegate run` and `check-config` refuse a max_batch that cannot fit before any
frame is read, instead of growing until the kernel kills the service (systemd would then
restart it into the same end).

The engine's working memory grows with the batch (ONNX Runtime plans buffers per input
shape and keeps them in its arena), and by how much depends on the model: it is measured,
as the process's resident memory after a batch of 1 and after a batch of ``PROBE_BATCH``,
and extrapolated linearly. The pipeline's own buffers (the batch buffer and the frames the
queue may hold) are added from their shapes. ONNX Runtime's arena grows in power-of-two
steps, so the estimate errs on the high side; the message gives the figures either way.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROBE_BATCH = 4
HEADROOM = 0.9  # refuse when the estimate exceeds this share of the memory available now
MIB = 1 << 20


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, and its cgroup's memory.max less
    memory.current where a limit is set (systemd MemoryMax=, a container). None: unknown."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:  # cgroup v2: "0::/system.slice/linegate.service"
        rel = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        group = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((group / "memory.current").read_text()))
    except (OSError, StopIteration, ValueError):
        pass
    return min(found) if found else None


@dataclass
class BatchMemory:
    per_frame_engine: int  # bytes the engine's working memory grows per frame of batch
    per_frame_tensor: int  # bytes of one preprocessed frame
    max_batch: int
    queue_capacity: int
    available: int | None
    tiles_per_frame: int = 1  # a tiled bundle's queued frame holds one tensor per tile

    def need(self, max_batch: int | None = None) -> int:
        """Bytes beyond what is resident after the probe that a run at ``max_batch`` will add."""
        b = self.max_batch if max_batch is None else max_batch
        engine = self.per_frame_engine * max(0, b - PROBE_BATCH)
        buffers = self.per_frame_tensor * (b + self.queue_capacity * self.tiles_per_frame)  # batch + queue
        return engine + buffers

    def largest_fitting(self) -> int:
        if self.available is None:
            return self.max_batch
        b = self.max_batch
        while b > 1 and self.need(b) > HEADROOM * self.available:
            b //= 2
        return b

    def fits(self) -> bool:
        return self.available is None or self.need() <= HEADROOM * self.available

    def describe(self) -> str:
        text = (f"max_batch {self.max_batch} needs about {self.need() / MIB:.0f} MiB more (the engine grew "
                f"{self.per_frame_engine / MIB:.1f} MiB per frame of batch between batches of 1 and {PROBE_BATCH}; "
                f"{self.per_frame_tensor / MIB:.1f} MiB per engine item held by the batch buffer and the queue of "
                f"{self.queue_capacity}{f' frames of {self.tiles_per_frame} tiles' if self.tiles_per_frame > 1 else ''})")
        if self.available is not None:
            text += f"; {self.available / MIB:.0f} MiB available on this box"
        return text


def measure(engine, input_size: tuple[int, int], max_batch: int, queue_capacity: int,
            tiles_per_frame: int = 1) -> BatchMemory:
    """Run the engine at batch 1 and PROBE_BATCH and extrapolate to ``max_batch``."""
    h, w = input_size
    zeros = np.zeros((PROBE_BATCH, 3, h, w), np.float32)
    zeros.fill(0.0)  # touched: resident before the first measurement, not counted as the engine's
    engine.infer(zeros[:1])
    one = resident_bytes()
    engine.infer(zeros)
    grown = max(0, resident_bytes() - one)
    return BatchMemory(per_frame_engine=grown // (PROBE_BATCH - 1), per_frame_tensor=zeros[0].nbytes,
                       max_batch=max_batch, queue_capacity=queue_capacity, available=available_bytes(),
                       tiles_per_frame=tiles_per_frame)
