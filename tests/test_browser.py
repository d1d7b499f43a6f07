"""The explorer's page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by Selenium
types a query, waits for the photos, opens an explanation and checks what is drawn. Skipped, with the reason, where
Selenium or the browser is missing (``make test-browser`` installs them)."""
from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("selenium", reason="Selenium is not installed (make test-browser installs it)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from served import explorer_of, live_server, served_data  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
QUERY = "a red cube left of a blue ball"

#: the count of canvas pixels painted in a colour, by the page's own drawing (shade orange, edge red / blue)
PAINTED = """
const c = document.getElementById('overlay'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let shade = 0, edge = 0;
for (let i = 0; i < d.length; i += 4) {
  if (d[i + 3] === 0) continue;
  if (d[i] > 200 && d[i + 1] > 100 && d[i + 2] < 60) shade++; else edge++;
}
return [c.width, c.height, shade, edge];
"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no headless browser here: chromium and chromedriver are not on PATH "
                    "(Debian: apt-get install chromium chromium-driver, or make test-browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with live_server(explorer_of(served_data(tmp_path_factory.mktemp("browser")))) as base:
        yield base


def api(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=60) as response:
        return json.loads(response.read())


def test_search_then_explanation_drawn_over_the_photo(browser, url):
    wait = WebDriverWait(browser, 30)
    browser.get(url + "/")
    wait.until(lambda d: "photos" in d.find_element(By.ID, "info").text)
    browser.find_element(By.ID, "query").send_keys(QUERY)
    browser.find_element(By.ID, "search-button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 10)

    want = api(url, f"/api/search?q={urllib.parse.quote_plus(QUERY)}&k=10")["results"]
    cards = browser.find_elements(By.CSS_SELECTOR, "#results li")
    assert [c.get_attribute("data-image") for c in cards] == [h["id"] for h in want]
    assert f"score {want[0]['score']:.4f}" in cards[0].text
    assert browser.execute_script("return [...document.querySelectorAll('#results img')]"
                                  ".every(i => i.complete && i.naturalWidth === 160)")

    cards[1].click()
    overlay = browser.find_element(By.ID, "overlay")
    wait.until(lambda d: overlay.get_attribute("data-edges") is not None)
    explanation = api(url, f"/api/explain?q={urllib.parse.quote_plus(QUERY)}&image={want[1]['id']}")
    first = explanation["relations"][0]
    assert overlay.get_attribute("data-token") == explanation["tokens"][explanation["default_token"]]
    assert overlay.get_attribute("data-level") == first["level"]
    assert int(overlay.get_attribute("data-edges")) == len(first["edges"]) == 12
    assert int(overlay.get_attribute("data-shaded")) > 0
    width, height, shade, edge = browser.execute_script(PAINTED)
    assert (width, height) == tuple(browser.execute_script(
        "const p = document.getElementById('photo'); return [p.clientWidth, p.clientHeight]"))
    assert shade > 0 and edge > 0
    assert browser.find_element(By.ID, "explanation-title").text.startswith(f"{want[1]['id']}: score")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#captions li")) == 5

    # one level at a time: the higher layer, then none (the heat map stays, the arrows go)
    browser.find_element(By.CSS_SELECTOR, "#levels .chip[data-relation='1']").click()
    assert overlay.get_attribute("data-level") == explanation["relations"][1]["level"]
    browser.find_element(By.CSS_SELECTOR, "#levels .chip[data-relation='-1']").click()
    assert overlay.get_attribute("data-edges") == "0"
    width, height, shade, edge = browser.execute_script(PAINTED)
    assert shade > 0 and edge == 0

    # each region's strongest source instead of the strongest edges overall (python -m hsc_pyg.viz --rank per_node)
    browser.find_element(By.CSS_SELECTOR, "#levels .chip[data-relation='0']").click()
    browser.find_element(By.ID, "per-node").click()
    wait.until(lambda d: overlay.get_attribute("data-ranking") == "per_node")
    per_node = api(url, f"/api/explain?q={urllib.parse.quote_plus(QUERY)}&image={want[1]['id']}&rank=per_node")
    targets = [e["target"] for e in per_node["relations"][0]["edges"]]
    assert len(set(targets)) == len(targets) == int(overlay.get_attribute("data-edges"))
    assert overlay.get_attribute("data-level") == first["level"]          # the chosen layer is kept

    # another word: its own attention
    word = explanation["tokens"].index("cube")
    browser.find_element(By.CSS_SELECTOR, f"#tokens .chip[data-position='{word}']").click()
    assert overlay.get_attribute("data-token") == "cube"
    assert "'cube'" in browser.find_element(By.ID, "alignment").text
