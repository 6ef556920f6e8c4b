"""Screenshots of every console page (docs/console/*.png) from a running console, in headless Chromium.

    scripts/demo.sh --keep          # prints "web console: URL (operator token: TOKEN)"; leave it running
    .venv/bin/python scripts/console_screenshots.py URL TOKEN [--out docs/console]

Signs in with TOKEN, then saves the overview, the devices table, the first device's page (15-minute window),
the newest rollout and the newest bundle. Needs Debian's chromium and chromium-driver, and selenium.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser_helpers import quit_browser, start_browser, wait_for  # noqa: E402


def api(url: str, token: str, path: str):
    """One GET of the console API."""
    req = urllib.request.Request(url.rstrip("/") + path, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("token")
    ap.add_argument("--out", default=str(ROOT / "docs" / "console"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = api(args.url, args.token, "/api/v1/devices?limit=1")["devices"][0]["device_id"]
    rollout = api(args.url, args.token, "/api/v1/rollouts?limit=1")[0]["rollout_id"]
    bundle = api(args.url, args.token, "/api/v1/bundles?limit=1")[0]
    pages = [("overview", "#/"), ("devices", "#/devices"), ("device", "#/device/%s?window=900" % device),
             ("rollout", "#/rollout/%s" % rollout), ("bundle", "#/bundle/%s/%d" % (bundle["name"], bundle["version"]))]
    drv = start_browser()
    try:
        drv.get(args.url)
        drv.execute_script("sessionStorage.setItem('fleet-token', arguments[0])", args.token)
        drv.refresh()
        for name, hash_ in pages:
            drv.execute_script("location.hash = arguments[0]", hash_)
            wait_for(lambda h=hash_: drv.execute_script("return document.body.getAttribute('data-rendered')") == h,
                     30, hash_)
            time.sleep(0.2)  # let the layout settle before the picture
            drv.save_screenshot(str(out / ("%s.png" % name)))
            print("saved %s" % (out / ("%s.png" % name)))
    finally:
        quit_browser(drv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
