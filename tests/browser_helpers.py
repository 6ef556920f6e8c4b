"""Headless Chromium from Debian's packages (chromium, chromium-driver) driven by Selenium, for the
console's browser tests: one browser per test session, its console log, waits with deadlines."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any, Callable, List

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000")


class BrowserMissing(RuntimeError):
    """Chromium or its driver is not installed."""


def start_browser() -> Any:
    """A fresh headless Chromium (own profile directory) under chromedriver; the profile is removed on quit."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise BrowserMissing("chromium and chromium-driver are not installed (scripts/test.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="console-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in (*FLAGS, "--user-data-dir=%s" % profile):
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    drv.profile_dir = profile
    return drv


def quit_browser(drv: Any) -> None:
    """Close the browser and remove its profile."""
    try:
        drv.quit()
    finally:
        shutil.rmtree(drv.profile_dir, ignore_errors=True)


def console_errors(drv: Any, allow: Callable[[str], bool] = lambda m: False) -> List[str]:
    """Severe entries of the browser console since the last call (other than those `allow` accepts)."""
    return [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE" and not allow(e["message"])]


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, step_s: float = 0.1) -> Any:
    """Poll `cond` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # the page is being re-rendered
            last_exc = e
        time.sleep(step_s)
    raise AssertionError("timed out after %.0f s waiting for %s%s" % (
        timeout_s, what, " (last error: %s)" % last_exc if last_exc else ""))
