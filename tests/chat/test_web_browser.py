"""The web pages in a real browser: Debian's chromium driven by selenium through chromium-driver, headless, at a
phone-sized viewport. The test chats, watches the reply stream in, clicks thumbs-down and finds the vote in the store;
then opens the character's version page. It saves a screenshot of each page in docs/screenshots/."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from chat_service.config import Settings
from chat_service.store import NewMessage, Store
from devkit.paths import DOCS
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

SCREENSHOTS = DOCS / "screenshots"
SERVING = "20261126T030000Z"
EARLIER = "20261026T030000Z"
# Every flag keeps the browser from reaching outside (no network here) and from state outside its profile.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True}
# Counts the distinct texts the reply shows while it streams (set before sending).
WATCH_REPLY = """
window.replyTexts = new Set();
new MutationObserver(() => {
  const reply = document.querySelector('.turn.assistant .text');
  if (reply && reply.textContent) window.replyTexts.add(reply.textContent);
}).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
"""


def browser_binaries() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver_path = browser_binaries()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=driver_path))
    # A phone's viewport (headless windows cannot be made that narrow).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def service(make_settings: Callable[..., Settings], adapters_root: Path, adapter_template: Path, kit) -> Iterator[
        tuple[str, Settings]]:  # fmt: skip
    kit.mount_trained_adapter(adapter_template, adapters_root, "lumina")
    settings = make_settings()
    with kit.serve(settings) as base:
        yield base, settings


def rated_earlier_replies(database_url: str) -> None:
    """Rated replies of an earlier version (and of base), as a store that served them holds them."""
    store = Store(database_url)
    for version, ratings in ((EARLIER, ["up", "down", "down", "up"]), ("base", ["down", "down", "up"])):
        for rating in ratings:
            (reply,) = store.add_messages([NewMessage("lumina", "s-old", "assistant", "…", adapter_version=version)])
            store.set_feedback(reply.id, rating)
    store.close()


def chat_and_thumbs_down(browser: webdriver.Chrome, base: str) -> int:
    wait = WebDriverWait(browser, 120)
    browser.get(f"{base}/ui/")
    wait.until(lambda b: len(Select(b.find_element(By.ID, "character")).options) == 2)
    Select(browser.find_element(By.ID, "character")).select_by_value("lumina")
    assert browser.find_element(By.ID, "serving-version").text == SERVING
    browser.execute_script(WATCH_REPLY)
    browser.find_element(By.ID, "message").send_keys("こんにちは")
    browser.find_element(By.ID, "send").click()
    reply = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".turn.assistant .text[aria-busy='false']"))
    assert reply.get_attribute("aria-live") == "polite"
    assert reply.text.strip(), "the reply is empty"
    seen = browser.execute_script("return Array.from(window.replyTexts)")
    assert len(seen) >= 2, f"the reply did not stream in (texts seen: {seen})"
    turn = browser.find_element(By.CSS_SELECTOR, ".turn.assistant")
    assert turn.find_element(By.CSS_SELECTOR, ".version").text == f"adapter {SERVING}"
    SCREENSHOTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "chat.png"))
    turn.find_element(By.CSS_SELECTOR, "button[data-rating='down']").click()
    wait.until(lambda b: turn.find_element(By.CSS_SELECTOR, ".thumbs").get_attribute("data-stored") == "down")
    assert turn.find_element(By.CSS_SELECTOR, "button[data-rating='down']").get_attribute("aria-pressed") == "true"
    return int(turn.get_attribute("data-message-id"))


def test_chat_page_streams_and_stores_a_thumbs_down(browser: webdriver.Chrome, service, kit) -> None:
    base, settings = service
    rated_earlier_replies(settings.database_url)
    message_id = chat_and_thumbs_down(browser, base)

    page = httpx.get(f"{base}/v1/history", params={"character": "lumina"}, headers=kit.auth).json()["messages"]
    (stored,) = [m for m in page if m["id"] == message_id]
    assert (stored["role"], stored["feedback"]) == ("assistant", "down")
    store = Store(settings.database_url)
    counts = {c.version: (c.up, c.down) for c in store.feedback_by_version("lumina")}
    store.close()
    assert counts == {"base": (1, 2), EARLIER: (2, 2), SERVING: (0, 1)}

    browser.find_element(By.ID, "character-link").click()
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    assert browser.find_element(By.ID, "serving-version").text == SERVING
    feedback_bars = browser.find_elements(By.CSS_SELECTOR, "#feedback-chart svg rect")
    assert len(feedback_bars) == 3  # base, the earlier version, the serving one
    rows = [r.text.split() for r in browser.find_elements(By.CSS_SELECTOR, "#feedback-table tbody tr")]
    assert rows == [["base", "1", "2", "67%"], [EARLIER, "2", "2", "50%"], [SERVING, "0", "1", "100%"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#eval-chart svg rect")) == 3  # base, replaced, serving
    assert "2.200" in browser.find_element(By.ID, "eval-chart").text
    browser.save_screenshot(str(SCREENSHOTS / "character.png"))


def test_pages_are_accessible_and_self_contained(browser: webdriver.Chrome, service) -> None:
    base, _ = service
    for page in ("index.html", "character.html?name=lumina"):
        browser.get(f"{base}/ui/{page}")
        WebDriverWait(browser, 60).until(lambda b: b.execute_script("return document.readyState") == "complete")
        assert browser.execute_script("return document.documentElement.lang") == "ja"
        for button in browser.find_elements(By.TAG_NAME, "button"):
            name = button.get_attribute("aria-label") or button.get_attribute("textContent")
            assert name.strip(), button.get_attribute("outerHTML")
        for control in browser.find_elements(By.CSS_SELECTOR, "select, textarea, input"):
            labels = browser.find_elements(By.CSS_SELECTOR, f"label[for='{control.get_attribute('id')}']")
            assert labels, control.get_attribute("outerHTML")
        # Air-gapped: every script, stylesheet and image comes from this service.
        sources = browser.execute_script(
            "return [...document.querySelectorAll('script[src], link[href], img[src]')].map(e => e.src || e.href)"
        )
        assert sources and all(s.startswith(base) for s in sources), sources
        assert browser.execute_script("return innerWidth") == PHONE["width"]
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways
