"""The bundle archive, one test per hostile archive: each asserts the error type AND what is on disk
afterwards (the destination does not exist, nothing escaped, no temporary directory is left)."""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from pathlib import Path

import pytest
from bundle_helpers import (
    FILES,
    MIB,
    body_dict,
    good_members,
    member,
    signed_bytes,
    tree,
    write_files,
    write_tar,
)

from edge_agent.bundle.archive import check_bundle_files, pack_bundle, read_bundle, unpack_bundle
from edge_agent.bundle.manifest import ManifestBody
from edge_agent.bundle.verify import read_unverified
from edge_agent.errors import ArchiveError, IntegrityError, ManifestError, ResourceError
from edge_agent.signing import PrivateKey

KEY = PrivateKey.generate("test")


@pytest.fixture
def manifest_raw():
    return signed_bytes(body_dict(), [KEY])


@pytest.fixture
def manifest(manifest_raw):
    return read_unverified(manifest_raw, max_manifest_bytes=MIB)


@pytest.fixture
def area(tmp_path):
    """A parent folder for destinations: after a refusal it must hold exactly what it held before."""
    d = tmp_path / "bundles"
    d.mkdir()
    (d / "active").mkdir()
    (d / "active" / "keep.txt").write_text("previous bundle")
    return d


def _unpack(path: Path, dest: Path, manifest: ManifestBody, **kw):
    kw.setdefault("max_bundle_bytes", 16 * MIB)
    return unpack_bundle(path, dest, manifest, **kw)


def _assert_untouched(area: Path) -> None:
    assert tree(area) == ["active", "active/keep.txt"]
    assert (area / "active" / "keep.txt").read_text() == "previous bundle"


# ----------------------------------------------------------------------------------------- good path


def test_pack_then_unpack_restores_every_file(tmp_path, area, manifest_raw, manifest):
    bundle = pack_bundle(manifest_raw, write_files(tmp_path), tmp_path / "b.tar")
    raw, reader = read_bundle(bundle, max_manifest_bytes=MIB, max_bundle_bytes=16 * MIB)
    with reader:
        assert raw == manifest_raw
        assert next(iter(reader.members)) == "manifest.json"
        check_bundle_files(reader, manifest)
    dest = _unpack(bundle, area / "v3", manifest)
    for name, data in FILES.items():
        p = dest / name
        assert p.read_bytes() == data
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert (dest / "manifest.json").read_bytes() == manifest_raw
    assert sorted(os.listdir(area)) == ["active", "v3"]


def test_pack_is_reproducible(tmp_path, manifest_raw):
    files = write_files(tmp_path)
    a = pack_bundle(manifest_raw, files, tmp_path / "a.tar").read_bytes()
    b = pack_bundle(manifest_raw, files, tmp_path / "b.tar").read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


def test_pack_refuses_unsafe_file_names(tmp_path, manifest_raw):
    with pytest.raises(ArchiveError):
        pack_bundle(manifest_raw, {"../x": tmp_path}, tmp_path / "bad.tar")
    with pytest.raises(ArchiveError):
        pack_bundle(manifest_raw, {"manifest.json": tmp_path}, tmp_path / "bad.tar")
    assert not (tmp_path / "bad.tar").exists()


def test_unpack_accepts_directory_members(tmp_path, area, manifest_raw, manifest):
    members = good_members(manifest_raw)
    members.insert(1, member("models", kind=tarfile.DIRTYPE))
    dest = _unpack(write_tar(tmp_path / "b.tar", members), area / "v3", manifest)
    assert (dest / "models" / "small.onnx").read_bytes() == FILES["models/small.onnx"]


# ------------------------------------------------------------------------------------ hostile members


def _refused(tmp_path, area, manifest, members, *, exc, match):
    bundle = write_tar(tmp_path / "evil.tar", members)
    with pytest.raises(exc, match=match):
        _unpack(bundle, area / "v3", manifest)
    _assert_untouched(area)
    assert not (tmp_path / "escape").exists()
    assert not Path("/tmp/edge-agent-test-escape").exists()


def test_dotdot_member_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("models/../../escape", b"x")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match=r"\.\.")


def test_absolute_member_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("/tmp/edge-agent-test-escape", b"x")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="absolute")


def test_symlink_member_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("models/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="symlink")


def test_symlink_replacing_a_listed_file_refused(tmp_path, area, manifest_raw, manifest):
    members = [m for m in good_members(manifest_raw) if m[0].name != "models/large.onnx"]
    members.append(member("models/large.onnx", kind=tarfile.SYMTYPE, linkname="../../escape"))
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="symlink")


