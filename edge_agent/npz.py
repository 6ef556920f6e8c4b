"""One bounded reader for `.npz` files (golden sets, router heads, calibration data).

`np.load` lets `zipfile.BadZipFile`, `EOFError` and `zlib.error` escape from a corrupt or truncated file
(none of them is an OSError or ValueError), allocates whatever shape an array header declares, and
unpickles when asked to. Here the zip directory is read by `zipfile`, every member is checked before
it is read — a `.npy` name, a declared size within `max_bytes`, an array header whose shape and dtype
fit in the member's declared size, no object arrays — and every failure is an `NpzError` with one line.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Dict

import numpy as np

from edge_agent.errors import EdgeAgentError

#: Largest total of the arrays' declared sizes accepted, in bytes.
DEFAULT_MAX_BYTES = 1 << 30
#: Most arrays one file may hold.
MAX_ARRAYS = 256


class NpzError(EdgeAgentError, ValueError):
    """An `.npz` file that cannot be read, is not an npz, or is over a limit; the message is one line."""


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """(shape, dtype) from a member's .npy header, read without reading the data."""
    fmt = np.lib.format
    with zf.open(info) as f:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError("unsupported .npy version %s" % (version,))
    return shape, dtype


def _check_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    if not info.filename.endswith(".npy") or info.is_dir():
        raise NpzError("member %r is not a .npy array" % info.filename[:80])
    shape, dtype = _header(zf, info)
    if dtype.hasobject:
        raise NpzError("array %r holds Python objects (pickles are never loaded)" % info.filename[:-4])
    nbytes = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if nbytes > info.file_size:
        raise NpzError("array %r declares %d bytes but its member holds %d" % (info.filename[:-4], nbytes,
                                                                              info.file_size))


def load_npz(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Dict[str, np.ndarray]:
    """Every array of the `.npz` at `path`, by name. NpzError for anything unreadable or over a limit."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise NpzError("file of %d bytes is over the %d byte limit" % (size, max_bytes))
        with zipfile.ZipFile(str(path)) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARRAYS:
                raise NpzError("it holds %d arrays, at most %d are read" % (len(infos), MAX_ARRAYS))
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise NpzError("it unpacks to %d bytes, over the %d byte limit" % (total, max_bytes))
            out: Dict[str, np.ndarray] = {}
            for info in infos:
                _check_member(zf, info)
                with zf.open(info) as f:
                    out[info.filename[:-4]] = np.lib.format.read_array(f, allow_pickle=False)
            return out
    except NpzError as e:
        raise NpzError("%s: %s" % (path.name, e)) from None
    except FileNotFoundError:
        raise NpzError("%s does not exist" % path) from None
    except zipfile.BadZipFile as e:
        raise NpzError("%s is not an npz (zip) file or is damaged: %s" % (path.name, e)) from None
    except (OSError, ValueError, EOFError, zlib.error, NotImplementedError, zipfile.LargeZipFile) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NpzError("%s cannot be read: %s" % (path.name, msg)) from None
