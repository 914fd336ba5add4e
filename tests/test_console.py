"""The console over HTTP (no browser): config checks, login, roles, CSRF, and bad input
answered with a 4xx and a reason, never a 500 or a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from console_helpers import OPERATOR_TOKEN, READER_TOKEN, fake_service, write_tokens
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from agent.configfile import ConfigError
from cloud_trainer.serve.console.app import Console, build_app
from cloud_trainer.serve.console.auth import Auth, check_token, hash_token, load_tokens
from cloud_trainer.serve.console.config import ConsoleSection
from cloud_trainer.serve.console.history import StatsHistory


@pytest.fixture
def svc(tmp_path: Path) -> Any:
    s = fake_service(tmp_path)
    s.fleet.update_state("cam-1", b'{"state": "online", "session": 2}')
    s.fleet.update_birth("cam-1", json.dumps({
        "session": 2, "profile": "x86-dev", "model_id": "digits", "model_version": 1,
        "partition": {"first": 1, "last": 2, "num_blocks": 4},
        "blocks": {"1": "a" * 64, "2": "b" * 64}}).encode())
    return s


@pytest.fixture
def client(svc: Any) -> TestClient:
    console = Console(svc, svc.config.console, StatsHistory(100))
    return TestClient(build_app(console), raise_server_exceptions=False,
                      base_url="http://127.0.0.1")


def login(client: TestClient, token: str) -> str:
    """Log in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"csrf": csrf, "token": token, "next": "/runs"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    runs = client.get("/runs")
    return re.search(r'name="csrf" value="([^"]+)"', runs.text).group(1)


def test_tokens_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    stored = hash_token("s3cret")
    assert "s3cret" not in stored and check_token("s3cret", stored)
    assert not check_token("s3cret!", stored) and not check_token("x", "garbage$1$2")
    accounts = load_tokens(write_tokens(tmp_path / "t"))
    assert [(a.role, a.name) for a in accounts] == [("operator", "alice"), ("read", "bob")]
    assert OPERATOR_TOKEN not in (tmp_path / "t").read_text()
    auth = Auth(accounts, 60)
    assert auth.account(READER_TOKEN).role == "read" and auth.account("nope") is None


def test_config_requires_tls_and_tokens_beyond_loopback(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path / "t")
    with pytest.raises(ValueError, match="tls_cert_file"):
        ConsoleSection(enabled=True, bind="0.0.0.0", tokens_file=tokens)
    with pytest.raises(ValueError, match="read_anonymous"):
        ConsoleSection(enabled=True, bind="10.0.0.5", tokens_file=tokens,
                       tls_cert_file=tokens, tls_key_file=tokens, read_anonymous=True)
    with pytest.raises(ValueError, match="go together"):
        ConsoleSection(tls_cert_file=tokens)
    with pytest.raises(ValueError, match="IP address"):
        ConsoleSection(bind="not a host")
    with pytest.raises(ValueError, match="does not exist"):
        ConsoleSection(enabled=True, tokens_file=tmp_path / "missing")
    ok = ConsoleSection(enabled=True, bind="10.0.0.5", tokens_file=tokens,
                        tls_cert_file=tokens, tls_key_file=tokens)
    assert ok.tls and ConsoleSection().bind == "127.0.0.1"
    from trainer_helpers import trainer_toml

    from cloud_trainer.trainer_config import load_trainer_config

    with pytest.raises(ConfigError, match=r"console.*unknown key"):
        load_trainer_config(trainer_toml(tmp_path, 1883, console={"enabled": True,
                                                                   "colour": "red"}))


def test_reading_needs_a_login_unless_anonymous(client: TestClient) -> None:
    assert client.get("/fleet", follow_redirects=False).status_code == 303
    assert client.get("/api/fleet").status_code == 401
    assert client.get("/api/fleet", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/api/fleet", headers={"Authorization": f"Bearer {READER_TOKEN}"})
    assert r.status_code == 200 and r.json()["devices"][0]["device"] == "cam-1"
    login(client, READER_TOKEN)
    page = client.get("/fleet")
    assert page.status_code == 200 and "cam-1" in page.text and "online" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert client.get("/nope").headers["x-content-type-options"] == "nosniff"
    for path in ("/devices/cam-1", "/models", "/runs", "/drift", "/fleet/rows",
                 "/api/devices/cam-1", "/api/models", "/api/runs", "/api/drift"):
        assert client.get(path).status_code == 200, path


def test_actions_need_an_operator_and_a_csrf_token(client: TestClient, svc: Any) -> None:
    r = client.post("/runs/retrain/run", data={"csrf": "x"})
    assert r.status_code == 401 and "login" in r.json()["error"]
    csrf = login(client, READER_TOKEN)
    r = client.post("/runs/retrain/run", data={"csrf": csrf})
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    client.cookies.clear()
    csrf = login(client, OPERATOR_TOKEN)
    r = client.post("/runs/retrain/run", data={"other": "1"})
    assert r.status_code == 403 and "CSRF" in r.json()["error"]
    r = client.post("/runs/retrain/run", data={"csrf": csrf + "x"})
    assert r.status_code == 403
    # Accepted past the checks; this fake trainer has no scheduler: a 409 with the reason.
    r = client.post("/runs/retrain/run", data={"csrf": csrf})
    assert r.status_code == 409 and "scheduler" in r.json()["error"]


def test_login_form_is_csrf_protected_and_wrong_tokens_refused(client: TestClient) -> None:
    r = client.post("/login", data={"csrf": "forged", "token": OPERATOR_TOKEN})
    assert r.status_code == 403
    page = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"csrf": csrf, "token": "wrong"})
    assert r.status_code == 401 and "wrong token" in r.text
    page = client.get("/login?next=//evil.example")
    assert 'value="/fleet"' in page.text  # no open redirect