def test_hardlink_member_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("models/hard", kind=tarfile.LNKTYPE, linkname="manifest.json")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="hardlink")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_device_member_refused(tmp_path, area, manifest_raw, manifest, kind):
    members = [*good_members(manifest_raw), member("models/dev", kind=kind)]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="device")


def test_fifo_member_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("models/pipe", kind=tarfile.FIFOTYPE)]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="fifo")


def test_duplicate_member_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("models/small.onnx", b"second copy with other bytes")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="twice")


def test_file_that_is_also_a_directory_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("models/small.onnx/inner", b"x")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="both a file and a directory")
    members = [member("manifest.json", manifest_raw), member("a/b", b"x"), member("a", b"y")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="both a file and a directory")


def test_member_not_listed_in_manifest_refused(tmp_path, area, manifest_raw, manifest):
    members = [*good_members(manifest_raw), member("models/extra.bin", b"unlisted")]
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="not listed")


def test_missing_file_refused(tmp_path, area, manifest_raw, manifest):
    members = [m for m in good_members(manifest_raw) if m[0].name != "golden/inputs.npz"]
    _refused(tmp_path, area, manifest, members, exc=IntegrityError, match="lacks")


def test_tampered_file_refused(tmp_path, area, manifest_raw, manifest):
    data = bytearray(FILES["models/large.onnx"])
    data[5] ^= 0xFF  # same size, different bytes
    members = [m if m[0].name != "models/large.onnx" else member("models/large.onnx", bytes(data))
               for m in good_members(manifest_raw)]
    _refused(tmp_path, area, manifest, members, exc=IntegrityError, match="sha256")


def test_tampered_file_detected_by_check_without_unpacking(tmp_path, manifest_raw, manifest):
    data = b"Y" * len(FILES["golden/inputs.npz"])
    members = [m if m[0].name != "golden/inputs.npz" else member("golden/inputs.npz", data)
               for m in good_members(manifest_raw)]
    _, reader = read_bundle(write_tar(tmp_path / "t.tar", members), max_manifest_bytes=MIB, max_bundle_bytes=MIB)
    with reader, pytest.raises(IntegrityError, match="sha256"):
        check_bundle_files(reader, manifest)


def test_oversized_member_refused(tmp_path, area, manifest_raw, manifest):
    big = FILES["models/small.onnx"] + b"!" * 4096
    members = [m if m[0].name != "models/small.onnx" else member("models/small.onnx", big)
               for m in good_members(manifest_raw)]
    _refused(tmp_path, area, manifest, members, exc=IntegrityError, match="the manifest says")


def test_member_over_file_limit_refused(tmp_path, area, manifest_raw, manifest):
    bundle = write_tar(tmp_path / "b.tar", good_members(manifest_raw))
    with pytest.raises(ArchiveError, match="limit"):
        _unpack(bundle, area / "v3", manifest, max_file_bytes=100)
    _assert_untouched(area)


def test_bundle_over_total_size_limit_refused(tmp_path, area, manifest_raw, manifest):
    bundle = write_tar(tmp_path / "b.tar", good_members(manifest_raw))
    with pytest.raises(ArchiveError, match="limit"):
        _unpack(bundle, area / "v3", manifest, max_bundle_bytes=manifest.total_size() - 1)
    with pytest.raises(ArchiveError, match="limit"):
        read_bundle(bundle, max_manifest_bytes=MIB, max_bundle_bytes=len(manifest_raw) + 100)
    _assert_untouched(area)


def test_size_header_larger_than_the_file_refused(tmp_path, area, manifest_raw, manifest):
    head = write_tar(tmp_path / "head.tar", good_members(manifest_raw)[:1]).read_bytes()
    end = len(head.rstrip(b"\0")) + 511
    end -= end % 512
    # a member whose header claims 1 MiB, followed by only a little data and no end marker
    ti, _ = member("models/small.onnx", b"", size=MIB)
    lie = tmp_path / "lie.tar"
    lie.write_bytes(head[:end] + ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + b"x" * 4096)
    with pytest.raises(ArchiveError, match="truncated"):
        _unpack(lie, area / "v3", manifest)
    _assert_untouched(area)


