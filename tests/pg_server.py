"""A throw-away PostgreSQL cluster for the tests: Debian's server binaries, `initdb` into a temporary
folder, `pg_ctl` on a free loopback port, run as an unprivileged user (``nobody`` when the tests run as
root: PostgreSQL refuses to run as root). Trust authentication on 127.0.0.1 only."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from mqtt_broker import free_port


class PostgresMissing(RuntimeError):
    """The PostgreSQL server binaries are not installed (Debian package ``postgresql``)."""


def find_pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` holding initdb and pg_ctl (or $PG_BIN)."""
    env = os.environ.get("PG_BIN")
    candidates = [env] if env else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0
    )
    for d in reversed(candidates):
        if d and os.path.isfile(os.path.join(d, "initdb")) and os.path.isfile(os.path.join(d, "pg_ctl")):
            return Path(d)
    raise PostgresMissing("PostgreSQL server binaries not found (apt-get install postgresql, or set PG_BIN)")


class PgServer:
    """One cluster; `url(db)` names a database in it; `create_db()` makes a fresh one."""

    USER = "fleet"

    def __init__(self, workdir: Optional[Path] = None, *, run_as: str = "nobody") -> None:
        self.bin = find_pg_bin()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="fleet-pg-"))
        self.data = self.dir / "data"
        self.sock = self.dir / "sock"
        self.port = free_port()
        self._prefix: List[str] = []
        self._owner: Optional[pwd.struct_passwd] = None
        if os.geteuid() == 0:
            self._owner = pwd.getpwnam(run_as)
            self._prefix = ["runuser", "-u", run_as, "--"]
        self.sock.mkdir(parents=True, exist_ok=True)
        os.chmod(str(self.dir), 0o755)
        if self._owner is not None:
            for p in (self.dir, self.sock):
                os.chown(str(p), self._owner.pw_uid, self._owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        self._counter = 0
        self.start()

    def _run(self, tool: str, *args: str, timeout_s: float = 60.0) -> None:
        cmd = [*self._prefix, str(self.bin / tool), *args]
        out = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s, cwd="/", check=False
        )
        if out.returncode != 0:
            text = out.stdout.decode(errors="replace")[-2000:]
            raise RuntimeError("%s failed (%d): %s" % (tool, out.returncode, text))

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        opts = "-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off " \
               "-c full_page_writes=off -c max_connections=200" % (self.port, self.sock)
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", opts, "-w", "-t", "60",
                  "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`mode` ``immediate`` is a crash: no checkpoint)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def url(self, db: str = "postgres") -> str:
        """A libpq URL for database `db`."""
        return "postgresql://%s@127.0.0.1:%d/%s" % (self.USER, self.port, db)

    def create_db(self, template: str = "template0") -> str:
        """A new empty database (copied from `template`); returns its URL."""
        import psycopg

        self._counter += 1
        name = "t%d_%d" % (os.getpid(), self._counter)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "%s" TEMPLATE "%s"' % (name, template))
        return self.url(name)

    def log(self) -> str:
        """The server log (for a failing test's message)."""
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop the server (if running) and remove its folder."""
        try:
            self.stop("immediate")
        except Exception:
            pass
        # Give the postmaster a moment to release the folder before removing it.
        deadline = time.monotonic() + 5
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(str(self.dir), ignore_errors=True)
