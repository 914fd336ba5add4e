"""uvicorn in a thread of the trainer: started and stopped with ``TrainerService``.

The server gets its own event loop in its own thread, so a slow page never holds up paho's
or the scheduler's threads; stopping sets ``should_exit``, ends the live streams and waits at
most ``stop_timeout_s`` (uvicorn cancels connections still open after its graceful window).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
import uvicorn

from agent.wire.topics import Topics
from cloud_trainer.errors import KnetTrainerError
from cloud_trainer.serve.console.app import Console, build_app
from cloud_trainer.serve.console.config import ConsoleSection
from cloud_trainer.serve.console.history import StatsHistory

if TYPE_CHECKING:
    from cloud_trainer.service import TrainerService

log = logging.getLogger(__name__)


class ConsoleStartError(KnetTrainerError, RuntimeError):
    """The console could not listen (address in use, unreadable certificate...)."""


class ConsoleServer:
    """The console of one ``TrainerService``."""

    def __init__(self, svc: TrainerService, settings: ConsoleSection) -> None:
        self.settings = settings
        self.history = StatsHistory(settings.history)
        self.console = Console(svc, settings, self.history)
        self.app = build_app(self.console)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls else "http"
        host = self.settings.bind
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}"

    def attach(self, client: mqtt.Client, topics: Topics) -> None:
        """Feed the stats history from the trainer's connection (from its on_connect)."""
        self.history.attach(client, topics)

    def start(self, timeout: float = 10.0) -> ConsoleServer:
        s = self.settings
        cfg = uvicorn.Config(
            self.app, host=s.bind, port=s.port, log_level="warning", access_log=False,
            lifespan="off", timeout_graceful_shutdown=max(1, int(s.stop_timeout_s / 2)),
            ssl_certfile=str(s.tls_cert_file) if s.tls_cert_file else None,
            ssl_keyfile=str(s.tls_key_file) if s.tls_key_file else None,
            server_header=False, proxy_headers=False)
        server = uvicorn.Server(cfg)
        failed: list[BaseException] = []

        def serve() -> None:
            try:
                server.run()
            except BaseException as exc:  # SystemExit on bind errors: reported to start()
                failed.append(exc)

        self._server = server
        self._thread = threading.Thread(target=serve, name="knet-console", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if server.started or failed or not self._thread.is_alive():
                break
            deadline.wait(0.05)
        if not server.started:
            self.stop()
            raise ConsoleStartError(f"console did not start on {s.bind}:{s.port}"
                                    + (f": {failed[0]!r}" if failed else ""))
        sock: Any = server.servers[0].sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("console listening on %s", self.url)
        return self

    def stop(self) -> None:
        self.console.closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.settings.stop_timeout_s)
            if self._thread.is_alive():
                log.warning("console: still stopping after %.0f s; left behind (daemon thread)",
                            self.settings.stop_timeout_s)
                if self._server is not None:
                    self._server.force_exit = True
        self._thread = None
