"""The TensorRT engine (pycuda): same interface and outputs as the ONNX Runtime engine.

`tensorrt` and `pycuda` are imported lazily, so `edge` imports on a box without them; asking
for this engine there gives TensorRTUnavailable, whose message names the ONNX Runtime engine.

At load, the bundle's facts for the engine (TensorRT version, GPU name and compute
capability) are checked against the running TensorRT and GPU: a serialized engine only runs
on the TensorRT version and GPU it was built for, and a mismatch is an error that says to
rebuild it with `linegate export tensorrt`.

Inference: page-locked host buffers and device buffers for the batch profile's max batch are
allocated once (PinnedIO, the pycuda half, tested on its own where a GPU has no TensorRT);
each call copies the batch into the page-locked input, then on one CUDA stream:
async host-to-device copy, set_input_shape + set_tensor_address + execute_async_v3, async
device-to-host copies of the outputs, and one synchronise. The engine keeps the device's
primary context (the one the CUDA runtime inside TensorRT uses) and makes it current around
each call, so it works from whichever thread the pipeline infers on.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle, BundleError, ModelFile

log = logging.getLogger(__name__)

FALLBACK = "run the bundle's ONNX model with `--engine onnxruntime` (or `--engine auto`)"


class TensorRTUnavailable(RuntimeError):
    """No TensorRT, no pycuda or no usable NVIDIA GPU here; the message names the fallback."""


@dataclass(frozen=True)
class GpuStatus:
    """What this box offers TensorRT: usable or not (and why), and the facts engines are bound to."""

    usable: bool
    reason: str
    tensorrt: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None


def require_pycuda() -> Any:
    """pycuda's driver module with CUDA initialised and at least one GPU, or TensorRTUnavailable."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise TensorRTUnavailable(f"pycuda is not installed here ({exc}); install linegate[gpu] on a "
                                  f"machine with an NVIDIA GPU, or {FALLBACK}") from exc
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.Error: no driver, no device
        raise TensorRTUnavailable(f"no usable NVIDIA GPU ({exc}); {FALLBACK}") from exc
    if count == 0:
        raise TensorRTUnavailable(f"no NVIDIA GPU found; {FALLBACK}")
    return cuda


def require_tensorrt() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed here ({exc}); install linegate[gpu] on a "
                                  f"machine with an NVIDIA GPU, or {FALLBACK}") from exc
    return trt, require_pycuda()