@pytest.mark.parametrize("method,path,form", [
    ("GET", "/devices/NOT_A_DEVICE", None),
    ("GET", "/devices/ghost", None),
    ("GET", "/devices/%00%ff", None),
    ("GET", "/api/devices/" + "x" * 500, None),
    ("GET", "/nope/../../etc/passwd", None),
    ("GET", "/static/../app.py", None),
    ("POST", "/runs/nojob/run", "csrf"),
    ("POST", "/runs/%2e%2e/run", "csrf"),
    ("POST", "/models/digits/rollback", {"version": "abc"}),
    ("POST", "/models/digits/rollback", {"version": "-1"}),
    ("POST", "/models/digits/rollback", {"version": "99"}),
    ("POST", "/models/no-such/rollback", {"version": "1"}),
    ("POST", "/models/digits/rollback", {"version": "9" * 40}),
    ("POST", "/fleet", None),
    ("GET", "/fleet?sort=%ff%fe", None),
])
def test_garbage_gets_a_4xx_with_a_reason(client: TestClient, method: str, path: str,
                                          form: Any) -> None:
    csrf = login(client, OPERATOR_TOKEN)
    data = None
    if form == "csrf":
        data = {"csrf": csrf}
    elif isinstance(form, dict):
        data = {"csrf": csrf, **form}
    for accept in ("application/json", "text/html"):  # the API's and the browser's answer
        r = client.request(method, path, data=data, headers={"accept": accept})
        if path.startswith("/fleet?"):
            assert r.status_code == 200
            continue
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
        assert "Traceback" not in r.text
        if accept == "text/html" and r.status_code != 405 and "/api/" not in path:
            assert 'id="reason"' in r.text, r.text[:300]


def test_bodies_that_are_not_forms_are_refused(client: TestClient) -> None:
    csrf = login(client, OPERATOR_TOKEN)
    r = client.post("/runs/retrain/run", content=b"\xff" * 100,
                    headers={"content-type": "application/json"})
    assert r.status_code == 415
    r = client.post("/runs/retrain/run", content=b"a" * 20000,
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    r = client.post("/runs/retrain/run", content=b"--x\r\ngarbage",
                    headers={"content-type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500
    assert csrf


def test_rollback_from_the_models_page(client: TestClient, svc: Any) -> None:
    import torch

    svc.registry.add_version("digits", [{"w": torch.ones(2)}], status="pushed")
    svc.registry.add_version("digits", [{"w": torch.zeros(2)}], parent=1, status="approved")
    svc.registry.set_status("digits", 2, "pushed")  # v1 superseded: the one to go back to
    csrf = login(client, OPERATOR_TOKEN)
    page = client.get("/models")
    assert "roll back to v1" in page.text and "roll back to v2" not in page.text
    r = client.post("/models/digits/rollback", data={"csrf": csrf, "version": "1"},
                    follow_redirects=False)
    assert r.status_code == 303 and "v3" in r.headers["location"]
    v3 = svc.registry.get("digits", 3)
    assert v3.status == "approved" and v3.info["rollback_of"] == 1


def test_an_unexpected_error_is_a_bare_500_without_traceback(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloud_trainer.serve.console import data

    def broken(*_a: Any) -> None:
        raise RuntimeError("secret internals /etc/knet")

    monkeypatch.setattr(data, "fleet", broken)
    r = client.get("/api/fleet", headers={"Authorization": f"Bearer {READER_TOKEN}"})
    assert r.status_code == 500
    assert "Traceback" not in r.text and "secret" not in r.text and "see the trainer" in r.text


segment = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                  max_size=80)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seg=segment, field=segment, value=segment)
def test_fuzzed_paths_and_forms_never_get_a_5xx(client: TestClient, seg: str, field: str,
                                                value: str) -> None:
    from urllib.parse import quote

    q = quote(seg, safe="")
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    for path in (f"/devices/{q}", f"/api/devices/{q}", f"/{q}", f"/static/{q}",
                 f"/fleet?sort={q}", f"/login?next={q}"):
        r = client.get(path, headers=headers)
        assert r.status_code < 500, (path, r.status_code)
    for path in (f"/runs/{q}/run", f"/models/{q}/rollback", "/models/digits/rollback",
                 "/login", "/logout"):
        r = client.post(path, data={field: value, "version": value}, headers=headers)
        assert r.status_code < 500, (path, r.status_code)
        assert "Traceback" not in r.text


def test_pause_and_resume_rollout(client: TestClient, svc: Any) -> None:
    pause = svc.retrainer.pause
    csrf = login(client, READER_TOKEN)
    assert client.post("/rollout/pause", data={"csrf": csrf}).status_code == 403
    assert not pause.is_set()
    client.cookies.clear()
    csrf = login(client, OPERATOR_TOKEN)
    assert client.post("/rollout/pause", data={"other": "1"}).status_code == 403  # no CSRF
    r = client.post("/rollout/pause", data={"csrf": csrf})
    assert r.status_code == 200 and pause.is_set() and pause.info()["by"] == "alice"
    assert "paused" in r.text and 'id="resume-rollout"' in r.text
    assert client.get("/api/runs").json()["paused"]["by"] == "alice"
    r = client.post("/rollout/resume", data={"csrf": csrf})
    assert r.status_code == 200 and not pause.is_set() and 'id="pause-rollout"' in r.text
