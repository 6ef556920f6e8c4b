"""The console in a real browser (headless Chromium, Selenium) against real parts: mosquitto, `fleet serve`
as a process with the console on, and `edge-agent run` processes deploying the real sample bundle.

Pages load with no console errors; agents joining appear; a bundle uploaded and a rollout started from
the UI advance through their waves as the agents deploy, with live updates; device charts draw; a viewer
or a signed-out session cannot act (UI and API). With FLEET_CONSOLE_SCREENSHOTS=DIR each page is saved
as a PNG there (docs/console/ holds the ones in the README).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from agent_helpers import REPO, FleetRig, build_sample_bundle
from browser_helpers import BrowserMissing, console_errors, quit_browser, start_browser, wait_for
from mqtt_broker import Broker
from selenium.webdriver.common.by import By

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
DEVICES = ["edge-a", "edge-b", "edge-c"]
TIMEOUT = 120
SHOTS = os.environ.get("FLEET_CONSOLE_SCREENSHOTS")


@pytest.fixture(scope="session")
def browser():
    try:
        drv = start_browser()
    except BrowserMissing as e:
        if os.environ.get("EDGE_AGENT_SKIP_BROWSER") == "1":
            pytest.skip(str(e))
        raise
    yield drv
    quit_browser(drv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token(toml: Path, role: str, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "fleet.cli", "token", "add", "--role", role, "--name", name,
                          "--config", str(toml)], capture_output=True, text=True, check=True, cwd=str(REPO))
    return out.stdout.splitlines()[0]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """mosquitto + `fleet serve` (console on, one telemetry history point per second) + two agents."""
    tmp = tmp_path_factory.mktemp("console-live")
    broker = Broker(tmp / "mosquitto")
    port = _free_port()
    rig = FleetRig(broker, tmp, extra_toml="\n".join([
        "[console]", "enabled = true", "port = %d" % port, "stream_interval_s = 0.3",
        "[registry]", "history_interval_s = 1.0"]))
    rig.url = "http://127.0.0.1:%d/" % port
    rig.tokens = {"operator": _token(rig.fleet_toml, "operator", "olga"),
                  "viewer": _token(rig.fleet_toml, "viewer", "victor")}
    try:
        for d in DEVICES[:2]:
            rig.start_agent(d)
        wait_for(lambda: b"fleet console on" in (tmp / "serve.log").read_bytes(), 30, "the console listening")
        yield rig
    finally:
        rig.close()
        broker.close()


def sign_in(drv, rig, role: str) -> None:
    drv.get(rig.url)
    drv.execute_script("sessionStorage.clear()")
    drv.refresh()
    box = wait_for(lambda: drv.find_element(By.ID, "token"), 10, "the sign-in form")
    box.send_keys(rig.tokens[role])
    drv.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_for(lambda: role in drv.find_element(By.ID, "who").text, 10, "signed in as %s" % role)


def goto(drv, hash_: str, page: str) -> None:
    """Open a console address and wait until its page is rendered (failing on an error shown)."""
    drv.execute_script("location.hash = arguments[0]", hash_)
    wait_for(lambda: drv.execute_script("return document.body.getAttribute('data-rendered')") == hash_, 20, hash_)
    assert drv.execute_script("return document.body.getAttribute('data-page')") == page
    errs = drv.find_elements(By.ID, "error")
    assert not errs, errs[0].text


def shot(drv, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(Path(SHOTS) / ("%s.png" % name)))


def rows(drv, table: str):
    return drv.find_elements(By.CSS_SELECTOR, "#%s tr[data-device]" % table)


def test_pages_load_without_errors_and_joining_agents_appear(browser, live):
    drv = browser
    console_errors(drv)  # start clean
    sign_in(drv, live, "operator")
    goto(drv, "#/", "overview")
    assert drv.find_element(By.ID, "count-devices").text == "2"
    goto(drv, "#/devices", "devices")
    assert sorted(r.get_attribute("data-device") for r in rows(drv, "devices")) == DEVICES[:2]
    live.start_agent(DEVICES[2])  # a device joins while the page is open: the table refreshes itself
    drv.execute_script("window.sameDocument = true")
    wait_for(lambda: len(rows(drv, "devices")) == 3, 30, "the third agent in the devices table", step_s=0.3)
    assert drv.execute_script("return window.sameDocument") is True
    goto(drv, "#/devices?sort=device_id&order=desc", "devices")
    assert [r.get_attribute("data-device") for r in rows(drv, "devices")] == DEVICES[::-1]
    shot(drv, "devices")
    for h, page in (("#/rollouts", "rollouts"), ("#/bundles", "bundles"), ("#/device/edge-a", "devices")):
        goto(drv, h, page)
    goto(drv, "#/", "overview")
    wait_for(lambda: drv.find_element(By.ID, "count-devices").text == "3", 10, "3 devices in the overview")
    shot(drv, "overview")
    assert console_errors(drv) == []


def test_rollout_from_the_ui_advances_through_waves_as_agents_deploy(browser, live, tmp_path):
    drv = browser
    console_errors(drv)
    sign_in(drv, live, "operator")
    bundle = build_sample_bundle(tmp_path / "b", live.release_key, version=1)
    goto(drv, "#/bundles", "bundles")
    drv.find_element(By.ID, "upload-file").send_keys(str(bundle))
    _confirm(drv, "Upload")
    wait_for(lambda: "digits" in drv.find_element(By.ID, "bundles").text, 60, "the uploaded bundle listed")
    drv.find_element(By.LINK_TEXT, "digits").click()
    wait_for(lambda: drv.find_elements(By.CSS_SELECTOR, "#models tr"), 10, "the bundle page")
    assert {"small", "large"} <= set(drv.find_element(By.ID, "models").text.split())
    assert live.release_key.keyid in drv.find_element(By.ID, "signatures").text
    shot(drv, "bundle")

    goto(drv, "#/rollouts", "rollouts")
    waves = drv.find_element(By.ID, "start-waves")
    waves.clear()
    waves.send_keys("33,66,100")
    _confirm(drv, "Start rollout")
    wait_for(lambda: "#/rollout/" in drv.current_url, 20, "the rollout page")
    drv.execute_script("window.sameDocument = true")
    seen_waves = set()

    def advanced():
        state = drv.find_element(By.ID, "rollout-state").text
        seen_waves.add(drv.find_element(By.ID, "rollout-wave").text)
        return state in ("succeeded", "halted", "aborted") and state

    state = wait_for(advanced, TIMEOUT, "the rollout to finish (live updates)", step_s=0.2)
    assert state == "succeeded", drv.find_element(By.ID, "app").text
    # Live updates showed the waves one after another, without reloading the page.
    assert len(seen_waves) >= 2 and "3 of 3" in seen_waves, seen_waves
    assert drv.execute_script("return window.sameDocument") is True
    ok = [int(w.get_attribute("data-succeeded")) for w in drv.find_elements(By.CSS_SELECTOR, "#waves .wave")]
    assert ok == [1, 1, 1]
    states = {r.get_attribute("data-device"): r.find_elements(By.TAG_NAME, "td")[2].text
              for r in rows(drv, "rollout-devices")}
    assert states == {d: "succeeded" for d in DEVICES}
    shot(drv, "rollout")
    for d in DEVICES:
        assert live.state(d)["active"]["version"] == 1
    assert console_errors(drv) == []


def test_device_charts_draw_over_a_selectable_window(browser, live):
    drv = browser
    console_errors(drv)
    sign_in(drv, live, "operator")
    goto(drv, "#/device/edge-a?window=900", "devices")

    def drawn():
        goto(drv, "#/device/edge-a?window=900&limit=1", "devices")
        goto(drv, "#/device/edge-a?window=900", "devices")
        charts = drv.find_elements(By.CSS_SELECTOR, "#charts [data-chart]")
        return len(charts) == 8 and int(charts[7].get_attribute("data-points") or 0) >= 2 and charts

    charts = wait_for(drawn, 60, "the memory chart with two points", step_s=1.0)
    titles = [c.find_element(By.TAG_NAME, "h3").text for c in charts]
    assert titles[0].startswith("Latency") and titles[3].startswith("Large model share")
    mem = charts[7].find_element(By.CSS_SELECTOR, "polyline.series")
    assert len(mem.get_attribute("points").split()) >= 2
    Select = __import__("selenium.webdriver.support.ui", fromlist=["Select"]).Select
    Select(drv.find_element(By.ID, "window")).select_by_visible_text("24 hours")
    wait_for(lambda: drv.execute_script("return document.body.getAttribute('data-rendered')")
             == "#/device/edge-a?window=86400", 10, "the 24-hour window")
    assert len(drv.find_elements(By.CSS_SELECTOR, "#charts svg")) == 8
    assert drv.find_elements(By.CSS_SELECTOR, "#events li")
    shot(drv, "device")
    assert console_errors(drv) == []


def test_viewer_and_signed_out_sessions_cannot_act(browser, live):
    drv = browser
    sign_in(drv, live, "viewer")
    goto(drv, "#/rollouts", "rollouts")
    button = drv.find_element(By.CSS_SELECTOR, "[data-action='Start rollout']")
    assert not button.is_enabled()
    # The API refuses the viewer too, whatever the page shows.
    status = drv.execute_async_script(
        "var done = arguments[0]; fetch('/api/v1/rollouts', {method: 'POST', headers: {'Authorization': "
        "'Bearer ' + sessionStorage.getItem('fleet-token'), 'Content-Type': 'application/json'}, body: "
        "JSON.stringify({bundle: {name: 'digits', version: 1}})}).then(function (r) { done(r.status); });")
    assert status == 403
    drv.find_element(By.ID, "logout").click()
    assert drv.find_element(By.ID, "token").is_displayed()
    status = drv.execute_async_script(
        "var done = arguments[0]; fetch('/api/v1/rollback', {method: 'POST', headers: {'Content-Type': "
        "'application/json'}, body: JSON.stringify({devices: ['edge-a']})}).then(function (r) { done(r.status); });")
    assert status == 401
    # Only the two refusals above reached the console log.
    assert all(" 40" in m for m in console_errors(drv)), console_errors(drv)


def _confirm(drv, label: str) -> None:
    drv.find_element(By.CSS_SELECTOR, "[data-action='%s']" % label).click()
    ok = wait_for(lambda: drv.find_element(By.ID, "confirm-ok"), 5, "the confirmation dialog")
    wait_for(ok.is_displayed, 5, "the confirmation dialog shown")
    ok.click()
