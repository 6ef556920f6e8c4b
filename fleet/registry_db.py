"""The registry's two database engines behind one small interface: SQLite (stdlib ``sqlite3``, the
embedded default) and PostgreSQL (psycopg 3 with a psycopg_pool connection pool, shared by several
controllers).

Registry code writes its SQL once, in the subset both engines accept, with ``?`` placeholders,
``GREATEST(a, b)`` and ``LEAST(a, b)``; `Dialect.sql` turns it into each engine's spelling (``%s``
placeholders for psycopg, ``MAX(a, b)`` / ``MIN(a, b)`` for SQLite; give them no NULL argument: SQLite's
answer is then NULL, PostgreSQL's the other value). Schema text uses ``{float}``, ``{bigint}``, ``{blob}`` and
``{autoid}`` for the few types the engines name differently (PostgreSQL's ``REAL`` is 4 bytes, so
floats are ``DOUBLE PRECISION`` there).

`write(fn)` runs ``fn(tx)`` in one transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: one pooled
connection); `read(sql, params)` returns rows that index by column name. A PostgreSQL connection lost
to a server restart is retried on a fresh connection until `reconnect_s` has passed; after that the
call raises `RegistryError` (the caller's policy decides what is kept for the next try).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from edge_agent.errors import ResourceError

log = logging.getLogger(__name__)


class RegistryError(ResourceError):
    """The registry database cannot be opened, migrated or written."""


def is_postgres_url(target: str) -> bool:
    """True for ``postgresql://`` / ``postgres://`` URLs."""
    return target.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """A URL without its password (for logs and error messages)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


class Dialect:
    """How one engine spells the few things that differ."""

    def __init__(self, name: str, types: Dict[str, str], placeholder: str, greatest: str, least: str, *,
                 now: str) -> None:
        self.name = name
        #: The database's clock as unix seconds (a float), for lease times every controller agrees on.
        self.now = now
        self.types = types
        self.placeholder = placeholder
        self.greatest = greatest
        self.least = least
        self._cache: Dict[str, str] = {}

    def sql(self, text: str) -> str:
        """Engine spelling of a statement written with ``?`` and ``GREATEST(``."""
        out = self._cache.get(text)
        if out is None:
            out = text.replace("GREATEST(", self.greatest + "(").replace("LEAST(", self.least + "(")
            if self.placeholder != "?":
                out = out.replace("?", self.placeholder)
            self._cache[text] = out
        return out

    def schema(self, text: str) -> str:
        """Engine spelling of schema text with ``{float}``-style type names."""
        return text.format(**self.types)


SQLITE = Dialect(
    "sqlite",
    {"float": "REAL", "bigint": "INTEGER", "blob": "BLOB", "autoid": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "?",
    "MAX",
    "MIN",
    now="((julianday('now') - 2440587.5) * 86400.0)",
)
POSTGRES = Dialect(
    "postgresql",
    {"float": "DOUBLE PRECISION", "bigint": "BIGINT", "blob": "BYTEA", "autoid": "BIGSERIAL PRIMARY KEY"},
    "%s",
    "GREATEST",
    "LEAST",
    now="CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)",
)


class Tx:
    """One transaction's statements (`fn` in `write(fn)` receives it)."""

    def __init__(self, cur: Any, dialect: Dialect) -> None:
        self._cur = cur
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; returns the cursor (``rowcount``, ``fetchall``)."""
        self._cur.execute(self.dialect.sql(sql), tuple(params))
        return self._cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each parameter row."""
        if rows:
            self._cur.executemany(self.dialect.sql(sql), rows)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> List[Any]:
        """Run a query inside the transaction and return its rows."""
        return list(self.execute(sql, params).fetchall())


class SqliteDb:
    """One SQLite file in WAL mode, one connection shared behind a lock (``":memory:"`` for tests)."""

    dialect = SQLITE

    def __init__(self, path: str, *, busy_timeout_s: float = 10.0) -> None:
        self.name = path
        self._lock = threading.RLock()
        if path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RegistryError("cannot create the registry folder for %s: %s" % (path, e.strerror))
        try:
            self._db = sqlite3.connect(path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA foreign_keys=ON")
            if path != ":memory:":
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    log.warning("registry %s: journal mode is %s, not WAL", path, mode)
                self._db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as e:
            raise RegistryError("cannot open registry %s: %s" % (path, e))

    def write(self, fn: Callable[[Tx], Any], *, migration_lock: bool = False) -> Any:
        """Run `fn(tx)` in one IMMEDIATE transaction (one writer at a time, readers unblocked)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(Tx(self._db.cursor(), SQLITE))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.DatabaseError as e:
                raise RegistryError("registry %s: write failed: %s" % (self.name, e))
            return out

    def read(self, sql: str, params: Sequence[Any] = ()) -> List[Any]:
        """Rows of one query."""
        with self._lock:
            try:
                return self._db.execute(SQLITE.sql(sql), tuple(params)).fetchall()
            except sqlite3.DatabaseError as e:
                raise RegistryError("registry %s: read failed: %s" % (self.name, e))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()


#: Any constant: the advisory lock that serialises schema migrations between controllers.
_MIGRATION_LOCK = 0x666C656574  # "fleet"


class PostgresDb:
    """A PostgreSQL database through a psycopg_pool connection pool (psycopg imported only here)."""

    dialect = POSTGRES

    def __init__(self, url: str, *, pool_min: int = 1, pool_max: int = 8, connect_timeout_s: float = 10.0,
                 reconnect_s: float = 30.0) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool
        except ImportError as e:
            raise RegistryError("a postgresql:// registry needs psycopg 3 and psycopg_pool "
                                "(pip install 'edge-agent[postgres]'): %s" % e)
        self._psycopg = psycopg
        self.name = redact_url(url)
        self.reconnect_s = reconnect_s
        self.reconnects = 0
        self._pool = ConnectionPool(
            url, min_size=pool_min, max_size=pool_max, timeout=connect_timeout_s, open=False,
            kwargs={"row_factory": dict_row, "autocommit": True, "connect_timeout": max(1, int(connect_timeout_s))},
            name="fleet-registry",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as e:
            self._pool.close()
            raise RegistryError("cannot open registry %s: %s" % (self.name, _one_line(e)))

    def _run(self, what: str, fn: Callable[[Any], Any]) -> Any:
        deadline = time.monotonic() + self.reconnect_s
        delay = 0.05
        while True:
            try:
                with self._pool.connection() as conn:
                    return fn(conn)
            except (self._psycopg.OperationalError, _pool_timeout()) as e:
                # The server restarted or is unreachable: a fresh connection, until the deadline.
                if time.monotonic() + delay > deadline:
                    raise RegistryError("registry %s: %s failed: %s" % (self.name, what, _one_line(e)))
                self.reconnects += 1
                log.warning("registry %s: %s: %s; retrying", self.name, what, _one_line(e))
                time.sleep(delay)
                delay = min(1.0, delay * 2)
            except self._psycopg.Error as e:
                raise RegistryError("registry %s: %s failed: %s" % (self.name, what, _one_line(e)))

    def write(self, fn: Callable[[Tx], Any], *, migration_lock: bool = False) -> Any:
        """Run `fn(tx)` in one transaction on one pooled connection."""

        def run(conn: Any) -> Any:
            with conn.transaction(), conn.cursor() as cur:
                if migration_lock:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                return fn(Tx(cur, POSTGRES))

        return self._run("write", run)

    def read(self, sql: str, params: Sequence[Any] = ()) -> List[Any]:
        """Rows of one query (dicts; autocommit, so one round trip)."""

        def run(conn: Any) -> List[Any]:
            with conn.cursor() as cur:
                cur.execute(POSTGRES.sql(sql), tuple(params))
                return cur.fetchall()

        return self._run("read", run)

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()


def _pool_timeout() -> type:
    from psycopg_pool import PoolTimeout

    return PoolTimeout


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def dumps_json(value: Any) -> Optional[str]:
    """A JSON column's text (compact, keys sorted), None for None."""
    return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)


def loads_json(text: Optional[str]) -> Any:
    """A JSON column's value; None for NULL or text that does not parse."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
