"""Start and stop a private Mosquitto: for the tests, the demo and `knet broker run`.

The broker is our own child process on a loopback port, stopped by its PID; a system-wide
Mosquitto service is never touched.
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from broker.config import BrokerSettings
from broker.errors import KnetBrokerError

log = logging.getLogger(__name__)

_RELOAD_LINE = "Reloading config."
_PORTS = random.SystemRandom()  # not the seeded global: parallel tests must not agree


class BrokerError(KnetBrokerError, RuntimeError):
    """The broker could not be found, started or stopped."""


def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if not path:
        raise BrokerError(
            "mosquitto not found: install the Debian package (apt-get install mosquitto) "
            "or run `make test`/`make demo`, which bootstrap it"
        )
    return path


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out to outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, picked at random *below* the ephemeral range.

    A port from ``bind(0)`` lies in the range the kernel also gives to outgoing
    connections: a broker restarted on it (the fault tests do) could find it taken by some
    client's socket meanwhile, most of all with tests running in parallel (pytest -n).
    """
    floor = _ephemeral_floor()
    for _ in range(64):
        port = _PORTS.randrange(10000, floor) if floor > 11000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise BrokerError(f"no free port on {host} after 64 tries")


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Mosquitto:
    """A Mosquitto child process with a generated config in ``workdir``.

    Use as a context manager; ``restart()`` keeps the same port and persistence directory,
    so retained messages and queued QoS 1 messages survive it.
    """

    def __init__(self, workdir: Path, settings: BrokerSettings | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if settings is None:
            settings = BrokerSettings(port=free_port(), allow_anonymous=True)
        if settings.persistence and settings.persistence_location is None:
            settings = settings.model_copy(update={"persistence_location": self.workdir / "data"})
        if settings.user is None and os.geteuid() == 0:
            settings = settings.model_copy(update={"user": pwd.getpwuid(0).pw_name})
        if settings.log_file is None:
            settings = settings.model_copy(update={"log_file": self.workdir / "mosquitto.log"})
        self.settings = settings
        self.conf_path = self.workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.settings.bind_address

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.running():
            return self
        if self.settings.persistence_location:
            self.settings.persistence_location.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.settings.render())
        self._proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if not wait_for_port(self.host, self.port, timeout):
            err = self._stderr_tail()
            self.stop()
            raise BrokerError(f"mosquitto did not open {self.host}:{self.port}: {err}")
        log.info("mosquitto pid %s on %s:%s", self._proc.pid, self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is saved beyond the last autosave."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP: Mosquitto re-reads the password and ACL files and re-checks every
        connected client against them, without dropping the authorised ones.

        Waits until the broker logged the reload: its event loop is single-threaded, so any
        packet handled after that line is judged by the new files. Mosquitto 2.0.11 also
        re-reads the TLS certificates and the CRL for new handshakes; ports and other
        listener settings need ``restart()``.
        """
        if not self.running():
            raise BrokerError("mosquitto is not running")
        assert self._proc is not None
        before = self.log_text().count(_RELOAD_LINE)
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self.log_text().count(_RELOAD_LINE) <= before:
            if time.monotonic() >= deadline or not self.running():
                raise BrokerError(f"mosquitto did not log a reload within {timeout} s")
            time.sleep(0.01)
        log.info("mosquitto pid %s reloaded its password and ACL files", self._proc.pid)

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the broker exits (or ``timeout``); its exit status, None if running."""
        if self._proc is None:
            return None
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        if downtime:
            time.sleep(downtime)
        self.start()

    def log_text(self) -> str:
        path = self.settings.log_file
        return path.read_text(errors="replace") if path and path.exists() else ""

    def _stderr_tail(self) -> str:
        if self._proc and self._proc.poll() is not None and self._proc.stderr:
            return self._proc.stderr.read().decode(errors="replace")[-2000:]
        return self.log_text()[-2000:]

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
