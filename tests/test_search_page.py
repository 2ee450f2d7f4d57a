"""The search page in a real headless Chromium: typed queries and ?q= links, back/forward, media cards with
video posters, the empty / no-result / error states, and keyboard use."""
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ace.config import ServeConfig
from ace.data.corpus import CorpusItem
from ace.serving.server import create_app

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ may or may not be a package
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "data"))
from page_screenshot import MEDIA_SETTLED_JS, chromium_driver, chromium_paths  # noqa: E402
from serving_support import TokenOverlapRetriever, media_corpus, running_server  # noqa: E402

if None in chromium_paths():
    pytest.skip("Chromium and chromedriver are absent: apt-get install -y chromium chromium-driver",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402  (a test extra: pip install -e '.[test]')
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    with chromium_driver() as driver:
        yield driver


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from make_demo import render_video_frames, write_video

    root, items, _ = media_corpus(tmp_path_factory.mktemp("page"))
    frames = render_video_frames({"colour": "red", "shape": "star", "direction": "up", "speed": "fast",
                                  "background": "light"}, 64, 8, np.random.default_rng(0))
    write_video(root / "vid" / "star.mp4", frames)  # a real H.264 clip, as the demo writes them
    items.append(CorpusItem("vid/star", "video", media="vid/star.mp4", captions=["a red star flies up"]))
    retriever = TokenOverlapRetriever(items, root=root)
    app = create_app(retriever, ServeConfig(max_wait_ms=1.0))
    with running_server(app) as url:
        yield url, retriever


def wait_done(driver):
    """Until the search has answered: results, no results, or the error panel."""
    WebDriverWait(driver, 20).until(
        lambda d: d.find_element(By.ID, "status").text.endswith(" ms") or d.find_element(By.ID, "status").text == "0 results"
        or d.find_element(By.ID, "error-state").is_displayed())


def ids(driver):
    """Item ids of the result cards, read in one script call (the cards may be replaced meanwhile)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results article.result')).map(c => c.dataset.itemId)")


def type_query(driver, query):
    box = WebDriverWait(driver, 20).until(EC.presence_of_element_located((By.ID, "query")))
    box.clear()
    box.send_keys(query + Keys.ENTER)
    wait_done(driver)


def query_string(driver):
    return driver.execute_script("return window.location.search")


def test_empty_state_before_any_search(browser, page_url):
    browser.get(page_url[0] + "/")
    assert browser.find_element(By.ID, "empty-state").is_displayed()
    assert not browser.find_element(By.ID, "error-state").is_displayed()
    WebDriverWait(browser, 10).until(lambda d: "searches 11 items" in d.find_element(By.ID, "item-count").text)
    assert ids(browser) == []


def test_typed_query_shows_media_results_and_goes_in_the_address(browser, page_url):
    url, retriever = page_url
    browser.get(url + "/")
    query = "a red square, a dog barks, a man surfs"
    type_query(browser, query)
    assert browser.find_element(By.ID, "status").text.startswith("10 result(s)")
    assert ids(browser) == [h.item_id for h in retriever.search([query], k=10)[0]]
    assert query_string(browser) == "?q=a+red+square%2C+a+dog+barks%2C+a+man+surfs"
    assert browser.title.startswith(query)
    assert not browser.find_element(By.ID, "empty-state").is_displayed()
    cards = browser.find_elements(By.CSS_SELECTOR, "#results article.result")
    assert "score" in cards[0].text and "identifier" in cards[0].text
    img = browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="img/red"] img')
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    assert browser.execute_script("return arguments[0].naturalWidth", img) == 8  # the PNG streamed from /media
    audio = browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="aud/bark"] audio')
    assert audio.get_attribute("src").endswith("/media/aud%2Fbark")
    video = browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="vid/surf"] video')
    assert video.get_attribute("src").endswith("/media/vid%2Fsurf")
    assert "a dog barks twice" in browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="aud/bark"]').text


def test_q_link_fills_the_form_and_searches(browser, page_url):
    url, retriever = page_url
    browser.get(url + "/?q=red+square&modality=image&k=2")
    wait_done(browser)
    assert browser.find_element(By.ID, "query").get_attribute("value") == "red square"
    assert Select(browser.find_element(By.ID, "modality")).first_selected_option.get_attribute("value") == "image"
    assert browser.find_element(By.ID, "k").get_attribute("value") == "2"
    assert ids(browser) == [h.item_id for h in retriever.search(["red square"], k=2, modality="image")[0]]
    assert len(ids(browser)) == 2


def test_back_and_forward_replay_earlier_searches(browser, page_url):
    url, retriever = page_url
    browser.get(url + "/")
    type_query(browser, "red square")
    first = ids(browser)
    type_query(browser, "a dog barks")
    second = ids(browser)
    assert first != second and second[0] == "aud/bark"
    Select(browser.find_element(By.ID, "modality")).select_by_value("audio")  # the filter is part of the address too
    WebDriverWait(browser, 20).until(lambda d: query_string(d) == "?q=a+dog+barks&modality=audio")
    WebDriverWait(browser, 20).until(lambda d: ids(d) == ["aud/bark"])
    browser.back()
    WebDriverWait(browser, 20).until(lambda d: query_string(d) == "?q=a+dog+barks" and ids(d) == second)
    browser.back()
    WebDriverWait(browser, 20).until(lambda d: query_string(d) == "?q=red+square" and ids(d) == first)
    assert browser.find_element(By.ID, "query").get_attribute("value") == "red square"
    browser.back()  # the page before any search: the empty state again
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "empty-state").is_displayed())
    assert ids(browser) == [] and browser.find_element(By.ID, "query").get_attribute("value") == ""
    browser.forward()
    WebDriverWait(browser, 20).until(lambda d: query_string(d) == "?q=red+square" and ids(d) == first)


def test_video_cards_have_a_poster_frame(browser, page_url):
    url, _ = page_url
    browser.get(url + "/?q=red+star+flies+up+surfs&modality=video")
    wait_done(browser)
    assert ids(browser)[0] == "vid/star"
    star = browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="vid/star"] video')
    assert star.get_attribute("poster").endswith("/poster/vid%2Fstar")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(MEDIA_SETTLED_JS))
    widths = browser.execute_script("return window.__posters")
    assert widths[star.get_attribute("poster")] == 64  # a decoded 64x64 frame of the clip, as JPEG
    # the placeholder clip cannot be decoded: no poster image, and the card says why the video does not play
    assert widths[browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="vid/surf"] video').get_attribute("poster")] == 0
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, 'article[data-item-id="vid/surf"] .unplayable'))
    assert "cannot play" in browser.find_element(By.CSS_SELECTOR, 'article[data-item-id="vid/surf"] .unplayable').text
    # the star clip itself plays in Chromium (H.264)
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "const v = arguments[0]; v.preload = 'auto'; v.load(); return true", star))
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return arguments[0].readyState >= 2 && arguments[0].videoWidth", star))


def test_poster_endpoint_errors(page_url):
    url, _ = page_url
    with urllib.request.urlopen(url + "/poster/vid%2Fstar") as r:
        assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"
    for item, code, text in [("img%2Fred", 404, "not a video"), ("nope", 404, "unknown item"),
                             ("vid%2Fsurf", 422, "no poster: cannot decode video")]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + "/poster/" + item)
        assert err.value.code == code and text in err.value.read().decode()


def test_modality_filter(browser, page_url):
    browser.get(page_url[0] + "/")
    type_query(browser, "square")
    Select(browser.find_element(By.ID, "modality")).select_by_value("audio")
    WebDriverWait(browser, 20).until(lambda d: ids(d) == ["aud/bark"])
    assert query_string(browser) == "?q=square&modality=audio"
    card = browser.find_element(By.CSS_SELECTOR, "#results article.result")
    assert card.get_attribute("class") == "result result-audio" and card.find_element(By.TAG_NAME, "audio")


def test_error_state_a_person_understands(browser, page_url):
    browser.get(page_url[0] + "/")
    type_query(browser, "BOOM")
    panel = browser.find_element(By.ID, "error-state")
    assert panel.is_displayed() and panel.get_attribute("role") == "alert"
    assert browser.find_element(By.ID, "error-title").text == "The server could not use this search"
    text = browser.find_element(By.ID, "error-text").text
    assert "search rejected: query rejected by the retriever: 'BOOM'" in text and "change the query" in text
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    assert ids(browser) == []
    # a new search clears the error
    type_query(browser, "red square")
    assert not panel.is_displayed() and ids(browser)


def test_bad_link_is_explained(browser, page_url):
    browser.get(page_url[0] + "/?q=red&k=500")
    assert browser.find_element(By.ID, "error-title").text == "This link cannot be searched"
    assert "k must be a whole number from 1 to 100" in browser.find_element(By.ID, "error-text").text
    browser.get(page_url[0] + "/?q=red&modality=smell")
    assert 'modality "smell"' in browser.find_element(By.ID, "error-text").text


def test_unreachable_server_is_explained(browser, page_url):
    browser.get(page_url[0] + "/")
    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))")
    type_query(browser, "red square")
    assert browser.find_element(By.ID, "error-title").text == "Cannot reach the search server"
    assert "serve.py" in browser.find_element(By.ID, "error-text").text


def test_no_results_state(browser, page_url):
    browser.get(page_url[0] + "/")
    # the token-overlap fake ranks every item whatever the query: make the server's answer empty
    browser.execute_script("""const real = window.fetch;
      window.fetch = (u, o) => real(u, o).then(r => r.json().then(d => new Response(JSON.stringify(Object.assign(d, {results: []})),
        {status: 200, headers: {'Content-Type': 'application/json'}})));""")
    type_query(browser, "nothing at all")
    assert browser.find_element(By.CSS_SELECTOR, "#results .no-results").text.startswith("Nothing found for “nothing at all”")


def test_keyboard(browser, page_url):
    browser.get(page_url[0] + "/")
    body = browser.find_element(By.TAG_NAME, "body")
    browser.execute_script("document.activeElement.blur()")
    body.send_keys("/")
    assert browser.switch_to.active_element.get_attribute("id") == "query"
    browser.switch_to.active_element.send_keys("red square" + Keys.ENTER)
    wait_done(browser)
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    active = browser.switch_to.active_element
    assert active.get_attribute("data-item-id") == ids(browser)[0]
    active.send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element.get_attribute("data-item-id") == ids(browser)[1]
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert browser.switch_to.active_element.get_attribute("id") == "query"
