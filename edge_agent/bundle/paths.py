"""Bundle member path rules (shared by the manifest model and the archive code)."""

from __future__ import annotations

from edge_agent.errors import ArchiveError

MAX_PATH_LEN = 255


def check_member_path(path: str) -> str:
    """Accept only relative POSIX paths without `..`, empty parts, backslashes or control characters."""
    if not isinstance(path, str) or not path:
        raise ArchiveError("empty member path")
    if len(path) > MAX_PATH_LEN:
        raise ArchiveError("member path longer than %d characters" % MAX_PATH_LEN)
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise ArchiveError("absolute member path %r" % path)
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ArchiveError("member path %r has backslashes or control characters" % path)
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ArchiveError("member path %r contains '..', '.' or an empty part" % path)
    return path
