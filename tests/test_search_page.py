"""The search page in a real headless Chromium: type a query, see image/audio/video result elements, filter by modality."""
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from ace.config import ServeConfig
from ace.serving.server import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ may or may not be a package
from serving_support import TokenOverlapRetriever, media_corpus, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("Chromium and chromedriver are absent: apt-get install -y chromium chromium-driver",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402  (a test extra: pip install -e '.[test]')
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="ace-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        opts.add_argument(flag)
    # an explicit driver path: selenium-manager never looks anything up online
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    root, items, _ = media_corpus(tmp_path_factory.mktemp("page"))
    retriever = TokenOverlapRetriever(items, root=root)
    app = create_app(retriever, ServeConfig(max_wait_ms=1.0))
    with running_server(app) as url:
        yield url, retriever


def _search(driver, url, query):
    driver.get(url + "/")
    box = WebDriverWait(driver, 20).until(EC.presence_of_element_located((By.ID, "query")))
    box.clear()
    box.send_keys(query + Keys.ENTER)
    WebDriverWait(driver, 20).until(lambda d: "result(s)" in d.find_element(By.ID, "status").text
                                    or "Error" in d.find_element(By.ID, "status").text)
    return driver.find_elements(By.CSS_SELECTOR, "#results article.result")


def test_typed_query_shows_media_results(browser, page_url):
    url, retriever = page_url
    query = "a red square, a dog barks, a man surfs"
    cards = _search(browser, url, query)
    assert browser.find_element(By.ID, "status").text.startswith("10 result(s)")
    expected = [h.item_id for h in retriever.search([query], k=10)[0]]
    assert [c.get_attribute("data-item-id") for c in cards] == expected
    assert "score" in cards[0].text and "identifier" in cards[0].text
    img = browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="img/red"] img')
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 8  # the PNG streamed from /media
    audio = browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="aud/bark"] audio')
    assert audio.get_attribute("src").endswith("/media/aud%2Fbark")
    video = browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="vid/surf"] video')
    assert video.get_attribute("src").endswith("/media/vid%2Fsurf")
    assert "a dog barks twice" in browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="aud/bark"]').text


def test_modality_filter(browser, page_url):
    _search(browser, page_url[0], "square")
    Select(browser.find_element(By.ID, "modality")).select_by_value("audio")
    WebDriverWait(browser, 20).until(
        lambda d: all(c.get_attribute("class") == "result result-audio"
                      for c in d.find_elements(By.CSS_SELECTOR, "#results article.result")))
    cards = browser.find_elements(By.CSS_SELECTOR, "#results article.result")
    assert [c.get_attribute("data-item-id") for c in cards] == ["aud/bark"]
    assert cards[0].find_element(By.TAG_NAME, "audio")


def test_error_is_shown(browser, page_url):
    _search(browser, page_url[0], "BOOM")
    status = browser.find_element(By.ID, "status")
    assert "Error 400" in status.text and "search rejected" in status.text
    assert "error" in status.get_attribute("class")
