"""The one `Engine` interface every backend implements.

The base class validates input names, dtypes and shapes once, in `infer`; backends implement
`_infer_impl` and trust their inputs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np

from edge_agent.errors import InputError


@dataclass(frozen=True)
class TensorSpec:
    """Name, numpy dtype name and shape of a tensor; -1 marks the dynamic batch axis."""

    name: str
    dtype: str
    shape: Tuple[int, ...]

    def with_batch(self, batch: int) -> Tuple[int, ...]:
        """The concrete shape for `batch` items."""
        return (batch, *self.shape[1:])


class Engine(abc.ABC):
    """A loaded model that runs batches: `infer({name: array}) -> {name: array}`."""

    backend: str = "?"

    def __init__(self, *, inputs: List[TensorSpec], outputs: List[TensorSpec], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.max_batch = max_batch
        self._closed = False
        # precomputed for the per-call check: (name, dtype, fixed (axis, size) pairs, ndim)
        self._input_names = frozenset(s.name for s in self.inputs)
        self._checks = [
            (s.name, np.dtype(s.dtype), tuple((i, d) for i, d in enumerate(s.shape) if d != -1), len(s.shape))
            for s in self.inputs
        ]

    def infer(self, feed: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one batch. Raises InputError for a feed that does not match the input specs."""
        if self._closed:
            raise InputError("engine is closed")
        self.check_feed(feed)
        return self._infer_impl(feed)

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> int:
        """Validate names, dtypes and shapes; returns the batch size.

        The passing path is kept short (it runs on every call); messages are built only on failure.
        """
        if len(feed) != len(self._input_names) or not self._input_names.issuperset(feed):
            self._refuse_names(feed)
        batch = -1
        for name, dtype, fixed, ndim in self._checks:
            x = feed[name]
            if type(x) is not np.ndarray and not isinstance(x, np.ndarray):
                raise InputError("input %s must be a numpy array" % name)
            if x.dtype != dtype:
                raise InputError("input %s has dtype %s, expected %s" % (name, x.dtype, dtype.name))
            shape = x.shape
            if len(shape) != ndim:
                self._refuse_shape(name, shape)
            for i, d in fixed:
                if shape[i] != d:
                    self._refuse_shape(name, shape)
            if batch < 0:
                batch = shape[0]
            elif shape[0] != batch:
                raise InputError("inputs disagree on the batch size (%d vs %d)" % (batch, shape[0]))
        if not 1 <= batch <= self.max_batch:
            raise InputError("batch of %d is outside 1..%d" % (batch, self.max_batch))
        return batch

    def _refuse_shape(self, name: str, shape: Tuple[int, ...]) -> None:
        spec = next(s for s in self.inputs if s.name == name)
        raise InputError("input %s has shape %s, expected %s" % (name, tuple(shape), _fmt_shape(spec.shape)))

    def _refuse_names(self, feed: Mapping[str, np.ndarray]) -> None:
        want = self._input_names
        raise InputError(
            "inputs %s expected, got %s" % (", ".join(sorted(want)), ", ".join(sorted(feed)) or "none")
        )

    @abc.abstractmethod
    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Backend inference on a validated feed."""

    def close(self) -> None:
        """Free everything the engine holds. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close_impl()

    def _close_impl(self) -> None:
        """Backend clean-up."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt_shape(shape: Tuple[int, ...]) -> str:
    return "(" + ", ".join("N" if d == -1 else str(d) for d in shape) + ")"
