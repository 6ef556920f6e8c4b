"""Every use of pycuda lives here, so the CUDA binding can be swapped (e.g. for cuda-python).

pycuda's current context is per thread: every thread that touches device memory or runs an engine
pushes the context and pops it again (`CudaContext.active()`); one pop per push. The context is
created once per process and shared by all engines (`acquire_context` / `release_context`), and
destroyed when the last engine lets go of it — from whichever thread that is: pycuda's `Context.detach()`
destroys a context only when it is current in the calling thread or when called by the thread that
created it, and otherwise marks it invalid and leaks it (inducer/pycuda, src/cpp/cuda.hpp,
`context::detach`), so `detach` pushes it first.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

from edge_agent.errors import EngineError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_shared: Optional[CudaContext] = None
_refs = 0


def driver() -> Any:
    """The `pycuda.driver` module (EngineError when pycuda is not installed)."""
    try:
        import pycuda.driver as cuda
    except ImportError as e:
        raise EngineError("pycuda is not installed (it builds on the device: pip install pycuda)") from e
    return cuda


class CudaContext:
    """A CUDA context left floating after creation; `active()` pushes it for the calling thread."""

    def __init__(self, device_index: int = 0) -> None:
        cuda = driver()
        try:
            cuda.init()
            self.device = cuda.Device(device_index)
            self._ctx = self.device.make_context()  # creates and pushes
        except Exception as e:  # pycuda.driver.Error subclasses
            raise EngineError("cannot create a CUDA context on device %d: %s" % (device_index, e)) from e
        self._ctx.pop()
        self._detached = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Push the context for this thread; pop it afterwards, whatever happens."""
        self._ctx.push()
        try:
            yield
        finally:
            self._ctx.pop()

    def detach(self) -> None:
        """Destroy the context, from any thread: push it, then detach (which pops it). Call with the context
        not pushed by this thread, after every buffer and TensorRT object using it has been freed."""
        if self._detached:
            return
        self._detached = True
        self._ctx.push()
        self._ctx.detach()


def acquire_context() -> CudaContext:
    """The process-wide context, created on first use."""
    global _shared, _refs
    with _lock:
        if _shared is None:
            _shared = CudaContext(0)
        _refs += 1
        return _shared


def release_context() -> None:
    """Drop one reference; the last one destroys the context (from this thread: see `CudaContext.detach`)."""
    global _shared, _refs
    with _lock:
        if _refs <= 0:
            return
        _refs -= 1
        if _refs == 0 and _shared is not None:
            ctx, _shared = _shared, None  # the next acquire makes a new context even if this detach fails
            try:
                ctx.detach()
            except Exception as e:  # pycuda.driver.Error: nothing more can be done for this context
                log.warning("could not destroy the CUDA context: %s", e)


class DeviceBuffers:
    """Pinned host arrays and device allocations for named tensors, plus one non-default stream.

    Create, use and free only while the context is pushed.
    """

    def __init__(self) -> None:
        cuda = driver()
        self._cuda = cuda
        self.stream = cuda.Stream()
        self.host: Dict[str, Any] = {}
        self.device: Dict[str, Any] = {}

    def allocate(self, name: str, count: int, dtype: Any) -> None:
        """A pinned host array of `count` elements and a device allocation of the same size."""
        import numpy as np

        host = self._cuda.pagelocked_empty(int(count), dtype=np.dtype(dtype))
        self.host[name] = host
        self.device[name] = self._cuda.mem_alloc(max(1, host.nbytes))

    def pointer(self, name: str) -> int:
        """Device address of a tensor's buffer."""
        return int(self.device[name])

    def to_device(self, name: str, flat: Any) -> None:
        """Copy `flat` (1-D) into the front of the tensor's pinned buffer, then to the device (async)."""
        host = self.host[name][: flat.size]
        host[:] = flat
        self._cuda.memcpy_htod_async(self.device[name], host, self.stream)

    def from_device(self, name: str, count: int) -> None:
        """Queue a copy of the first `count` elements back to the pinned buffer."""
        self._cuda.memcpy_dtoh_async(self.host[name][:count], self.device[name], self.stream)

    def synchronize(self) -> None:
        """Wait for the stream."""
        self.stream.synchronize()

    def free(self) -> None:
        """Free every device allocation and drop the pinned arrays."""
        for alloc in self.device.values():
            alloc.free()
        self.device.clear()
        self.host.clear()
        self.stream = None


def mem_get_info() -> Tuple[int, int]:
    """(free, total) device memory for the shared context's device."""
    ctx = acquire_context()
    try:
        with ctx.active():
            free, total = driver().mem_get_info()
        return int(free), int(total)
    finally:
        release_context()


def probe_gpu() -> Dict[str, Any]:
    """What the CUDA driver says about GPU 0: `{"ok": True, name, compute_capability, cuda_driver_version,
    cuda_compiled_version, pycuda_version, total_memory_bytes}` or `{"ok": False, "reason": ...}` saying
    whether pycuda is missing or no GPU answered. Never raises."""
    try:
        cuda = driver()
    except EngineError as e:
        return {"ok": False, "reason": str(e), "pycuda_version": None}
    out: Dict[str, Any] = {"ok": False, "pycuda_version": _pycuda_version()}
    try:
        out["cuda_compiled_version"] = ".".join(str(v) for v in cuda.get_version()[:2])
        cuda.init()
        out["cuda_driver_version"] = _format_cuda_version(int(cuda.get_driver_version()))
        if cuda.Device.count() < 1:
            out["reason"] = "pycuda works but the CUDA driver reports no GPU"
            return out
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        out.update(ok=True, name=str(dev.name()), compute_capability=(int(major), int(minor)),
                   total_memory_bytes=int(dev.total_memory()))
        return out
    except Exception as e:  # pycuda.driver.Error and friends: a driver without a usable GPU
        log.debug("no usable GPU: %s", e)
        out["reason"] = "no CUDA GPU answered (%s: %s)" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return out


def _format_cuda_version(v: int) -> str:
    """cuDriverGetVersion's integer (1000 * major + 10 * minor) -> "12.2"."""
    return "%d.%d" % (v // 1000, (v % 1000) // 10)


def _pycuda_version() -> Optional[str]:
    try:
        import pycuda

        text = getattr(pycuda, "VERSION_TEXT", None) or ".".join(str(v) for v in getattr(pycuda, "VERSION", ()))
    except Exception:  # pycuda's package import failing is reported by driver() already
        return None
    return str(text) or None
