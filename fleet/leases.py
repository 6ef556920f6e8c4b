"""Rollout ownership when several controllers share one registry: a lease row per rollout, renewed by
its owner every tick, and an inbox for what reaches a controller that does not own the rollout.

* ``rollout_leases``: (rollout_id, owner, expires_at, epoch). The controller that starts a rollout
  holds its lease; it renews it every tick (`renew`). When the owner dies (kill -9, power loss,
  partition), its leases expire after `lease_s`; any controller's next tick finds the rollout orphaned
  (`orphans`) and takes it (`acquire`, which raises the epoch). Takeover therefore happens within
  ``lease_s + tick_interval_s`` of the owner's last renewal. Every rollout save checks the lease in
  the same transaction (`Registry.save_rollout(owner=...)`), and commands are sent only after the save
  committed, so a controller that lost its lease (paused longer than `lease_s`) cannot send another
  command for that rollout: the two owners never both command a device.
* ``rollout_inbox``: device events (shared subscriptions deliver each to one controller) and operator
  requests (pause, abort, … arrive at whichever controller the CLI's RPC reached) for a rollout owned
  elsewhere are written here; the owner takes them every inbox poll and writes operator results back.

Lease times are the database's clock (``now()`` on PostgreSQL, the host's clock in SQLite), read in
the statement that sets or compares them: controllers whose own clocks disagree still agree on when a
lease expires. (The inbox's `created` uses the controller's clock.)
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from fleet.registry import Registry
from fleet.registry_db import RegistryError

#: `expires_at` of a rollout that ended with nothing outstanding: never orphaned again.
SETTLED = 1e18
SETTLED_OWNER = "(settled)"


class LeaseLost(RegistryError):
    """This controller no longer owns the rollout (another one took it over)."""


def new_owner_id(client_id: str) -> str:
    """A controller's owner name: client id, host, pid and a random tag (unique per process)."""
    return "%s@%s:%d:%s" % (client_id, socket.gethostname()[:40], os.getpid(), os.urandom(2).hex())


