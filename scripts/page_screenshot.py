"""Screenshot of the search page with results, in headless Chromium (the browser test's tooling).

    python scripts/page_screenshot.py --run runs/demo --query "a red square" --out docs/search_page.png

Serves the run in this process (as serve.py does), opens ``/?q=QUERY`` and saves a PNG once the
result cards, their images and the video posters have loaded. Needs Debian's chromium and
chromium-driver (apt-get install -y chromium chromium-driver) and selenium (the test extra).
``chromium_driver()`` is also the browser of tests/test_search_page.py.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]


def chromium_paths() -> tuple[str | None, str | None]:
    return shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@contextlib.contextmanager
def chromium_driver(window: str = "1200,900"):
    """A headless Chromium webdriver with a throw-away profile; never looks a driver up online."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = chromium_paths()
    if chromium is None or chromedriver is None:
        raise RuntimeError("Chromium and chromedriver are absent: apt-get install -y chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="ace-chromium-")
    opts = Options()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={window}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# True once every result image and video poster has loaded (or failed: a broken file must not hang the wait).
MEDIA_SETTLED_JS = """
const imgs = Array.from(document.querySelectorAll('#results img'));
const posters = Array.from(document.querySelectorAll('#results video[poster]')).map(v => v.poster);
window.__posters = window.__posters || {};
for (const url of posters) if (!(url in window.__posters)) {
  window.__posters[url] = null;
  const im = new Image(); im.onload = () => window.__posters[url] = im.naturalWidth; im.onerror = () => window.__posters[url] = 0; im.src = url;
}
return imgs.every(i => i.complete) && posters.every(u => window.__posters[u] !== null);
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="run folder written by train.py")
    ap.add_argument("--query", default="a red square")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "search_page.png")
    ap.add_argument("--window", default="1200,900", help="browser window size, W,H")
    args = ap.parse_args(argv)
    if not args.run.is_dir():
        print(f"error: run folder not found: {args.run}", file=sys.stderr)
        return 2

    sys.path.insert(0, str(ROOT / "tests"))
    from selenium.webdriver.support.ui import WebDriverWait
    from serving_support import running_server

    from ace.config import ServeConfig
    from ace.serving.retriever import Retriever
    from ace.serving.server import create_app

    app = create_app(Retriever.from_run(args.run, device="cpu"), ServeConfig())
    with running_server(app) as url, chromium_driver(args.window) as driver:
        driver.get(f"{url}/?{urlencode({'q': args.query, 'k': args.k})}")
        WebDriverWait(driver, 60).until(lambda d: "result(s)" in d.find_element("id", "status").text
                                        or "error" in d.find_element("id", "status").get_attribute("class"))
        if "result(s)" not in driver.find_element("id", "status").text:
            print(f"error: the search failed: {driver.find_element('id', 'status').text}", file=sys.stderr)
            return 1
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(MEDIA_SETTLED_JS))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