def device_facts(cuda: Any, device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of a CUDA device."""
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}"


def probe(device: int = 0) -> GpuStatus:
    """Whether TensorRT can run here, without raising: for the engine choice in `auto`."""
    try:
        trt, cuda = require_tensorrt()
        gpu, cc = device_facts(cuda, device)
    except TensorRTUnavailable as exc:
        return GpuStatus(False, str(exc))
    return GpuStatus(True, f"TensorRT {trt.__version__} on {gpu} (compute capability {cc})",
                     trt.__version__, gpu, cc)


def check_facts(model: ModelFile, status: GpuStatus) -> None:
    """Refuse an engine built for another TensorRT version or GPU, saying to rebuild it here."""
    built = model.facts["tensorrt"]
    problems = []
    if built["version"] != status.tensorrt:
        problems.append(f"TensorRT {built['version']} (this box runs {status.tensorrt})")
    if built["compute_capability"] != status.compute_capability or built["gpu"] != status.gpu:
        problems.append(f"{built['gpu']} with compute capability {built['compute_capability']} "
                        f"(this box has {status.gpu}, {status.compute_capability})")
    if problems:
        raise BundleError(f"{model.name} was built for {' and '.join(problems)}; a TensorRT engine runs only "
                          f"where it was built: rebuild it on this box with `linegate export tensorrt BUNDLE "
                          f"--precision {model.precision}`, or {FALLBACK}")


class PinnedIO:
    """The engine's I/O memory and copies (pycuda), apart from TensorRT so it is tested alone:
    for each tensor a page-locked host buffer and a device buffer sized for the profile's max
    batch, allocated once; uploads and downloads of the first n items, asynchronous on one
    CUDA stream. Call it with a CUDA context current."""

    def __init__(self, cuda: Any, tensors: dict[str, tuple[tuple[int, ...], np.dtype]], max_batch: int):
        self._cuda = cuda
        self.max_batch = max_batch
        self.stream = cuda.Stream()
        self.item_shape = {name: tuple(item) for name, (item, _) in tensors.items()}
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, Any] = {}
        for name, (item, dtype) in tensors.items():
            self.host[name] = cuda.pagelocked_empty((max_batch, *item), dtype)
            self.device[name] = cuda.mem_alloc(self.host[name].nbytes)

    def address(self, name: str) -> int:
        return int(self.device[name])

    def upload(self, name: str, batch: np.ndarray) -> None:
        """Queue the copy of `batch` (at most max_batch items) to the device buffer of `name`."""
        host = self.host[name][:len(batch)]
        np.copyto(host, batch, casting="same_kind")  # into page-locked memory: the copy is truly async
        self._cuda.memcpy_htod_async(self.device[name], host, self.stream)

    def download(self, names: list[str], n: int) -> tuple[np.ndarray, ...]:
        """Copy the first n items of each named device buffer back, wait for the stream, and
        return float32 copies (the page-locked buffers are reused by the next batch)."""
        for name in names:
            self._cuda.memcpy_dtoh_async(self.host[name][:n], self.device[name], self.stream)
        self.stream.synchronize()
        return tuple(self.host[name][:n].astype(np.float32) for name in names)

    def free(self) -> None:
        """Release every buffer and the stream now, with the context that made them current:
        pycuda frees page-locked memory and streams through that context, and once it is
        detached their own cleanup fails silently (the memory stays pinned). Idempotent."""
        for dev in self.device.values():
            dev.free()
        self.device.clear()
        for host in self.host.values():
            if host.base is not None and hasattr(host.base, "free"):
                host.base.free()  # the HostAllocation behind pagelocked_empty
        self.host.clear()
        self.stream = None


class TensorRTEngine:
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, model: ModelFile, input_name: str, score_name: str,
                 map_name: str, device: int = 0):
        trt, cuda = require_tensorrt()
        gpu, cc = device_facts(cuda, device)
        check_facts(model, GpuStatus(True, "", trt.__version__, gpu, cc))
        self.precision = model.precision
        self.providers = [f"TensorRT {trt.__version__} {model.precision} on {gpu}"]
        self.input_name = input_name
        self.outputs = [score_name, map_name]
        self.max_batch = int(model.facts["tensorrt"]["batch_profile"]["max"])
        self._lock = threading.Lock()  # one stream and one set of buffers: one batch at a time
        self._io: PinnedIO | None = None
        self._closed = False
        self._ctx = cuda.Device(device).retain_primary_context()
        self._ctx.push()
        loaded = False
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self._engine is None:
                raise BundleError(f"{engine_path}: TensorRT could not deserialize the engine (see its log "
                                  "above); rebuild it with `linegate export tensorrt BUNDLE`")
            self._context = self._engine.create_execution_context()
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            missing = [n for n in (input_name, score_name, map_name) if n not in names]
            if missing:
                raise BundleError(f"{engine_path}: the engine has no tensor {missing} (it has {names}); "
                                  "rebuild it from this bundle with `linegate export tensorrt BUNDLE`")
            # The engine's own profile, not only the manifest's word for it: set_input_shape
            # returns False (it does not raise) for a batch beyond it.
            profile_max = int(self._engine.get_tensor_profile_shape(input_name, 0)[2][0])
            if profile_max != self.max_batch:
                raise BundleError(f"{engine_path}: its optimisation profile's max batch is {profile_max}, the "
                                  f"manifest says {self.max_batch}; rebuild it with `linegate export tensorrt "
                                  "BUNDLE`")
            tensors = {}
            for name in names:
                shape = tuple(self._engine.get_tensor_shape(name))
                if any(d < 0 for d in shape[1:]):
                    raise BundleError(f"{engine_path}: tensor {name!r} has dynamic axes {shape} beyond the "
                                      "batch axis; linegate engines have a dynamic batch axis only")
                tensors[name] = (shape[1:], np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))))
            self._io = PinnedIO(cuda, tensors, self.max_batch)
            for name in names:
                self._context.set_tensor_address(name, self._io.address(name))
            loaded = True
        finally:
            if not loaded and self._io is not None:
                self._io.free()
            self._ctx.pop()
            if not loaded:  # release the primary context retained above: a failed load leaks nothing
                self._ctx.detach()

    @classmethod
    def from_bundle(cls, bundle: Bundle, model: ModelFile, **kwargs) -> TensorRTEngine:
        m = bundle.manifest
        return cls(bundle.file(model.name), model, m["input"]["name"], m["outputs"]["score"]["name"],
                   m["outputs"]["map"]["name"], **kwargs)

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) float32 pixels -> (scores (B,), maps (B, h, w)); batches above the
        profile's max run in chunks."""
        if len(batch) > self.max_batch:
            parts = [self.infer(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        n = len(batch)
        if n == 0:
            raise ValueError("TensorRT engine: empty batch")
        io = self._io
        with self._lock:
            if self._closed:
                raise RuntimeError("TensorRT engine: closed")
            self._ctx.push()
            try:
                io.upload(self.input_name, batch)
                if not self._context.set_input_shape(self.input_name, (n, *io.item_shape[self.input_name])):
                    raise RuntimeError(f"TensorRT refused input shape {(n, *io.item_shape[self.input_name])} "
                                       f"(profile max batch {self.max_batch})")
                if not self._context.execute_async_v3(io.stream.handle):
                    raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
                return io.download(self.outputs, n)
            finally:
                self._ctx.pop()

    def close(self) -> None:
        """Free the buffers, the stream, the context and the engine, then release the primary
        context (in that order: pycuda frees through the context). A second call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ctx.push()
            try:
                self._io.free()
                self._context = self._engine = None
            finally:
                self._ctx.pop()
                self._ctx.detach()
