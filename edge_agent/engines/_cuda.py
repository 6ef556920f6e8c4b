"""Every use of pycuda lives here, so the CUDA binding can be swapped (e.g. for cuda-python).

pycuda's current context is per thread: every thread that touches device memory or runs an engine
pushes the context and pops it again (`CudaContext.active()`); one pop per push. The context is
created once per process and shared by all engines (`acquire_context` / `release_context`), and
detached when the last engine lets go of it.
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
        """Give the context back to the driver. Call with the context not pushed."""
        if not self._detached:
            self._detached = True
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
    """Drop one reference; the last one detaches the context."""
    global _shared, _refs
    with _lock:
        if _refs <= 0:
            return
        _refs -= 1
        if _refs == 0 and _shared is not None:
            _shared.detach()
            _shared = None


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


def probe_gpu() -> Optional[Dict[str, Any]]:
    """Name, compute capability and CUDA version of GPU 0, or None when there is no usable GPU."""
    try:
        cuda = driver()
        cuda.init()
        if cuda.Device.count() < 1:
            return None
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        version = ".".join(str(v) for v in cuda.get_version()[:2])
        return {
            "name": str(dev.name()),
            "compute_capability": (int(major), int(minor)),
            "cuda_version": version,
            "total_memory_bytes": int(dev.total_memory()),
        }
    except Exception as e:  # no pycuda, no driver, no device: all mean "no GPU for us"
        log.debug("no usable GPU: %s", e)
        return None
