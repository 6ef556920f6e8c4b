"""Corrupt `.npz` files, through the one bounded loader (`edge_agent/npz.py`) and each command that reads
one. Before, `zipfile.BadZipFile` (neither OSError nor ValueError) escaped `np.load` as a traceback from
`fleet router calibrate --data`, `fleet bundle build` (golden inputs), the golden self-test and the
linear router head; now each is one line naming the file."""

from __future__ import annotations

import io
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import BundleError
from edge_agent.npz import MAX_ARRAYS, NpzError, load_npz
from edge_agent.runtime.errors import RouterPolicyError
from edge_agent.runtime.router import LinearHead
from fleet.cli import main as fleet_main

DIGITS = Path(__file__).resolve().parents[1] / "samples" / "digits"


def _good(path: Path) -> Path:
    np.savez(str(path), x=np.arange(12, dtype=np.float32).reshape(3, 4), y=np.array([0, 1, 0]))
    return path


def _corrupt(tmp_path: Path) -> dict:
    good = _good(tmp_path / "good.npz").read_bytes()
    out = {
        "pk-prefixed": b"PK\x03\x04" + os.urandom(200),
        "truncated": good[: len(good) // 2],
        "random": os.urandom(1000),
        "empty": b"",
    }
    # A stored member with one data byte flipped: the zip directory is fine, the CRC is not.
    flipped = bytearray(good)
    flipped[good.index(b"\x93NUMPY") + 140] ^= 0xFF
    out["bad-crc"] = bytes(flipped)
    paths = {}
    for name, data in out.items():
        p = tmp_path / (name + ".npz")
        p.write_bytes(data)
        paths[name] = p
    return paths


def _npz_with(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_good_npz_reads_every_array(tmp_path):
    z = load_npz(_good(tmp_path / "good.npz"))
    assert sorted(z) == ["x", "y"] and z["x"].shape == (3, 4)


@pytest.mark.parametrize("kind", ["pk-prefixed", "truncated", "random", "empty", "bad-crc"])
def test_corrupt_npz_is_one_npz_error(tmp_path, kind):
    path = _corrupt(tmp_path)[kind]
    with pytest.raises(NpzError) as e:
        load_npz(path)
    assert path.name in str(e.value) and "\n" not in str(e.value)


def test_hostile_members_refused_before_their_data_is_read(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10 ** 9,)})
    liar = tmp_path / "liar.npz"  # declares 8 GB, holds a few bytes
    liar.write_bytes(_npz_with({"x.npy": header.getvalue() + b"\0" * 16}))
    with pytest.raises(NpzError, match="declares 8000000000 bytes"):
        load_npz(liar)
    pickled = tmp_path / "objects.npz"
    np.savez(str(pickled), x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(NpzError, match="Python objects"):
        load_npz(pickled)
    other = tmp_path / "other.npz"
    other.write_bytes(_npz_with({"run.sh": b"echo"}))
    with pytest.raises(NpzError, match=r"not a \.npy array"):
        load_npz(other)
    many = tmp_path / "many.npz"
    np.savez(str(many), **{"a%d" % i: np.zeros(1) for i in range(MAX_ARRAYS + 1)})
    with pytest.raises(NpzError, match="at most %d" % MAX_ARRAYS):
        load_npz(many)
    with pytest.raises(NpzError, match="over the 100 byte limit"):
        load_npz(_good(tmp_path / "big.npz"), max_bytes=100)


def test_fleet_router_calibrate_with_a_corrupt_data_file_is_one_line(tmp_path, capsys):
    assert fleet_main(["keygen", "--out", str(tmp_path), "--name", "release"]) == 0
    bundle = tmp_path / "digits.bundle"
    assert fleet_main(["bundle", "build", str(DIGITS / "bundle.toml"), "--key", str(tmp_path / "release.key"),
                       "--out", str(bundle)]) == 0
    capsys.readouterr()
    for kind, path in _corrupt(tmp_path).items():
        rc = fleet_main(["router", "calibrate", str(bundle), "--data", str(path)])
        err = capsys.readouterr().err
        assert rc != 0 and re.search(r"cannot read .*%s" % re.escape(path.name), err), (kind, err)
        assert len(err.strip().splitlines()) == 1, err


def test_fleet_bundle_build_with_corrupt_golden_inputs_is_one_line(tmp_path, capsys):
    assert fleet_main(["keygen", "--out", str(tmp_path), "--name", "release"]) == 0
    spec = tmp_path / "spec"
    shutil.copytree(str(DIGITS), str(spec))
    for kind, path in _corrupt(tmp_path).items():
        shutil.copyfile(str(path), str(spec / "golden.npz"))
        rc = fleet_main(["bundle", "build", str(spec / "bundle.toml"), "--key", str(tmp_path / "release.key"),
                         "--out", str(tmp_path / "out.bundle")])
        err = capsys.readouterr().err
        assert rc != 0 and "golden.npz" in err and "Traceback" not in err, (kind, err)
        assert len(err.strip().splitlines()) == 1, err


def test_golden_self_test_and_router_head_with_corrupt_npz_are_named_errors(tmp_path):
    from edge_agent.engines.golden import _load_npz

    for path in _corrupt(tmp_path).values():
        with pytest.raises(BundleError, match="golden file %s" % re.escape(path.name)):
            _load_npz(path)
        with pytest.raises(RouterPolicyError, match="cannot read linear head %s" % re.escape(path.name)):
            LinearHead.load(path)
