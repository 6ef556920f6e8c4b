"""Test double of `pycuda.driver`: contexts per thread, device memory as a registry of byte arrays.

Strict like the real driver where our code could go wrong: allocations, pinned memory and streams need a
context pushed in the calling thread; async copies need page-locked host memory; pop without push fails;
`Context.detach()` destroys a context only when it is current in the calling thread or called by the thread
that created it, and otherwise leaks it (inducer/pycuda src/cpp/cuda.hpp, `context::detach`).
Memory: device allocations, live contexts (TRT_DOUBLE_CONTEXT_BYTES each), TensorRT engines and execution
contexts (`_hold`) and — on unified memory (TRT_DOUBLE_UNIFIED=1, the default: Jetsons) — page-locked host
arrays all take from the one pool `mem_get_info` reports.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple

import numpy as np


class Error(Exception):
    """Base of pycuda.driver errors."""


class LogicError(Error):
    """Misuse of the API (e.g. no current context)."""


class MemoryError(Error):
    """cuMemAlloc failed: out of memory."""


class RuntimeError(Error):
    """A driver call failed at run time."""


class host_alloc_flags:
    """Flags for pagelocked allocations."""

    PORTABLE = 1
    DEVICEMAP = 2
    WRITECOMBINED = 4


_state_lock = threading.Lock()
_initialized = False
_tls = threading.local()
_addresses = itertools.count(0x7F0000000000, 0x100000)
_memory: Dict[int, np.ndarray] = {}
_live_contexts: List[Context] = []
_leaked_contexts: List[Context] = []
_held: Dict[int, Tuple[int, str]] = {}  # id -> (bytes, what): engines, execution contexts, pinned host arrays
_held_ids = itertools.count(1)
_released: collections.deque[int] = collections.deque()
_streams = itertools.count(0x5000)


def _unified() -> bool:
    return os.environ.get("TRT_DOUBLE_UNIFIED", "1") == "1"


def _hold(owner: Any, nbytes: int, what: str) -> None:
    """(Double only) account `nbytes` of device memory for as long as `owner` lives."""
    key = next(_held_ids)
    with _state_lock:
        _held[key] = (int(nbytes), what)
    weakref.finalize(owner, _release_hold, key)


def _release_hold(key: int) -> None:
    # runs from the garbage collector, possibly inside a locked section: only queue the key
    _released.append(key)


def _drain_released() -> None:
    """Drop released holds (call with _state_lock held)."""
    while _released:
        _held.pop(_released.popleft(), None)


def _context_bytes() -> int:
    return int(os.environ.get("TRT_DOUBLE_CONTEXT_BYTES", str(32 << 20)))


def _stack() -> List[Context]:
    if not hasattr(_tls, "stack"):
        _tls.stack = []
    return _tls.stack


def _need_context(what: str) -> Context:
    stack = _stack()
    if not stack:
        raise LogicError("%s failed: invalid device context - no currently active context?" % what)
    return stack[-1]


def _need_init() -> None:
    if not _initialized:
        raise LogicError("cuInit has not been called")


def init(flags: int = 0) -> None:
    """cuInit."""
    global _initialized
    _initialized = True


def get_version() -> Tuple[int, int, int]:
    """CUDA version pycuda was compiled against."""
    return (11, 4, 0)


def get_driver_version() -> int:
    """cuDriverGetVersion: the driver's CUDA version, 1000 * major + 10 * minor (TRT_DOUBLE_CUDA_DRIVER)."""
    return int(os.environ.get("TRT_DOUBLE_CUDA_DRIVER", "11040"))


def _sm() -> Tuple[int, int]:
    sm = os.environ.get("TRT_DOUBLE_SM", "72")
    return int(sm[:-1]), int(sm[-1])


class Device:
    """A CUDA device."""

    def __init__(self, ordinal: int) -> None:
        _need_init()
        if not 0 <= ordinal < Device.count():
            raise LogicError("cuDeviceGet failed: invalid device ordinal")
        self.ordinal = ordinal

    @staticmethod
    def count() -> int:
        """Number of devices."""
        _need_init()
        return int(os.environ.get("TRT_DOUBLE_GPUS", "1"))

    def compute_capability(self) -> Tuple[int, int]:
        """(major, minor)."""
        return _sm()

    def name(self) -> str:
        """Device name."""
        return "Double GPU sm%d%d" % _sm()

    def total_memory(self) -> int:
        """Bytes of device memory."""
        return int(os.environ.get("TRT_DOUBLE_MEM_TOTAL", str(8 << 30)))

    def make_context(self, flags: int = 0) -> Context:
        """Create a context and push it on this thread's stack."""
        ctx = Context(self)
        with _state_lock:
            _live_contexts.append(ctx)
        _stack().append(ctx)
        return ctx


class Context:
    """A CUDA context; the current one is per thread."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.valid = True
        self.destroyed = False
        self._thread = threading.get_ident()

    @property
    def detached(self) -> bool:
        """Compatibility: True once detach() ran (destroyed or leaked)."""
        return not self.valid

    def push(self) -> None:
        """Make this context current in the calling thread."""
        if not self.valid:
            raise LogicError("cuCtxPushCurrent failed: invalid device context")
        _stack().append(self)

    @staticmethod
    def pop() -> None:
        """Pop the calling thread's current context."""
        stack = _stack()
        if not stack:
            raise LogicError("context::pop failed: invalid device context - cannot pop non-current context")
        stack.pop()

    @staticmethod
    def get_current() -> Optional[Context]:
        """The calling thread's current context."""
        stack = _stack()
        return stack[-1] if stack else None

    @staticmethod
    def get_device() -> Device:
        """Device of the current context."""
        return _need_context("cuCtxGetDevice").device

    def detach(self) -> None:
        """pycuda's context::detach: destroy when current in this thread (and pop it) or when called by the
        creating thread; from any other thread mark it invalid and silently leak it."""
        if not self.valid:
            raise LogicError("context::detach failed: invalid device context - cannot detach from invalid context")
        stack = _stack()
        active = bool(stack) and stack[-1] is self
        destroy = active or threading.get_ident() == self._thread
        self.valid = False
        with _state_lock:
            if self in _live_contexts:
                _live_contexts.remove(self)
            if destroy:
                self.destroyed = True
            else:
                _leaked_contexts.append(self)
        if active:  # current_context(this): invalid entries on top of this thread's stack are dropped
            while stack and not stack[-1].valid:
                stack.pop()