class RolloutLeases:
    """Leases and inbox rows of one controller (`owner`)."""

    def __init__(self, registry: Registry, owner: str, *, lease_s: float = 10.0,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock
        self.takeovers = 0
        self.monotonic = monotonic
        #: rollout id -> this process's monotonic time just before the last acquire/renew that succeeded.
        self._renewed: Dict[str, float] = {}

    # ------------------------------------------------------------------------------------ leases

    def acquire(self, rollout_id: str, *, settled_too: bool = False) -> bool:
        """Take the lease when it is free, expired or already ours (or, with `settled_too`, settled: an
        ended rollout's operator step); True when we hold it now."""

        def write(tx: Any) -> bool:
            now = tx.dialect.now
            tx.execute(
                "INSERT INTO rollout_leases (rollout_id, owner, expires_at, epoch) VALUES (?, ?, %s + ?, 1) "
                "ON CONFLICT(rollout_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at, "
                "epoch = rollout_leases.epoch + 1 WHERE rollout_leases.owner = ? OR rollout_leases.expires_at < %s "
                "OR rollout_leases.owner = ?" % (now, now),
                (rollout_id, self.owner, self.lease_s, self.owner, SETTLED_OWNER if settled_too else self.owner),
            )
            rows = tx.fetchall("SELECT owner FROM rollout_leases WHERE rollout_id = ?", (rollout_id,))
            return bool(rows) and rows[0]["owner"] == self.owner

        started = self.monotonic()
        held = bool(self.registry.write(write))
        if held:
            self._renewed[rollout_id] = started
        return held

    def renew(self, rollout_ids: Sequence[str]) -> Set[str]:
        """Extend our leases; returns the ids we still hold (a missing one was taken over)."""
        if not rollout_ids:
            return set()
        ids = list(rollout_ids)
        marks = ",".join("?" * len(ids))

        def write(tx: Any) -> Set[str]:
            tx.execute(
                "UPDATE rollout_leases SET expires_at = %s + ? WHERE owner = ? AND rollout_id IN (%s)"
                % (tx.dialect.now, marks),
                (self.lease_s, self.owner, *ids),
            )
            rows = tx.fetchall(
                "SELECT rollout_id FROM rollout_leases WHERE owner = ? AND rollout_id IN (%s)" % marks,
                (self.owner, *ids),
            )
            return {r["rollout_id"] for r in rows}

        started = self.monotonic()
        held = set(self.registry.write(write))
        for rid in ids:
            if rid in held:
                self._renewed[rid] = started
            else:
                self._renewed.pop(rid, None)
        return held

    def fresh(self, rollout_id: str) -> bool:
        """True while our lease of the rollout is surely unexpired: less than `lease_s` since just before
        our last successful acquire or renew (the database set the expiry later than that). A command
        is published only while this holds: one queued before a pause longer than the lease is dropped,
        and the rollout resends it once the lease is renewed (or its new owner does)."""
        at = self._renewed.get(rollout_id)
        return at is not None and self.monotonic() - at < self.lease_s

    def settle(self, rollout_id: str) -> None:
        """The rollout ended with nothing outstanding: nobody needs to own it any more (events forwarded
        to it meanwhile are dropped: nobody will take them)."""

        def write(tx: Any) -> None:
            tx.execute("UPDATE rollout_leases SET owner = ?, expires_at = ? WHERE rollout_id = ? AND owner = ?",
                       (SETTLED_OWNER, SETTLED, rollout_id, self.owner))
            tx.execute("DELETE FROM rollout_inbox WHERE rollout_id = ? AND kind = 'event'", (rollout_id,))

        self.registry.write(write)

    def drop(self, rollout_id: str) -> None:
        """Remove our lease of a rollout that was never saved (its start was refused)."""
        self.registry.write(lambda tx: tx.execute(
            "DELETE FROM rollout_leases WHERE rollout_id = ? AND owner = ?", (rollout_id, self.owner)))

    def orphans(self, states: Sequence[str]) -> List[str]:
        """Rollouts in `states` whose lease is missing or expired (their owner is gone)."""
        marks = ",".join("?" * len(states))
        rows = self.registry.read(
            "SELECT r.rollout_id FROM rollouts r LEFT JOIN rollout_leases l ON l.rollout_id = r.rollout_id "
            "WHERE r.state IN (%s) AND (l.rollout_id IS NULL OR l.expires_at < %s) ORDER BY r.created"
            % (marks, self.registry.dialect.now),
            states,
        )
        return [r["rollout_id"] for r in rows]

    def holder(self, rollout_id: str) -> Optional[str]:
        """Who holds a live lease on the rollout (None when nobody does)."""
        rows = self.registry.read(
            "SELECT owner FROM rollout_leases WHERE rollout_id = ? AND expires_at >= %s AND owner <> ?"
            % self.registry.dialect.now, (rollout_id, SETTLED_OWNER)
        )
        return str(rows[0]["owner"]) if rows else None

    # ------------------------------------------------------------------------------------- inbox

    def post(self, rollout_id: str, kind: str, body: Dict[str, Any]) -> int:
        """Leave an event or operator request for the rollout's owner; returns its id."""

        insert = "INSERT INTO rollout_inbox (rollout_id, kind, body, created) VALUES (?, ?, ?, ?)"
        params = (rollout_id, kind, json.dumps(body, separators=(",", ":")), self.clock())

        def write(tx: Any) -> int:
            if tx.dialect.name == "postgresql":
                return int(tx.fetchall(insert + " RETURNING id", params)[0]["id"])
            return int(tx.execute(insert, params).lastrowid)

        return int(self.registry.write(write))

    def take(self, rollout_ids: Sequence[str], limit: int = 500) -> List[Dict[str, Any]]:
        """Open inbox rows of our rollouts, oldest first: {id, rollout_id, kind, body}."""
        if not rollout_ids:
            return []
        marks = ",".join("?" * len(rollout_ids))
        rows = self.registry.read(
            "SELECT id, rollout_id, kind, body FROM rollout_inbox WHERE done = 0 AND rollout_id IN (%s) "
            "ORDER BY id LIMIT ?" % marks,
            (*rollout_ids, int(limit)),
        )
        return [{"id": r["id"], "rollout_id": r["rollout_id"], "kind": r["kind"], "body": json.loads(r["body"])}
                for r in rows]

    def done(self, item_id: int, result: Optional[Dict[str, Any]] = None) -> None:
        """Mark an inbox row handled (events are deleted, operator requests keep their result)."""
        if result is None:
            self.registry.write(lambda tx: tx.execute("DELETE FROM rollout_inbox WHERE id = ?", (item_id,)))
            return
        text = json.dumps(result, separators=(",", ":"), default=str)
        self.registry.write(lambda tx: tx.execute(
            "UPDATE rollout_inbox SET done = 1, result = ? WHERE id = ?", (text, item_id)))

    def wait_result(self, item_id: int, timeout_s: float, poll_s: float = 0.05) -> Optional[Dict[str, Any]]:
        """The owner's answer to an operator request (None on timeout); the row is removed."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.registry.read("SELECT done, result FROM rollout_inbox WHERE id = ?", (item_id,))
            if rows and rows[0]["done"]:
                self.registry.write(lambda tx: tx.execute("DELETE FROM rollout_inbox WHERE id = ?", (item_id,)))
                return json.loads(rows[0]["result"] or "{}")
            if time.monotonic() >= deadline:
                self.registry.write(lambda tx: tx.execute(
                    "DELETE FROM rollout_inbox WHERE id = ? AND done = 0", (item_id,)))
                return None
            time.sleep(poll_s)
