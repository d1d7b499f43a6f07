"""A screenshot of the explorer's page (README, "Explore"): a query on the Flickr8k-mini test photos, one explanation
open, taken in headless Chromium.

    python benchmarks/explorer_screenshot.py --model runs/f8k/checkpoint/model_best.pth \\
        --query "a dog runs through the grass" --pick 1 --word dog --per_node --out graphs/explorer.png

Starts ``python -m hsc_pyg.serve`` on a free loopback port (gallery cache in a temporary folder), opens the page,
types ``--query``, clicks result ``--pick`` (1 = the best), shades by ``--word``, shows relations of ``--relation``
(an index into the explanation's relational layers; the last by default) and saves the page's PNG. Needs Selenium,
chromium and chromedriver (``make test-browser`` installs them).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import common as cm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_path", default=str(cm.ROOT.parent / "shared" / "data"))
    parser.add_argument("--data_name", default="flickr8k_mini_precomp")
    parser.add_argument("--query", default="a dog runs through the grass")
    parser.add_argument("--pick", type=int, default=1)
    parser.add_argument("--word", default="")
    parser.add_argument("--relation", type=int, default=-1)
    parser.add_argument("--per_node", action="store_true", help="each region's strongest source (--rank per_node)")
    parser.add_argument("--out", default="graphs/explorer.png")
    args = parser.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from hsc_pyg.io import write_bytes

    images = Path(args.data_path) / args.data_name / "images"
    env = {**os.environ, "PYTHONPATH": str(cm.ROOT)}
    with tempfile.TemporaryDirectory(prefix="explorer_shot_") as tmp:
        server = subprocess.Popen([sys.executable, "-m", "hsc_pyg.serve", "--model", args.model, "--data_path",
                                   args.data_path, "--data_name", args.data_name, "--split", "test", "--image_root",
                                   str(images), "--port", "0", "--cache", str(Path(tmp) / "cache"), "--no_progress"],
                                  cwd=cm.ROOT, env=env, stderr=subprocess.PIPE, text=True)
        address = next((m.group(1) for line in server.stderr if (m := re.search(r"serving (http://\S+)/", line))),
                       None)
        if address is None:
            raise SystemExit("the server did not start")
        options = webdriver.ChromeOptions()
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,1000",
                     "--hide-scrollbars", f"--user-data-dir={Path(tmp) / 'profile'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(address + "/")
            wait.until(lambda d: "photos" in d.find_element(By.ID, "info").text)
            driver.find_element(By.ID, "query").send_keys(args.query)
            driver.find_element(By.ID, "search-button").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 10)
            wait.until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results img')].every(i => i.complete)"))
            driver.find_elements(By.CSS_SELECTOR, "#results li")[args.pick - 1].click()
            overlay = driver.find_element(By.ID, "overlay")
            wait.until(lambda d: overlay.get_attribute("data-edges") is not None)
            if args.word:
                chips = [c for c in driver.find_elements(By.CSS_SELECTOR, "#tokens .chip") if c.text == args.word]
                chips[0].click()
            if args.per_node:
                driver.find_element(By.ID, "per-node").click()
                wait.until(lambda d: overlay.get_attribute("data-ranking") == "per_node")
            relations = driver.find_elements(By.CSS_SELECTOR, "#levels .chip")
            relations[len(relations) - 2 if args.relation < 0 else args.relation].click()    # the last is "none"
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    write_bytes(args.out, png)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