class DeviceAllocation:
    """Device memory; `int(a)` is its address."""

    def __init__(self, address: int, nbytes: int) -> None:
        self._address = address
        self.nbytes = nbytes
        self.freed = False

    def __int__(self) -> int:
        return self._address

    __index__ = __int__

    def free(self) -> None:
        """Release the memory."""
        if not self.freed:
            self.freed = True
            with _state_lock:
                _memory.pop(self._address, None)


class PagelockedArray(np.ndarray):
    """A numpy array in page-locked host memory (views of it stay page-locked)."""


def _allocated() -> int:
    """Bytes taken from the device pool (call with _state_lock held)."""
    _drain_released()
    held = sum(n for n, what in _held.values() if what != "pinned host" or _unified())
    contexts = (len(_live_contexts) + len(_leaked_contexts)) * _context_bytes()
    return sum(a.nbytes for a in _memory.values()) + held + contexts


def mem_alloc(nbytes: int) -> DeviceAllocation:
    """cuMemAlloc."""
    _need_context("cuMemAlloc")
    nbytes = int(nbytes)
    if nbytes < 1:
        raise LogicError("cuMemAlloc failed: invalid argument")
    total = Device(0).total_memory()
    with _state_lock:
        if _allocated() + nbytes > total:
            raise MemoryError("cuMemAlloc failed: out of memory")
        addr = next(_addresses)
        _memory[addr] = np.zeros(nbytes, dtype=np.uint8)
    return DeviceAllocation(addr, nbytes)


def mem_get_info() -> Tuple[int, int]:
    """(free, total) bytes."""
    _need_context("cuMemGetInfo")
    total = Device(0).total_memory()
    with _state_lock:
        used = _allocated()
    return total - used, total


def pagelocked_empty(shape, dtype, order: str = "C", mem_flags: int = 0) -> PagelockedArray:
    """Page-locked host array."""
    _need_context("cuMemHostAlloc")
    arr = np.empty(shape, dtype=dtype, order=order)
    view = arr.view(PagelockedArray)
    _hold(arr, arr.nbytes, "pinned host")  # freed when the last view of it goes
    return view


def device_memory(address: int) -> np.ndarray:
    """(Double only) the bytes behind a device address, for the TensorRT double."""
    mem = _memory.get(int(address))
    if mem is None:
        raise LogicError("invalid device pointer 0x%x (freed or never allocated)" % int(address))
    return mem


_pageable_copies = [0]


def _host_bytes(arr: np.ndarray, what: str) -> np.ndarray:
    """pycuda takes any contiguous buffer for an async copy; from pageable memory CUDA copies synchronously
    (no overlap), which the double counts in `double_state()["pageable_async_copies"]` for tests to check."""
    if not arr.flags.c_contiguous:
        raise TypeError("%s: expected a contiguous buffer" % what)
    if not isinstance(arr, PagelockedArray):
        _pageable_copies[0] += 1
    return arr.view(np.uint8).reshape(-1)


class Stream:
    """A non-default CUDA stream."""

    def __init__(self, flags: int = 0) -> None:
        _need_context("cuStreamCreate")
        self.handle = next(_streams)

    def synchronize(self) -> None:
        """Wait for queued work (the double runs work immediately)."""
        _need_context("cuStreamSynchronize")

    def is_done(self) -> bool:
        """True: the double runs work immediately."""
        return True


def memcpy_htod_async(dest, src: np.ndarray, stream: Optional[Stream] = None) -> None:
    """Host -> device copy."""
    _need_context("cuMemcpyHtoDAsync")
    data = _host_bytes(src, "memcpy_htod_async")
    mem = device_memory(int(dest))
    if data.size > mem.size:
        raise LogicError("cuMemcpyHtoDAsync failed: invalid argument (copy larger than allocation)")
    mem[: data.size] = data


def memcpy_dtoh_async(dest: np.ndarray, src, stream: Optional[Stream] = None) -> None:
    """Device -> host copy."""
    _need_context("cuMemcpyDtoHAsync")
    out = _host_bytes(dest, "memcpy_dtoh_async")
    mem = device_memory(int(src))
    if out.size > mem.size:
        raise LogicError("cuMemcpyDtoHAsync failed: invalid argument (copy larger than allocation)")
    out[:] = mem[: out.size]


def double_state() -> Dict[str, int]:
    """(Double only) live allocations and contexts, and this thread's context stack depth."""
    with _state_lock:
        return {
            "allocations": len(_memory),
            "allocated_bytes": sum(a.nbytes for a in _memory.values()),
            "contexts": len(_live_contexts),
            "leaked_contexts": len(_leaked_contexts),
            "stack_depth": len(_stack()),
            "used_bytes": _allocated(),
            "pageable_async_copies": _pageable_copies[0],
        }


def double_reset_leaks() -> None:
    """(Double only) forget leaked contexts (between tests)."""
    with _state_lock:
        _leaked_contexts.clear()
