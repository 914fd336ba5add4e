"""The console in a real browser: a private Mosquitto, a trainer with the console, two
agents, and headless Chromium (the Debian ``chromium`` + ``chromium-driver``, driven by
Selenium; Selenium Manager off, so nothing is downloaded).

Walks through: both devices online on the Fleet page; one agent stopped and the page shows it
without a reload; an action without a login refused; rollouts paused, a retraining run
started from the Runs page holds before its canary, resumed, completes, and the new version
appears on the Device page. Screenshots of every page go
to out/console/.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import write_inputs
from console_helpers import OPERATOR_TOKEN, console_section
from mqtt_helpers import wait_until
from trainer_helpers import REPO, deploy_damaged_digits, job, trainer_toml
from update_helpers import agent_toml, running_agent

from broker.launcher import Mosquitto
from cloud_trainer.service import TrainerService
from cloud_trainer.trainer_config import load_trainer_config

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("KNET_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("KNET_CHROMEDRIVER", "/usr/bin/chromedriver"))
SHOTS = REPO / "out" / "console"


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    # A missing browser is a failure with the reason, never a silent skip: CI must run this.
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    assert not missing, (f"{', '.join(missing)} missing: run scripts/bootstrap.sh (apt-get "
                         "install chromium chromium-driver)")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_manager(*_a: object, **_k: object) -> dict:
        raise AssertionError("Selenium Manager was asked for a browser or driver: "
                             "nothing may be downloaded")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)  # Selenium Manager off

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager is never asked to find or fetch one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: object, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))  # type: ignore[attr-defined]


def test_console_in_a_browser(tmp_path: Path, mosquitto: Mosquitto, browser: object) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 30)

    deploy_damaged_digits(tmp_path)  # a damaged v1, so a retraining run improves it
    config = load_trainer_config(trainer_toml(
        tmp_path, mosquitto.port, ingest={"enabled": True},
        jobs=[job("retrain", min_new_samples=300, boundaries=[0], training={"epochs": 8})],
        rollout={"canary_fraction": 1.0, "success_timeout_s": 60},
        console=console_section(tmp_path, read_anonymous=True)))
    write_inputs(tmp_path / "inputs.npz", 540)
    agents = {dev: agent_toml(
        tmp_path, mosquitto.port, tmp_path / "model" / "manifest.json",
        tmp_path / "keys" / "knet-update.pub", device=dev,
        uplink={"boundaries": [0], "allow_raw_upload": True, "codec": "uint8+lz4"},
        update={"agreement_threshold": 0.2}) for dev in ("cam-1", "cam-2")}

    with TrainerService(config) as svc, running_agent(agents["cam-1"]), \
            contextlib.ExitStack() as cam2:
        cam2.enter_context(running_agent(agents["cam-2"]))
        url = svc.console.url

        # 1. The Fleet page lists both devices online.
        d.get(f"{url}/fleet")
        for dev in ("cam-1", "cam-2"):
            wait.until(ec.presence_of_element_located(
                (By.CSS_SELECTOR, f"#dev-{dev}[data-state=online]")))
        wait.until(lambda drv: "–" not in drv.find_element(By.CSS_SELECTOR,
                                                           "#dev-cam-1 td:nth-child(6)").text)
        shot(d, "fleet")

        # 2. cam-2 stops; the same page (no reload) shows it stopped within seconds.
        marker = d.execute_script("window.__noReload = 1; return window.__noReload;")
        cam2.close()
        WebDriverWait(d, 10).until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "#dev-cam-2[data-state=stopped]")))
        assert d.execute_script("return window.__noReload;") == marker, "the page reloaded"
        assert d.find_element(By.CSS_SELECTOR, "#dev-cam-1").get_attribute(
            "data-state") == "online"
        shot(d, "fleet-stopped")

        # 3. An action without a login is refused.
        d.get(f"{url}/runs")
        d.find_element(By.ID, "run-retrain").click()
        reason = wait.until(ec.presence_of_element_located((By.ID, "reason")))
        assert "actions need a login" in reason.text and "401" in d.title
        shot(d, "refused")
        assert svc.runs.runs(kind="run") == [], "the refused action started a run"

        # 4. Log in as the operator; run the job from the Runs page.
        assert wait_until(lambda: svc.store.count(boundary=0, model_version=1) >= 600, 90)
        d.get(f"{url}/login?next=/runs")
        shot(d, "login")
        d.find_element(By.ID, "token").send_keys(OPERATOR_TOKEN)
        d.find_element(By.ID, "login").click()
        # Pause rollouts first: the run trains and gates, then holds before its canary.
        wait.until(ec.presence_of_element_located((By.ID, "pause-rollout"))).click()
        wait.until(ec.presence_of_element_located((By.ID, "resume-rollout")))
        d.find_element(By.ID, "run-retrain").click()
        # The page being left may show the pause's own message: wait for the new page's
        # (text_to_be_present_in_element re-finds the element and rides out a stale one).
        assert wait.until(ec.text_to_be_present_in_element((By.ID, "msg"), "run requested"))

        def holding(drv: object) -> bool:
            drv.get(f"{url}/runs")  # type: ignore[attr-defined]
            return "waiting to publish" in drv.find_element(  # type: ignore[attr-defined]
                By.ID, "rollout-state").text

        WebDriverWait(d, 240, poll_frequency=1).until(holding)
        assert svc.fleet.get("cam-1").model_version == 1, "published while paused"
        shot(d, "runs-paused")
        d.find_element(By.ID, "resume-rollout").click()
        wait.until(ec.presence_of_element_located((By.ID, "pause-rollout")))

        def pushed(drv: object) -> bool:
            drv.refresh()  # type: ignore[attr-defined]
            text = drv.find_element(By.ID, "job-retrain").text  # type: ignore[attr-defined]
            assert "failed" not in text and "rejected" not in text, text
            return "pushed" in text

        WebDriverWait(d, 240, poll_frequency=1).until(pushed)
        shot(d, "runs")

        # 5. The new version on the Device page (cam-1 was the canary, then the group).
        d.get(f"{url}/devices/cam-1")
        WebDriverWait(d, 30, poll_frequency=0.5).until(
            lambda drv: drv.refresh() or "v2" in drv.find_element(By.ID,
                                                                  "device-version").text)
        assert "applied" in d.find_element(By.ID, "updates").text
        d.set_window_size(1500, 1500)  # the plots and the update history in one picture
        shot(d, "device")
        d.get(f"{url}/models")
        assert "v2" in d.find_element(By.ID, "models").text
        shot(d, "models")
        d.get(f"{url}/drift")
        wait.until(ec.presence_of_element_located((By.ID, "drift-cam-1")))
        shot(d, "drift")
        d.get(f"{url}/fleet")
        wait.until(ec.presence_of_element_located(
            (By.CSS_SELECTOR, "#dev-cam-1[data-state=online]")))
        shot(d, "fleet-after")
    for name in ("fleet", "fleet-stopped", "refused", "login", "runs", "device", "models",
                 "drift"):
        assert (SHOTS / f"{name}.png").stat().st_size > 5000, name
