"""The model in force: everything bundle-dependent the pipeline uses per batch, in one object.

The pipeline reads ``Pipeline.model`` (an ActiveModel) once per batch and uses only that
object for the batch: its geometry to check the frames' tensors, its engine, its decision
rule and thresholds, its model id in the headers, its display range in the overlays. A
change of threshold makes a new ActiveModel sharing the engine (``with_thresholds``); a hot
swap builds a whole new one in the background (``open_model`` + ``warm_up``) and replaces
the reference between two batches. An ActiveModel is never changed in place, so a batch
judged with one is judged with it from start to end.

``geometry`` is what makes a preprocessed tensor valid for a model: frames preprocessed
(in their source threads) for another geometry are preprocessed again at batch time, so
bundles of different input sizes swap with no frame lost.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from .bundle import Bundle, load_bundle
from .decision import ACCEPT, ERROR, REJECT, Decision, DecisionRule
from .engine import Engine, open_engine
from .memory import measure as measure_memory
from .tiling import Geometry  # how a frame becomes input (stretch or tiles); equal geometries, equal tensors

log = logging.getLogger(__name__)

WARM_EVERY_SIZE_UP_TO = 16  # beyond: powers of two and max_batch (every size costs O(n^2) images)


@dataclass(frozen=True)
class ActiveModel:
    bundle: Bundle
    engine: Engine
    rule: DecisionRule
    geometry: Geometry
    # Operator settings on top of the bundle's calibration (control endpoint, config reload):
    # a line-wide threshold and per-camera ones (a camera's own wins).
    threshold_override: float | None = None
    camera_thresholds: Mapping[str, float] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, bundle: Bundle, engine: Engine, rule: DecisionRule) -> "ActiveModel":
        return cls(bundle, engine, rule, bundle.geometry)

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def threshold(self) -> float:
        """The line-wide threshold in force (a camera's own may differ: threshold_for)."""
        return self.rule.threshold if self.threshold_override is None else self.threshold_override

    def threshold_for(self, camera_id: str) -> float:
        return self.camera_thresholds.get(camera_id, self.threshold)

    def thresholds(self, camera_ids: Iterable[str]) -> dict[str, float]:
        return {cid: self.threshold_for(cid) for cid in camera_ids}

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        return self.geometry.preprocess(rgb)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.engine.infer(batch)

    def decide(self, camera_ids: list[str], scores: np.ndarray, maps: np.ndarray) -> list[Decision]:
        """The rule's decisions, with the operator's thresholds applied per camera."""
        decisions = self.rule.decide(scores, maps)
        if self.threshold_override is None and not self.camera_thresholds:
            return decisions
        for cid, d in zip(camera_ids, decisions):
            t = self.threshold_for(cid)
            d.threshold = t
            if d.decision != ERROR:
                d.decision = REJECT if d.score >= t else ACCEPT
        return decisions

    def with_thresholds(self, value: float | None, camera: str | None = None) -> "ActiveModel":
        """A copy with a new line-wide threshold (camera None; the per-camera ones are then
        cleared: a line-wide setting means every camera) or one camera's threshold."""
        if value is not None and not np.isfinite(value):
            raise ValueError(f"threshold {value}: must be a finite number")
        if camera is None:
            return dataclasses.replace(self, threshold_override=value, camera_thresholds={})
        cams = dict(self.camera_thresholds)
        if value is None:
            cams.pop(camera, None)
        else:
            cams[camera] = float(value)
        return dataclasses.replace(self, camera_thresholds=cams)


def batch_sizes(max_batch: int) -> list[int]:
    """Every batch size an engine may be given up to max_batch, as the warm-up runs them."""
    sizes = set(range(1, min(max_batch, WARM_EVERY_SIZE_UP_TO) + 1))
    sizes |= {2 ** k for k in range(max_batch.bit_length()) if 2 ** k <= max_batch} | {max_batch}
    return sorted(sizes)


def warm_up(model: ActiveModel, sizes: Iterable[int], strict: bool = False, pace: float = 0.0,
            stop: threading.Event | None = None) -> list[int]:
    """Run the engine once at each batch size (ONNX Runtime plans its memory per shape).

    strict: a failure or a wrong output raises (a model about to be swapped in must work);
    otherwise it is logged and the sizes warmed so far are returned. pace: after each call,
    sleep pace x its duration, leaving the cores to a model that is judging meanwhile.
    stop: once set, no further size is run (a call it ended is not a failure to log).
    """
    todo = sorted(set(sizes))
    done: list[int] = []
    if not todo:
        return done
    zeros = np.zeros((todo[-1], *model.geometry.tensor_shape), np.float32)
    for n in todo:
        if stop is not None and stop.is_set():
            break
        started = time.perf_counter()
        try:
            scores, maps = model.infer(zeros[:n])
            if len(scores) != n or len(maps) != n:
                raise RuntimeError(f"the engine returned {len(scores)} scores and {len(maps)} maps for "
                                   f"{n} frames")
            model.rule.decide(np.asarray(scores), np.asarray(maps))
        except Exception as exc:  # noqa: BLE001 - strict re-raises with the batch size
            if strict:
                raise RuntimeError(f"warm-up at batch size {n} failed: {exc}") from exc
            if stop is None or not stop.is_set():  # else: the stop ended the call
                log.warning("engine warm-up failed at batch %d (%s); going on without it", n, exc)
            break
        done.append(n)
        if pace > 0:
            time.sleep(pace * (time.perf_counter() - started))
    return done


@dataclass
class EngineSettings:
    """How to open an engine for a bundle (the config's [engine] keys but the bundle)."""

    kind: str = "auto"
    precision: str | None = None
    threads: int = 0
    spin_between_calls: bool = False

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.precision:
            out["precision"] = self.precision
        if self.threads:
            out["threads"] = self.threads
        if self.spin_between_calls:
            out["spin_between_calls"] = True
        return out


def check_memory(engine: Engine, bundle: Bundle, max_batch: int, queue_capacity: int, what: str) -> None:
    """ValueError unless batches of max_batch (bounded by the queue, as the line's are) fit in the
    memory this box has left, measured on the engine as `linegate run` does before its first
    frame (edge/memory.py). A running line checks before a warm-up would take that memory (a
    hot swap's new engine beside the one judging, a larger max_batch by reload) instead of
    growing until the kernel kills it."""
    memory = measure_memory(engine, bundle.input_size, min(max_batch, queue_capacity), queue_capacity,
                            bundle.geometry.tile_count)
    if not memory.fits():
        raise ValueError(f"{what} {memory.describe()}, beside the model running now: it cannot fit; use "
                         f"batching.max_batch <= {memory.largest_fitting()} (and a smaller queue_capacity, "
                         "which takes a restart) or free memory on this box")


# A hot swap warms the new engine while the old one judges on the same cores: pausing as long
# as each warm-up call took halves the contention (benchmarks/swap_cost.py measures the cost).
SWAP_WARM_PACE = 1.0


def open_model(bundle_path: str, settings: EngineSettings, threshold: float | None = None,
               aggregate: str | None = None, max_batch: int = 8, pace: float = 0.0,
               queue_capacity: int | None = None) -> ActiveModel:
    """Validate a bundle, open its engine and warm it at every batch size: ValueError (or
    RuntimeError from the warm-up) with the reason when anything fails. Nothing shared is
    touched: the caller swaps the result in. pace: see warm_up.

    queue_capacity (a running line's): the memory max_batch will take with this bundle is
    measured as `linegate run` does before its first frame (edge/memory.py), beside the
    model judging meanwhile, and a bundle that cannot fit is refused before the warm-up
    (which would take that memory) rather than growing until the kernel kills the line."""
    bundle: Bundle = load_bundle(bundle_path)  # manifest and checksums
    rule = DecisionRule.from_bundle(bundle, threshold, aggregate)
    try:
        engine = open_engine(bundle, settings.kind, **settings.kwargs())
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a bad file
        raise ValueError(f"{bundle_path}: the engine cannot load it ({type(exc).__name__}: {exc})") from exc
    if queue_capacity is not None:
        try:
            check_memory(engine, bundle, max_batch, queue_capacity, f"{bundle_path}: with this bundle")
        except ValueError:
            close = getattr(engine, "close", None)
            if close is not None:
                close()
            raise
        max_batch = min(max_batch, queue_capacity)
    model = ActiveModel.build(bundle, engine, rule)
    started = time.perf_counter()
    warm_up(model, batch_sizes(max_batch), strict=True, pace=pace)
    log.info("bundle %s (%s) opened and warmed at batch sizes 1-%d in %.2f s", bundle_path, bundle.model_id,
             max_batch, time.perf_counter() - started)
    return model
