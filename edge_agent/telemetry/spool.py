"""A bounded, crash-safe disk spool for messages that could not be published (broker unreachable).

Layout of the spool directory::

    seg-<first seq, 20 digits>.log   append-only segments of records
    head.json                        {"head": first unacknowledged seq, "dropped": messages dropped so far}

A record (`spool_format`) is a 24-byte header (magic, body length, seq, CRC-32 of seq+body) followed by
the body (QoS byte, topic length, topic, payload). Appends are fsynced, so after a crash (kill -9, power loss)
at most the last record is torn; a torn or corrupt record ends the reading of its segment and is
never fatal. `head.json` is replaced atomically (temp file, fsync, rename, fsync dir).

Directory fsync failures (`edge_agent.fsutil.fsync_dir`): a new segment whose directory entry cannot be
synced fails the append that needed it (ResourceError: the caller drops the message and says so); a
head.json that cannot be written or synced is logged and counted (`head_write_failures`) but fails
nothing, since a stale head only means resending messages already delivered.

Bounds: `max_messages` and `max_bytes`. When a new message does not fit, the oldest are dropped
first and counted in `dropped` (persisted, so the count survives a restart).

This module is a little over 400 lines: one class around one lock; its record format is apart
(`spool_format`).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections import deque
from pathlib import Path
from typing import Deque, Iterator, List, NamedTuple, Optional, Tuple

from edge_agent.errors import ResourceError
from edge_agent.fsutil import fsync_dir
from edge_agent.telemetry.spool_format import (
    HEAD_FILE,
    HEADER,
    MAX_RECORD_BYTES,
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    check_record,
    decode_body,
    encode_record,
    segment_name,
)

logger = logging.getLogger(__name__)

class SpooledMessage(NamedTuple):
    """One message waiting in the spool, in append order."""

    seq: int
    topic: str
    payload: bytes
    qos: int


class _Entry(NamedTuple):
    seq: int
    segment: int  # first seq of the segment file
    offset: int
    size: int  # whole record, header included


class Spool:
    """Messages kept on disk while the broker is unreachable; oldest dropped first when full.

    Thread-safe. Typical use: `append()` when a publish fails; after reconnect, `peek()` the oldest
    messages, publish them in order, then `ack(last_delivered_seq)`.
    """

    def __init__(
        self,
        dir: Path,
        max_messages: int,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        segment_bytes: int = 1024 * 1024,
        fsync: bool = True,
        readonly: bool = False,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("spool bounds must be positive")
        self.dir = Path(dir)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._lock = threading.RLock()
        self._entries: Deque[_Entry] = deque()
        self._bytes = 0
        self._head = 0
        self._next_seq = 0
        self.dropped = 0
        self.corrupt = 0
        #: head.json writes that failed (see _write_head); never fatal.
        self.head_write_failures = 0
        self._head_failing = False
        self._segment_entry_synced = True  # segments found on disk at start-up
        self._tail_seg: Optional[int] = None
        self._tail_size = 0
        self._tail_file = None
        self.readonly = readonly  # inspection while the agent owns the spool: never writes anything
        try:
            if not readonly:
                self.dir.mkdir(parents=True, exist_ok=True)
            elif not self.dir.is_dir():
                return
            self._load()
        except OSError as e:
            raise ResourceError("cannot open the telemetry spool in %s: %s" % (self.dir, e.strerror or e))

    # ------------------------------------------------------------------------------------------ loading

    def _load(self) -> None:
        head, dropped = self._read_head()
        self._head, self.dropped = head, dropped
        segments = sorted(self._segments())
        for i, first in enumerate(segments):
            last_segment = i == len(segments) - 1
            good_end = self._scan_segment(first, truncate_tail=last_segment)
            if last_segment:
                self._tail_seg, self._tail_size = first, good_end
        if self._entries:
            self._next_seq = max(self._entries[-1].seq + 1, self._head)
        else:
            self._next_seq = max(self._head, self._next_seq)
        self._remove_dead_segments()
        if self._entries:
            logger.info("telemetry spool %s holds %d message(s) (%d bytes) from before", self.dir,
                        len(self._entries), self._bytes)

    def _read_head(self) -> Tuple[int, int]:
        path = self.dir / HEAD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return int(data["head"]), int(data.get("dropped", 0))
        except FileNotFoundError:
            return 0, 0
        except (ValueError, KeyError, TypeError, OSError) as e:
            # The head file is only ever replaced atomically, so this is outside damage: resend
            # rather than lose (duplicates carry their original seq).
            logger.warning("telemetry spool head %s is unreadable (%s); resending everything kept", path, e)
            return 0, 0

    def _segments(self) -> List[int]:
        out = []
        for p in self.dir.iterdir():
            name = p.name
            if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
                digits = name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]
                if digits.isdigit():
                    out.append(int(digits))
        return out

    def _scan_segment(self, first: int, *, truncate_tail: bool) -> int:
        """Index the valid records of one segment; returns the offset where valid data ends."""
        path = self.dir / segment_name(first)
        with open(path, "rb") as f:
            data = f.read()
        off = 0
        last_seq = -1
        while off < len(data):
            bad, seq, blen = check_record(data, off, last_seq)
            if bad is not None:
                lost = len(data) - off
                self.corrupt += 1
                logger.warning("telemetry spool %s: %s at byte %d; skipping the last %d byte(s) of the segment",
                               path.name, bad, off, lost)
                if truncate_tail and not self.readonly:
                    with open(path, "r+b") as f:
                        f.truncate(off)
                        if self._fsync:
                            os.fsync(f.fileno())
                break
            size = HEADER.size + blen
            self._next_seq = max(self._next_seq, seq + 1)
            last_seq = seq
            if seq >= self._head:
                self._entries.append(_Entry(seq, first, off, size))
                self._bytes += size
            off += size
        return off

    def _write_head(self, *, sync_dir: bool = True) -> None:
        """Replace head.json atomically. `sync_dir=False` (acks) skips the directory fsync: after a power
        loss the rename may be undone, which only means resending a batch, never losing one.

        The head only moves forward and a stale one means resending, never losing, so a failed write or
        sync does not fail the append or ack that asked for it (the message is already safe, or
        delivered): it is logged (a warning on the first failure of a streak) and counted in
        `head_write_failures`."""
        path = self.dir / HEAD_FILE
        tmp = self.dir / (HEAD_FILE + ".tmp")
        data = json.dumps({"head": self._head, "dropped": self.dropped}).encode("utf-8")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if self._fsync and sync_dir:
                fsync_dir(self.dir)
        except OSError as e:
            self.head_write_failures += 1
            log = logger.warning if not self._head_failing else logger.debug
            log("telemetry spool: cannot update %s (%s); after a restart, messages already delivered may be "
                "sent again and the drop count may be behind", path, e.strerror or e)
            self._head_failing = True
            return
        if self._head_failing:
            logger.info("telemetry spool: %s is written again", path)
            self._head_failing = False

    def _remove_dead_segments(self) -> None:
        """Delete segments whose every record is below the head (never the tail being written)."""
        if self.readonly:
            return
        live = {e.segment for e in self._entries}
        for first in self._segments():
            if first not in live and first != self._tail_seg:
                try:
                    (self.dir / segment_name(first)).unlink()
                except OSError as e:
                    logger.warning("cannot remove spool segment %s: %s", first, e)

    # ------------------------------------------------------------------------------------------- public

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of the messages held (records, headers included)."""
        with self._lock:
            return self._bytes

    def append(self, topic: str, payload: bytes, qos: int) -> int:
        """Keep a message; drops the oldest (counted in `dropped`) when a bound would be passed.

        Returns the message's spool sequence number (-1 when the message alone is over the byte bound and
        was dropped). Raises ResourceError when the disk refuses.
        """
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if self.readonly:
            raise ValueError("this spool was opened read-only")
        with self._lock:
            seq = self._next_seq
            record = encode_record(seq, topic, bytes(payload), qos)
            if len(record) > min(self.max_bytes, MAX_RECORD_BYTES):
                self.dropped += 1
                self._write_head()
                logger.warning("telemetry spool: a %d byte message for %s is over the spool's byte bound; dropped",
                               len(record), topic)
                return -1
            dropped_now = 0
            while self._entries and (len(self._entries) + 1 > self.max_messages
                                     or self._bytes + len(record) > self.max_bytes):
                e = self._entries.popleft()
                self._bytes -= e.size
                dropped_now += 1
            try:
                if self._tail_file is None or self._tail_size + len(record) > self._segment_bytes:
                    self._rotate(seq)
                f = self._tail_file
                f.write(record)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            except OSError as e:
                self._undo_partial_write()
                try:
                    self._drop_accounting(dropped_now)
                except OSError:
                    pass
                raise ResourceError("cannot write to the telemetry spool %s: %s" % (self.dir, e.strerror or e))
            self._entries.append(_Entry(seq, self._tail_seg, self._tail_size, len(record)))
            self._tail_size += len(record)
            self._bytes += len(record)
            self._next_seq = seq + 1
            if dropped_now:
                self._drop_accounting(dropped_now)
            return seq

    def _undo_partial_write(self) -> None:
        """Cut a half-written record off the tail so later appends are not hidden behind it."""
        f, self._tail_file = self._tail_file, None
        if f is None:
            return
        try:
            f.close()
        except OSError:
            pass
        try:
            with open(self.dir / segment_name(self._tail_seg), "r+b") as g:
                g.truncate(self._tail_size)
        except OSError as e:
            logger.warning("telemetry spool: cannot trim a partial record: %s", e)

    def _drop_accounting(self, n: int) -> None:
        if n <= 0:
            return
        self.dropped += n
        self._head = self._entries[0].seq if self._entries else self._next_seq
        logger.warning("telemetry spool full (%d messages / %d bytes max): dropped the %d oldest, %d dropped so far",
                       self.max_messages, self.max_bytes, n, self.dropped)
        self._write_head()
        self._remove_dead_segments()

    def _rotate(self, first_seq: int) -> None:
        if self._tail_file is not None:
            self._tail_file.close()
            self._tail_file = None
        if self._tail_seg is not None and self._tail_size < self._segment_bytes:
            # Reopen the existing tail after a restart instead of starting a new file.
            self._tail_file = open(self.dir / segment_name(self._tail_seg), "ab")
            if self._tail_file.tell() == self._tail_size:
                self._sync_segment_entry()  # when an earlier sync of this new segment failed
                return
            self._tail_file.close()
            self._tail_file = None
        self._tail_seg = first_seq
        self._tail_size = 0
        self._tail_file = open(self.dir / segment_name(first_seq), "ab")
        self._segment_entry_synced = False
        self._sync_segment_entry()
        self._remove_dead_segments()

    def _sync_segment_entry(self) -> None:
        """Make the tail segment's directory entry durable before records in it count as kept. Raises
        OSError, which fails the append (ResourceError) like a failed write; the next append tries again."""
        if self._fsync and not self._segment_entry_synced:
            fsync_dir(self.dir)
        self._segment_entry_synced = True

    def peek(self, limit: int = 100) -> List[SpooledMessage]:
        """The oldest `limit` messages, in order, without removing them; unreadable ones are skipped."""
        with self._lock:
            return self._read([e for _, e in zip(range(limit), self._entries)])

    def __iter__(self) -> Iterator[SpooledMessage]:
        """Every message held, oldest first, read in batches of 100."""
        after = -1
        while True:
            with self._lock:
                batch = self._read([e for e in self._entries if e.seq > after][:100])
            if not batch:
                return
            yield from batch
            after = batch[-1].seq

    def _read(self, entries: List[_Entry]) -> List[SpooledMessage]:
        out: List[SpooledMessage] = []
        files = {}
        try:
            for e in entries:
                f = files.get(e.segment)
                if f is None:
                    f = files[e.segment] = open(self.dir / segment_name(e.segment), "rb")
                f.seek(e.offset)
                raw = f.read(e.size)
                try:
                    qos, topic, payload = decode_body(raw[HEADER.size:])
                except (struct.error, UnicodeDecodeError) as err:
                    logger.warning("telemetry spool: record %d unreadable (%s); skipped", e.seq, err)
                    continue
                out.append(SpooledMessage(e.seq, topic, payload, qos))
        except OSError as err:
            logger.warning("telemetry spool: cannot read %s: %s", self.dir, err)
        finally:
            for f in files.values():
                f.close()
        return out

    def ack(self, seq: int) -> int:
        """Forget every message up to and including `seq` (they were delivered). Returns how many."""
        if self.readonly:
            raise ValueError("this spool was opened read-only")
        with self._lock:
            n = 0
            while self._entries and self._entries[0].seq <= seq:
                e = self._entries.popleft()
                self._bytes -= e.size
                n += 1
            if n:
                self._head = self._entries[0].seq if self._entries else max(self._head, seq + 1)
                self._write_head(sync_dir=False)
                self._remove_dead_segments()
            return n

    def summary(self) -> dict:
        """Messages held, their bytes, the oldest and newest sequence numbers, drops and corrupt records."""
        with self._lock:
            return {
                "messages": len(self._entries),
                "bytes": self._bytes,
                "oldest_seq": self._entries[0].seq if self._entries else None,
                "newest_seq": self._entries[-1].seq if self._entries else None,
                "dropped": self.dropped,
                "corrupt_records": self.corrupt,
                "head_write_failures": self.head_write_failures,
                "max_messages": self.max_messages,
                "max_bytes": self.max_bytes,
            }

    def close(self) -> None:
        """Close the open segment file."""
        with self._lock:
            if self._tail_file is not None:
                self._tail_file.close()
                self._tail_file = None
