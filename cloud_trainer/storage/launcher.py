"""A private PostgreSQL for the tests and benches: ``initdb`` + ``postgres`` in a temp folder.

Like ``broker/launcher.py`` for Mosquitto: our own child process on a free loopback port,
stopped by its PID; a system-wide PostgreSQL service is never touched. ``initdb`` refuses to
run as root, so as root both run as the ``postgres`` user (the Debian package creates it) in
a folder that user owns. The superuser ``knet`` logs in over TCP with a SCRAM password held
in ``password_file``, the way a deployment's trainer does.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from broker.launcher import free_port
from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)

SUPERUSER = "knet"


class PostgresError(KnetTrainerError, RuntimeError):
    """PostgreSQL is not installed, or the private server could not start or stop."""


def find_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise PostgresError(f"PostgreSQL's {name} was not found: install the Debian package "
                        "(apt-get install postgresql; `make test` bootstraps it)")


class PostgresServer:
    """A throwaway PostgreSQL cluster; a context manager. ``durable=False`` turns fsync off
    (tests: nothing to keep across a machine crash); benches keep it on."""

    def __init__(self, workdir: Path | None = None, durable: bool = True,
                 settings: dict[str, str] | None = None) -> None:
        self.initdb, self.postgres = find_bin("initdb"), find_bin("postgres")
        self._own_dir = workdir is None
        # /tmp, not pytest's tmp_path: the postgres user must be able to reach the folder.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="knet-pg-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "data"
        self.password_file = self.workdir / "password"
        self.log_file = self.workdir / "postgres.log"
        self.host, self.port = "127.0.0.1", free_port()
        self.durable = durable
        self.settings = settings or {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError("running as root and there is no 'postgres' user to run "
                                    "initdb as (the Debian postgresql package creates it)"
                                    ) from None
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            self._uid, self._gid = pw.pw_uid, pw.pw_gid

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> PostgresServer:
        self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
        self.password_file.chmod(0o600)
        if self._user:
            os.chown(self.workdir, self._uid, self._gid)
            os.chown(self.password_file, self._uid, self._gid)
        if not (self.data / "PG_VERSION").exists():
            self._run([self.initdb, "-D", str(self.data), "-U", SUPERUSER, "--pwfile",
                       str(self.password_file), "--auth-local=trust",
                       "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"])
        args = [self.postgres, "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.workdir), "-c", f"listen_addresses={self.host}"]
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        log_fh = self.log_file.open("ab")
        try:
            self._proc = subprocess.Popen(args, stdout=log_fh, stderr=subprocess.STDOUT,
                                          start_new_session=True, **self._user)
        finally:
            log_fh.close()
        self._wait_ready(timeout)
        log.info("postgresql %s on %s:%d (pid %d)", self.data, self.host, self.port,
                 self._proc.pid)
        return self

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, **self._user)
        if done.returncode != 0:
            raise PostgresError(f"{Path(cmd[0]).name} failed ({done.returncode}): "
                                f"{done.stderr.strip()[-2000:]}")

    def _wait_ready(self, timeout: float) -> None:
        """Until a real login succeeds (not a guess at a delay)."""
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise PostgresError(f"postgres exited with {self._proc.returncode}: "
                                    f"{self.log_tail()}")
            try:
                psycopg.connect(self.conninfo("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.05)
        self.stop()
        raise PostgresError(f"postgres not accepting connections after {timeout:.0f} s: {last}")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT) of our child by its PID; SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- databases -------------------------------------------------------------------------
    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url(self, dbname: str) -> str:
        """The URL a trainer.toml names (no password: that is ``password_file``)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def conninfo(self, dbname: str) -> str:
        return (f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname} "
                f"password={self.password}")

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
