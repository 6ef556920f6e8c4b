"""Raw inputs to model tensors, as the manifest's `Preprocessing` says.

Images: decode (JPEG/PNG with OpenCV), colour conversion, resize, dtype, scale, mean/std, layout.
Tensors (`.npy` bodies): shape checked against the model input, values cast to its dtype when safe.
OpenCV is imported lazily, so tensor-only callers never need it.
"""

from __future__ import annotations

import io
import math
import re
from typing import List, Optional, Tuple

import numpy as np

from edge_agent.bundle.manifest import Preprocessing, TensorDecl
from edge_agent.errors import InputError

#: Decoded images bigger than this (pixels) are refused before any resize (decompression bombs).
MAX_IMAGE_PIXELS = 40_000_000


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise InputError("image input needs OpenCV (pip install opencv-python-headless)") from e
    return cv2


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> BGR uint8 (H, W, 3) or grayscale (H, W); InputError when it does not decode."""
    cv2 = _cv2()
    if not data:
        raise InputError("empty image body")
    size = image_size(data)
    if size is None:
        raise InputError("body is not a decodable JPEG or PNG image")
    # Refuse decompression bombs from the header, before decoding any pixel.
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise InputError("image of %dx%d is larger than %d pixels" % (size[1], size[0], MAX_IMAGE_PIXELS))
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise InputError("body is not a decodable JPEG or PNG image")
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return img


def image_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) from a PNG or JPEG header, or None when the bytes are neither."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        if seg_len < 2:
            return None
        i += 2 + seg_len
    return None


#: Dimensions an `.npy` body may declare.
MAX_NPY_DIMS = 8


def read_npy(data: bytes, *, max_bytes: int) -> np.ndarray:
    """A `.npy` body -> array; InputError when it is not one.

    The header is parsed and checked before anything is allocated: the magic string (so a zip/npz
    archive, ``PK...``, is refused rather than opened), no pickled objects, at most `MAX_NPY_DIMS`
    dimensions, and a declared shape whose size equals the bytes that follow (a header claiming 74 GiB
    in a 1 KiB body is refused, not allocated). The array views the body's bytes (read-only).
    """
    if len(data) > max_bytes:
        raise InputError("tensor body of %d bytes is over the %d byte limit" % (len(data), max_bytes))
    fmt = np.lib.format
    if not data.startswith(fmt.MAGIC_PREFIX):
        raise InputError("body is not a .npy tensor (no NUMPY magic; .npz archives are not accepted)")
    parsed = _fast_npy_header(data)
    if parsed is not None:
        shape, fortran, dtype, offset = parsed
    else:
        shape, fortran, dtype, offset = _numpy_npy_header(data)
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.subdtype is not None:
        raise InputError("tensor dtype %s is not accepted (booleans, integers and floats only)" % dtype)
    if len(shape) > MAX_NPY_DIMS or any(d < 0 for d in shape):
        raise InputError("tensor shape %s is not accepted (at most %d dimensions)" % (shape, MAX_NPY_DIMS))
    count = 1
    for d in shape:
        count *= int(d)  # Python ints: a hostile shape cannot overflow
    payload = len(data) - offset
    if count * dtype.itemsize != payload:
        raise InputError("tensor header declares shape %s of %s (%d bytes) but the body holds %d bytes"
                         % (shape, dtype, count * dtype.itemsize, payload))
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


#: The header `np.save` writes (format 1.0): a dict literal with these keys in this order.
_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][biuf][0-9]{1,2})', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \} *\n")
_NPY_DTYPES = {}  # descr -> np.dtype, filled as seen (a handful of entries)


def _fast_npy_header(data: bytes) -> Optional[Tuple[Tuple[int, ...], bool, np.dtype, int]]:
    """(shape, fortran order, dtype, data offset) of a version 1.0 header in the exact form `np.save`
    writes, read with one regular expression; None for any other header (numpy's parser then reads it)."""
    if data[6:8] != b"\x01\x00" or len(data) < 10:
        return None
    end = 10 + int.from_bytes(data[8:10], "little")
    m = _NPY_HEADER.fullmatch(data, 10, end)
    if m is None:
        return None
    descr, fortran, dims = m.group(1), m.group(2) == b"True", m.group(3)
    dtype = _NPY_DTYPES.get(descr)
    if dtype is None:
        dtype = np.dtype(descr.decode("ascii"))
        if len(_NPY_DTYPES) < 64:
            _NPY_DTYPES[descr] = dtype
    try:
        shape = tuple(int(d) for d in dims.split(b",") if d.strip())
    except ValueError:
        return None
    if dims.strip() and not dims.strip().endswith(b",") and len(shape) == 1:
        return None  # "(3)" is not a tuple: leave odd headers to numpy
    return shape, fortran, dtype, end


def _numpy_npy_header(data: bytes) -> Tuple[Tuple[int, ...], bool, np.dtype, int]:
    """The header read by numpy's own (slower, general) parser; InputError when it is not one."""
    fmt = np.lib.format
    f = io.BytesIO(data)
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError("unsupported .npy version %s" % (version,))
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise InputError("body is not a .npy tensor: %s" % (str(e).splitlines()[0] if str(e) else type(e).__name__))
    return tuple(shape), bool(fortran), dtype, f.tell()


class Preprocessor:
    """Turns images or tensors into one item (no batch axis) of a model input."""

    def __init__(self, pre: Preprocessing, decl: TensorDecl) -> None:
        self.pre = pre
        self.decl = decl
        self.item_shape: Tuple[int, ...] = tuple(decl.shape[1:])
        self.dtype = np.dtype(decl.dtype)
        self.scale = float(pre.scale)
        self.mean: Optional[np.ndarray] = np.array([float(v) for v in pre.mean], np.float32) if pre.mean else None
        self.std: Optional[np.ndarray] = np.array([float(v) for v in pre.std], np.float32) if pre.std else None
        if self.std is not None and np.any(self.std == 0):
            raise InputError("preprocessing std must not contain 0")
        if len(self.item_shape) == 3:
            if pre.layout == "nchw":
                self.channels, h, w = self.item_shape
            else:
                h, w, self.channels = self.item_shape
        elif len(self.item_shape) == 2:  # (H, W): a single channel without a channel axis
            self.channels = 1
            h, w = self.item_shape
        else:
            self.channels, h, w = 0, 0, 0
        self.size_hw: Tuple[int, int] = (int(pre.resize[0]), int(pre.resize[1])) if pre.resize else (int(h), int(w))

    @property
    def accepts_images(self) -> bool:
        """Whether the model input is an image tensor (2-D or 3-D item with 1 or 3 channels)."""
        return self.channels in (1, 3) and self.size_hw[0] > 0

    # ------------------------------------------------------------------------------------------ images
    def from_image_bytes(self, data: bytes) -> Tuple[np.ndarray, Tuple[int, int]]:
        """Decode and preprocess; returns the item and the original (height, width)."""
        img = decode_image(data)
        return self.from_decoded(img), (int(img.shape[0]), int(img.shape[1]))

    def from_decoded(self, img: np.ndarray) -> np.ndarray:
        """Preprocess a decoded image: BGR (H, W, 3) as OpenCV gives it, or grayscale (H, W)."""
        if not self.accepts_images:
            raise InputError("this model's input %s %s is not an image" % (self.decl.name, self.decl.shape))
        cv2 = _cv2()
        color = self.pre.color
        if img.ndim == 2:
            if color != "gray":
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB if color == "rgb" else cv2.COLOR_GRAY2BGR)
        elif color == "gray":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif color == "rgb":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        h, w = self.size_hw
        if img.shape[:2] != (h, w):
            shrink = img.shape[0] > h or img.shape[1] > w
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        if img.ndim == 2:
            img = img[:, :, None]
        if img.shape[2] != self.channels:
            raise InputError(
                "preprocessing gives %d channels (color=%s) but the model wants %d"
                % (img.shape[2], color, self.channels)
            )
        x = img.astype(np.float32) * self.scale
        if self.mean is not None:
            x = x - self._per_channel(self.mean, "mean")
        if self.std is not None:
            x = x / self._per_channel(self.std, "std")
        if len(self.item_shape) == 2:
            x = x[:, :, 0]
        elif self.pre.layout == "nchw":
            x = np.transpose(x, (2, 0, 1))
        return self._cast(np.ascontiguousarray(x))

    def _per_channel(self, v: np.ndarray, what: str) -> np.ndarray:
        if v.size not in (1, self.channels):
            raise InputError("preprocessing %s has %d values for %d channels" % (what, v.size, self.channels))
        return v.reshape(1, 1, -1)

    def _cast(self, x: np.ndarray) -> np.ndarray:
        if self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            x = np.clip(np.rint(x), info.min, info.max)
        return x.astype(self.dtype, copy=False)

    # ----------------------------------------------------------------------------------------- tensors
    def from_tensor(self, x: np.ndarray) -> np.ndarray:
        """Check a tensor against the input (with or without a leading batch axis of 1) and cast it."""
        x = np.asarray(x)
        if x.ndim == len(self.item_shape) + 1 and x.shape[0] == 1:
            x = x[0]
        if tuple(x.shape) != self.item_shape:
            raise InputError(
                "tensor has shape %s, expected %s or %s for input %s"
                % (_shape(x.shape), _shape(self.item_shape), _shape((1, *self.item_shape)), self.decl.name)
            )
        return self._cast_tensor(x)

    def from_tensor_batch(self, x: np.ndarray, *, max_items: int) -> np.ndarray:
        """Check a batch (N, *item shape) of 1..`max_items` items and cast it."""
        x = np.asarray(x)
        if x.ndim != len(self.item_shape) + 1 or tuple(x.shape[1:]) != self.item_shape:
            raise InputError(
                "tensor batch has shape %s, expected (N, %s) for input %s"
                % (_shape(x.shape), ", ".join(str(d) for d in self.item_shape), self.decl.name)
            )
        if not 1 <= x.shape[0] <= max_items:
            raise InputError("a request may hold 1 to %d items, this one holds %d" % (max_items, x.shape[0]))
        return self._cast_tensor(x)

    def _cast_tensor(self, x: np.ndarray) -> np.ndarray:
        """Cast to the input dtype only when safe; anything else is the client's error (InputError).

        Tensors are model-ready: the bundle's scale/mean/std are not applied to them. Allowed casts are
        numpy's "safe" ones (uint8 -> float32 keeps every value), float to a narrower float when every
        value stays finite, and integer to a narrower integer when every value fits. An int32/int64 tensor
        for a float input is refused: float32 cannot hold every such value, and such tensors are usually
        raw, unscaled values. NaN/Inf inputs are refused, never handed to a model.
        """
        if x.dtype.kind not in "biuf":
            raise InputError("tensor has dtype %s, which cannot be used as %s" % (x.dtype, self.dtype))
        if x.dtype.kind == "f" and not _all_finite(x):
            raise InputError("tensor contains NaN or infinite values")
        if x.dtype == self.dtype:
            return np.ascontiguousarray(x)
        to = self.dtype
        if not (np.can_cast(x.dtype, to, "safe") or (x.dtype.kind == to.kind == "f")
                or (x.dtype.kind in "biu" and to.kind in "iu")):
            raise InputError("tensor has dtype %s, which cannot be cast safely to input %s's %s%s"
                             % (x.dtype, self.decl.name, to,
                                "; send model-ready %s values (the bundle's scale/mean/std are applied to images "
                                "only)" % to if to.kind == "f" else ""))
        if to.kind in "iu" and x.size:
            info = np.iinfo(to)
            lo, hi = int(x.min()), int(x.max())
            if lo < info.min or hi > info.max:
                raise InputError("tensor values %d..%d are outside the %s range of input %s"
                                 % (lo, hi, to, self.decl.name))
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(x.astype(to))
        if to.kind == "f" and not _all_finite(out):  # float64 1e300 -> float32 inf
            raise InputError("tensor values are out of the %s range of input %s" % (to, self.decl.name))
        return out


def _all_finite(x: np.ndarray) -> bool:
    """Whether every value is finite. On a few float32/16 values a Python sum in double precision is
    finite exactly when every value is (they cannot overflow it), at a tenth of np.isfinite's cost."""
    if x.size <= 256 and x.dtype.itemsize <= 4:
        return math.isfinite(sum(x.ravel().tolist()))
    return bool(np.isfinite(x).all())


def _shape(shape: Tuple[int, ...]) -> str:
    dims: List[str] = [str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"