@pytest.mark.parametrize("cut", ["in-data", "at-boundary", "no-end-marker"])
def test_truncated_archive_refused(tmp_path, area, manifest_raw, manifest, cut):
    full = write_tar(tmp_path / "full.tar", good_members(manifest_raw)).read_bytes()
    _, reader = read_bundle(tmp_path / "full.tar", max_manifest_bytes=MIB, max_bundle_bytes=MIB)
    with reader:
        last = list(reader.members.values())[-1]
    if cut == "in-data":
        data = full[: last.offset + last.size // 2]
    elif cut == "at-boundary":
        data = full[: last.offset - 512]  # drop the last member entirely, header included
    else:
        data = full[: last.offset + 512]  # last member complete, end-of-archive blocks gone
    bundle = tmp_path / "cut.tar"
    bundle.write_bytes(data)
    with pytest.raises((ArchiveError, IntegrityError)):
        _unpack(bundle, area / "v3", manifest)
    _assert_untouched(area)


def test_manifest_not_first_refused(tmp_path, area, manifest_raw, manifest):
    members = good_members(manifest_raw)
    members = members[1:] + members[:1]
    with pytest.raises(ArchiveError, match="first bundle member"):
        read_bundle(write_tar(tmp_path / "b.tar", members), max_manifest_bytes=MIB, max_bundle_bytes=MIB)
    _refused(tmp_path, area, manifest, members, exc=ArchiveError, match="first bundle member")


def test_oversized_manifest_member_refused(tmp_path, manifest_raw):
    bundle = write_tar(tmp_path / "b.tar", good_members(manifest_raw))
    with pytest.raises(ArchiveError, match="limit"):
        read_bundle(bundle, max_manifest_bytes=len(manifest_raw) - 1, max_bundle_bytes=MIB)


def test_archive_manifest_differs_from_verified_one_refused(tmp_path, area, manifest):
    other = signed_bytes(body_dict(version=4), [KEY])
    members = good_members(other)
    _refused(tmp_path, area, manifest, members, exc=IntegrityError, match="not the manifest that was verified")


def test_not_a_tar_refused(tmp_path, area, manifest):
    bundle = tmp_path / "junk.tar"
    bundle.write_bytes(os.urandom(4096))
    with pytest.raises(ArchiveError):
        _unpack(bundle, area / "v3", manifest)
    bundle.write_bytes(b"")
    with pytest.raises(ArchiveError):
        _unpack(bundle, area / "v3", manifest)
    _assert_untouched(area)


def test_compressed_tar_refused(tmp_path, manifest_raw):
    plain = write_tar(tmp_path / "b.tar", good_members(manifest_raw))
    gz = tmp_path / "b.tar.gz"
    with tarfile.open(plain) as src, tarfile.open(gz, "w:gz") as dst:
        for ti in src.getmembers():
            dst.addfile(ti, src.extractfile(ti))
    with pytest.raises(ArchiveError):
        read_bundle(gz, max_manifest_bytes=MIB, max_bundle_bytes=MIB)


def test_existing_destination_refused_and_unchanged(tmp_path, area, manifest_raw, manifest):
    bundle = pack_bundle(manifest_raw, write_files(tmp_path), tmp_path / "b.tar")
    with pytest.raises(ResourceError, match="already exists"):
        _unpack(bundle, area / "active", manifest)
    _assert_untouched(area)


def test_unlisted_manifest_in_archive_does_not_parse_as_manifest(tmp_path, area, manifest):
    members = [member("manifest.json", b"{not json"), *good_members(b"")[1:]]
    _refused(tmp_path, area, manifest, members, exc=ManifestError, match="JSON")


def test_failure_while_writing_leaves_nothing_behind(tmp_path, area, manifest_raw, manifest):
    # the second file is corrupt: the first one was already written into the temporary folder
    members = good_members(manifest_raw)
    last = members[-1][0].name
    members[-1] = member(last, b"Z" * members[-1][0].size)
    _refused(tmp_path, area, manifest, members, exc=IntegrityError, match="sha256")


def test_oversized_pax_header_refused_before_tarfile_reads_it(tmp_path, area, manifest):
    # a pax header claiming 100 MiB of metadata: tarfile would read it all into memory
    ti, _ = member("pax", b"", kind=tarfile.XHDTYPE, size=100 * MIB)
    bundle = tmp_path / "pax.tar"
    bundle.write_bytes(ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + b"\0" * 4096)
    with pytest.raises(ArchiveError, match="metadata header"):
        _unpack(bundle, area / "v3", manifest)
    _assert_untouched(area)


def test_long_member_names_within_limits_round_trip(tmp_path, area):
    name = "models/" + "d" * 100 + "/" + "n" * 120 + ".onnx"
    files = {**FILES, name: b"long-named"}
    body = body_dict(files)
    raw = signed_bytes(body, [KEY])
    bundle = pack_bundle(raw, write_files(tmp_path, files), tmp_path / "long.tar")
    dest = _unpack(bundle, area / "v3", read_unverified(raw, max_manifest_bytes=MIB))
    assert (dest / name).read_bytes() == b"long-named"
