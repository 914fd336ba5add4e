"""The console's ASGI app (Starlette): pages, fragments, server-sent events, JSON API and
actions.

Security model (docs/console.md): reading needs a session or a bearer token unless
``read_anonymous``; every POST needs a session cookie of the ``operator`` role *and* that
session's CSRF token in the form; the login form is protected by a double-submit cookie.
Every refusal is a 4xx with a one-line reason; an unexpected error is logged and answered
with a bare 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.wire.topics import TopicError, validate_id
from cloud_trainer.release.registry import RegistryError
from cloud_trainer.serve.console import data
from cloud_trainer.serve.console.auth import Auth, Session, same
from cloud_trainer.serve.console.config import ConsoleSection
from cloud_trainer.serve.console.history import StatsHistory
from cloud_trainer.serve.console.plots import line_chart, sparkline

if TYPE_CHECKING:
    from cloud_trainer.service import TrainerService

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "knet_session"
LOGIN_COOKIE = "knet_login_csrf"
MODEL_ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
SSE_INTERVAL_S = 1.0
MAX_FORM_BYTES = 16 * 1024


class Console:
    """Everything a request handler needs: the trainer, the stats history and the auth."""

    def __init__(self, svc: TrainerService, settings: ConsoleSection,
                 history: StatsHistory) -> None:
        self.svc, self.settings, self.history = svc, settings, history
        self.auth = Auth.from_file(settings.tokens_file, settings.session_ttl_s)
        self.closing = threading.Event()
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(["html"]))
        self.env.filters["spark"] = lambda ys: Markup(sparkline(ys))
        self.env.filters["ts"] = _ts
        self.env.filters["num"] = _num

    # --- who is asking
    def viewer(self, request: Request) -> Session | None:
        s = self.auth.session(request.cookies.get(COOKIE))
        if s is not None:
            return s
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            acc = self.auth.account(header[7:].strip())
            if acc is not None:
                return Session(sid="", role=acc.role, name=acc.name, csrf="", expires=0)
        return None

    def may_read(self, request: Request) -> Session | None:
        s = self.viewer(request)
        if s is None and not self.settings.read_anonymous:
            raise HTTPException(401, "log in first")
        return s

    async def operator(self, request: Request) -> dict[str, str]:
        """The form of an action, after login, role and CSRF checks."""
        s = self.auth.session(request.cookies.get(COOKIE))
        if s is None:
            raise HTTPException(401, "actions need a login")
        form = await _form(request)
        if not same(form.get("csrf"), s.csrf):
            raise HTTPException(403, "missing or wrong CSRF token")
        if s.role != "operator":
            raise HTTPException(403, f"{s.name} has the read-only role")
        return form

    def page(self, request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        s = self.auth.session(request.cookies.get(COOKIE))
        html = self.env.get_template(name).render(
            session=s, csrf=s.csrf if s else "", fleet_name=self.svc.config.trainer.fleet,
            trainer=self.svc.config.trainer.id, path=request.url.path, **ctx)
        return HTMLResponse(html, status_code=status_code)


def _ts(t: float | str | None) -> str:
    if t is None:
        return "–"
    if isinstance(t, str):
        return t.replace("T", " ")[:19]
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


async def _form(request: Request) -> dict[str, str]:
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        raise HTTPException(415, "expected a form")
    try:
        form = await request.form(max_files=0, max_fields=20)
    except Exception as exc:  # multipart's own errors: a bad body is the client's fault
        raise HTTPException(400, f"unreadable form: {str(exc)[:100]}") from None
    return {k: v for k, v in form.items() if isinstance(v, str)}


def _device_id(raw: str) -> str:
    try:
        return validate_id(raw)
    except TopicError as exc:
        raise HTTPException(404, str(exc)) from None


def _model_id(console: Console, raw: str) -> str:
    if not MODEL_ID_RE.fullmatch(raw) or raw not in console.svc.config.models:
        raise HTTPException(404, f"no model {raw[:64]!r}")
    return raw


def _positive_int(raw: str | None, what: str) -> int:
    if raw is None or not re.fullmatch(r"[0-9]{1,9}", raw.strip()):
        raise HTTPException(400, f"{what} must be a positive integer")
    value = int(raw)
    if value < 1:
        raise HTTPException(400, f"{what} must be a positive integer")
    return value


def build_app(console: Console) -> Starlette:  # noqa: C901, PLR0915  one closure per route
    c = console

    async def root(_r: Request) -> Response:
        return RedirectResponse("/fleet", 303)

    async def fleet_page(r: Request) -> Response:
        if c.viewer(r) is None and not c.settings.read_anonymous:
            return RedirectResponse("/login?next=/fleet", 303)
        rows = await run_in_threadpool(data.fleet, c.svc, c.history)
        return c.page(r, "fleet.html", rows=rows)  # filter and sort happen in the browser

    async def fleet_rows(r: Request) -> Response:
        c.may_read(r)
        rows = await run_in_threadpool(data.fleet, c.svc, c.history)
        return HTMLResponse(c.env.get_template("_fleet_rows.html").render(rows=rows))

    async def fleet_events(r: Request) -> Response:
        c.may_read(r)

        async def stream() -> AsyncIterator[str]:
            last = None
            tpl = c.env.get_template("_fleet_rows.html")
            while not c.closing.is_set() and not await r.is_disconnected():
                rows = await run_in_threadpool(data.fleet, c.svc, c.history)
                html = tpl.render(rows=rows)
                if html != last:
                    last = html
                    yield "event: fleet\n" + "".join(f"data: {line}\n"
                                                     for line in html.splitlines()) + "\n"
                else:
                    yield ": ping\n\n"
                await asyncio.sleep(SSE_INTERVAL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    async def device_info(r: Request) -> dict[str, Any]:
        c.may_read(r)
        dev = _device_id(r.path_params["device"])
        info = await run_in_threadpool(data.device, c.svc, c.history, dev)
        if info is None:
            raise HTTPException(404, f"no device {dev!r} in the fleet table")
        return info

    async def device_page(r: Request) -> Response:
        info = await device_info(r)
        h = info["history"]
        t0 = h[-1]["t"] if h else 0.0
        xs = [p["t"] - t0 for p in h]
        charts = [line_chart(title, xs, [p[key] for p in h], unit=unit)
                  for title, key, unit in (("frames/s", "fps", ""),
                                           ("uplink", "bytes_out_per_s", "bytes/s"),
                                           ("spool depth", "spool_records", "messages"),
                                           ("accuracy / agreement", "accuracy", "0..1"),
                                           ("latency p50", "latency_ms_p50", "ms"))]
        return c.page(r, "device.html", d=info, charts=[Markup(x) for x in charts])

    async def models_page(r: Request) -> Response:
        c.may_read(r)
        return c.page(r, "models.html", versions=await run_in_threadpool(data.models, c.svc))

    async def runs_page(r: Request) -> Response:
        c.may_read(r)
        return c.page(r, "runs.html", **await run_in_threadpool(data.runs, c.svc),
                      message=r.query_params.get("msg", "")[:200])

    async def drift_page(r: Request) -> Response:
        c.may_read(r)
        rows = await run_in_threadpool(data.drift, c.svc, c.history)
        for row in rows:
            t0 = row["t"][-1] if row["t"] else 0.0
            xs = [t - t0 for t in row["t"]]
            row["charts"] = [Markup(line_chart(f"{row['device']}: accuracy / agreement", xs,
                                               row["accuracy"], unit="0..1"))]
            if any(v is not None for v in row["confidence"]):  # only agents that report it
                row["charts"].append(Markup(line_chart(f"{row['device']}: confidence", xs,
                                                       row["confidence"], unit="0..1")))
        return c.page(r, "drift.html", rows=rows)

    # --- login
    async def login_form(r: Request) -> Response:
        token = secrets.token_urlsafe(24)
        resp = c.page(r, "login.html", login_csrf=token, error="",
                      next=_safe_next(r.query_params.get("next")))
        _cookie(resp, c, LOGIN_COOKIE, token, 600)
        return resp

    async def login(r: Request) -> Response:
        form = await _form(r)
        if not same(form.get("csrf"), r.cookies.get(LOGIN_COOKIE)):
            raise HTTPException(403, "missing or wrong CSRF token (reload the login page)")
        s = await run_in_threadpool(c.auth.login, form.get("token", ""))
        if s is None:
            token = secrets.token_urlsafe(24)
            resp = c.page(r, "login.html", 401, login_csrf=token, error="wrong token",
                          next=_safe_next(form.get("next")))
            _cookie(resp, c, LOGIN_COOKIE, token, 600)
            return resp
        resp = RedirectResponse(_safe_next(form.get("next")), 303)
        _cookie(resp, c, COOKIE, s.sid, int(c.settings.session_ttl_s))
        resp.delete_cookie(LOGIN_COOKIE)
        return resp

    async def logout(r: Request) -> Response:
        s = c.auth.session(r.cookies.get(COOKIE))
        form = await _form(r)
        if s is not None and same(form.get("csrf"), s.csrf):
            c.auth.logout(s.sid)
        resp = RedirectResponse("/fleet", 303)
        resp.delete_cookie(COOKIE)
        return resp

    # --- actions
    async def run_now(r: Request) -> Response:
        await c.operator(r)
        job_id = r.path_params["job"]
        if job_id not in c.svc.config.job_ids:
            raise HTTPException(404, f"no job {job_id[:64]!r}")
        msg = await run_in_threadpool(_run_now, c.svc, job_id)
        log.info("console: run now of %s requested", job_id)
        return RedirectResponse(f"/runs?msg={msg}", 303)

    async def rollback(r: Request) -> Response:
        form = await c.operator(r)
        model = _model_id(c, r.path_params["model"])
        version = _positive_int(form.get("version"), "version")
        try:
            v = await run_in_threadpool(c.svc.registry.rollback, model, version)
        except RegistryError as exc:
            raise HTTPException(404, str(exc)) from None
        log.info("console: %s rolled back to v%d as v%d", model, version, v.version)
        return RedirectResponse(f"/runs?msg={model} v{v.version} approved with the blocks "
                                f"of v{version}: it goes out with the next run", 303)

    async def pause_rollout(r: Request) -> Response:
        await c.operator(r)
        s = c.auth.session(r.cookies.get(COOKIE))
        await run_in_threadpool(c.svc.retrainer.pause.set, s.name if s else "?")
        return RedirectResponse("/runs?msg=rollouts paused: no stage is published until "
                                "resumed", 303)

    async def resume_rollout(r: Request) -> Response:
        await c.operator(r)
        s = c.auth.session(r.cookies.get(COOKIE))
        await run_in_threadpool(c.svc.retrainer.pause.clear, s.name if s else "?")
        return RedirectResponse("/runs?msg=rollouts resumed", 303)

    # --- JSON API (knet fleet)
    async def api_fleet(r: Request) -> Response:
        c.may_read(r)
        return JSONResponse({"fleet": c.svc.config.trainer.fleet,
                             "devices": await run_in_threadpool(data.fleet, c.svc, c.history)})

    async def api_device(r: Request) -> Response:
        return JSONResponse(await device_info(r))

    async def api_models(r: Request) -> Response:
        c.may_read(r)
        return JSONResponse({"versions": await run_in_threadpool(data.models, c.svc)})

    async def api_runs(r: Request) -> Response:
        c.may_read(r)
        return JSONResponse(await run_in_threadpool(data.runs, c.svc))

    async def api_drift(r: Request) -> Response:
        c.may_read(r)
        return JSONResponse({"devices": await run_in_threadpool(data.drift, c.svc,
                                                                   c.history)})

    async def http_error(r: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        detail = str(exc.detail)[:300]
        if r.url.path.startswith("/api/") or "text/html" not in r.headers.get("accept", ""):
            return JSONResponse({"error": detail}, status_code=exc.status_code)
        back = r.url.path if r.method == "GET" else "/fleet"  # an action's URL is POST-only
        return c.page(r, "error.html", exc.status_code, status=exc.status_code, reason=detail,
                      login_next=_safe_next(back))

    async def server_error(_r: Request, exc: Exception) -> Response:
        log.error("console: request failed: %r", exc, exc_info=exc)
        return JSONResponse({"error": "internal error (see the trainer's log)"}, 500)

    routes = [
        Route("/", root), Route("/fleet", fleet_page), Route("/fleet/rows", fleet_rows),
        Route("/events/fleet", fleet_events), Route("/devices/{device}", device_page),
        Route("/models", models_page), Route("/runs", runs_page), Route("/drift", drift_page),
        Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/runs/{job}/run", run_now, methods=["POST"]),
        Route("/models/{model}/rollback", rollback, methods=["POST"]),
        Route("/rollout/pause", pause_rollout, methods=["POST"]),
        Route("/rollout/resume", resume_rollout, methods=["POST"]),
        Route("/api/fleet", api_fleet), Route("/api/devices/{device}", api_device),
        Route("/api/models", api_models), Route("/api/runs", api_runs),
        Route("/api/drift", api_drift),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error,
                                                       Exception: server_error})
    app.add_middleware(SecurityHeaders)
    return app


SECURITY_HEADERS = [
    # Only this origin's script, style and event stream; no framing (clickjacking of the
    # action buttons), no MIME sniffing, no referrer with tokens in it leaving the site.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; "
                                 b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response (pure ASGI: streams stay streams)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _run_now(svc: TrainerService, job_id: str) -> str:
    """Move the job's next run to now, as ``knet-trainer jobs run-now`` does."""
    if svc.scheduler is None:
        raise HTTPException(409, "this trainer runs no scheduler")
    running = svc.runs.interrupted(job_id)
    if running is not None and svc._run_lock.locked():
        raise HTTPException(409, f"job {job_id} is already running (run {running.run_id[:8]})")
    svc.scheduler.run_now(job_id)
    return f"job {job_id}: run requested"


def _safe_next(raw: str | None) -> str:
    """Only a local path: a login must not redirect to another site."""
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw and \
            len(raw) < 200:
        return raw
    return "/fleet"


def _cookie(resp: Response, c: Console, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict",
                    secure=c.settings.tls, path="/")
