"""A real browser on the real page: Debian's chromium, headless, driven through its chromedriver.

The test set-up installs chromium from the distribution's archive (scripts/install-chromium); no test
tool downloads a browser or a driver (Selenium gets explicit paths, and its Selenium Manager, which
could download, is made to fail if anything calls it). The browser is told to resolve no host but the
local one. Skips, with the reason, only when chromium cannot be installed.

The screenshot lands in test-output/browser/chat.png (git-ignored), or under $MM_TEST_OUTPUT.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.chat import AppConfig, ChatApp
from conftest import serve_app, REPO_ROOT, fixture_path
from experts import ExpertRunner
from multimodal.config import build_preset
from multimodal.generate import Engine
from multimodal.loading import load_model
from test_app import StubExpert
from tiny import write_official_adapter

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
OUTPUT = Path(os.environ.get("MM_TEST_OUTPUT", REPO_ROOT / "test-output")) / "browser"


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        try:
            run = subprocess.run([str(REPO_ROOT / "scripts" / "install-chromium")], capture_output=True, text=True,
                                 timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"chromium could not be installed: {e}")
        if run.returncode != 0:
            pytest.skip(f"chromium could not be installed: {(run.stderr or run.stdout).strip()[-500:]}")
    pytest.importorskip("selenium", reason="selenium is in requirements-test.txt")
    return CHROMIUM


class SlowEngine(Engine):
    """The tiny model answers in milliseconds; a pause per piece lets the browser see the stream."""

    def stream(self, *args, **kwargs) -> Iterator[str]:  # type: ignore[override]
        for piece in super().stream(*args, **kwargs):
            time.sleep(0.05)
            yield piece


@pytest.fixture(scope="module")
def page_url(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("browser") / "adapter.pth"
    write_official_adapter(path, build_preset("tiny"), seed=3)
    engine = SlowEngine(load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"],
                                   path, preset="tiny", device="cpu", dtype="float32", max_seq_len=1024))
    experts = [StubExpert("caption", "Caption: a red double-decker bus on a street"),
               StubExpert("ocr", '"LONDON"'), StubExpert("detection", "1 bus (centre), 4 people (left)")]
    app = ChatApp(engine, None, ExpertRunner(experts), AppConfig(default_max_new_tokens=40))
    with serve_app(app) as url:
        yield url


@pytest.fixture
def browser(chromium: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_downloads(*args: object, **kwargs: object) -> dict:
        raise AssertionError("Selenium Manager was asked for a browser or driver; nothing may be downloaded")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_downloads)
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1500", f"--user-data-dir={tmp_path / 'profile'}",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log")),
                              options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60.0, every: float = 0.05):
    """Poll until condition() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {condition.__doc__ or condition}")


def test_upload_ask_and_watch_the_answer_stream(browser, page_url: str) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    bus = fixture_path("images/bus.jpg")
    driver.get(page_url)
    find = driver.find_element
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    find(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(bus))

    def experts_ran() -> bool:
        """the expert panel filled for the upload"""
        return "[detection] 1 bus (centre)" in driver.execute_script(
            "return document.querySelector('#context textarea').value")

    wait_for(experts_ran)
    assert "Image: bus.jpg" in find(By.ID, "status").text

    question = "What is in this picture?"
    find(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    find(By.ID, "ask").click()

    def answer_text() -> str:
        """the bot's answer (read in one script call: Gradio re-renders the chat on every token)"""
        return driver.execute_script(
            "const b = document.querySelectorAll('#chat [data-testid=bot]');"
            "return b.length ? b[b.length - 1].innerText.trim() : '';")

    seen: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = answer_text()
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        if "tokens/s" in text:
            break
        time.sleep(0.03)
    final = seen[-1] if seen else ""
    assert "tokens/s" in final and "experts: caption, ocr, detection" in final, seen[-3:]
    partial = [s for s in seen if "tokens/s" not in s and s != "…"]
    assert len(partial) >= 3, f"the answer did not arrive in pieces: {seen}"  # streamed, not all at once
    assert question in find(By.ID, "chat").text
    assert "Context budget" in find(By.ID, "budget").text

    OUTPUT.mkdir(parents=True, exist_ok=True)
    shot = OUTPUT / "chat.png"
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print(f"\nscreenshot: {shot}")

    # Stop during a second answer: the stream ends early and the answer says it was stopped
    find(By.CSS_SELECTOR, "#question textarea").send_keys("Tell me more.")
    find(By.ID, "ask").click()
    wait_for(lambda: answer_text() not in ("", "…", final) and "tokens/s" not in answer_text())
    find(By.ID, "stop").click()
    stopped = wait_for(lambda: "tokens/s" in answer_text() and answer_text())
    assert "stopped" in stopped and int(re.search(r"(\d+) tokens ·", stopped).group(1)) < 40, stopped

    # An example image mid-conversation: the chat marks the change
    driver.execute_script("[...document.querySelectorAll('td, button')].find(e => e.innerText.trim() === "
                          "'What does the sign say?').click()")
    wait_for(lambda: "New image: street_sign.png (image 2)" in find(By.ID, "chat").text)
    assert driver.execute_script("return document.querySelector('#question textarea').value") == "What does the sign say?"

    find(By.ID, "clear").click()
    wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid=user]"))


# -- the page as a newcomer meets it (rejections keep the chat, uploads say what is current) -----------


def _text(driver, css: str) -> str:
    return driver.execute_script(f"const e = document.querySelector({css!r}); return e ? e.innerText : '';")


def _toasts(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('[data-testid=toast-body]')].map(t => t.innerText.trim());")


def _bot_messages(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#chat [data-testid=bot]')]"
                                 ".map(b => b.innerText.trim());")


def _set_question(driver, text: str) -> None:
    """Type into the question box as the page sees it (an input event), without 20,000 key presses."""
    driver.execute_script(
        "const t = document.querySelector('#question textarea'); t.value = arguments[0];"
        "t.dispatchEvent(new Event('input', {bubbles: true}));", text)


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(path))


def _ask(driver, question: str) -> str:
    """Ask and wait for the finished answer (its footer); returns the last bot message."""
    from selenium.webdriver.common.by import By

    wait_for(lambda: driver.execute_script("return !!document.querySelector('#question textarea')"))
    done_before = sum("tokens/s" in m or " token ·" in m for m in _bot_messages(driver))
    _set_question(driver, question)
    driver.find_element(By.ID, "ask").click()
    wait_for(lambda: sum("tokens/s" in m or " token ·" in m for m in _bot_messages(driver)) > done_before, timeout=90)
    return _bot_messages(driver)[-1]


def test_a_rejected_question_keeps_the_chat_and_says_why(browser, page_url: str) -> None:
    driver = browser
    driver.get(page_url)
    _upload(driver, fixture_path("images/bus.jpg"))
    wait_for(lambda: "Image: bus.jpg" in _text(driver, "#status"))
    first = _ask(driver, "What is in this picture?")
    budget = _text(driver, "#budget")
    assert "Context budget" in budget

    from selenium.webdriver.common.by import By

    long_question = "why?" * 5000  # 20,000 characters
    _set_question(driver, long_question)
    driver.find_element(By.ID, "ask").click()
    wait_for(lambda: "20000 characters long" in _text(driver, "#status"), timeout=30)
    wait_for(lambda: any("20000 characters long" in t for t in _toasts(driver)), timeout=30)
    time.sleep(1.0)  # the answering step that follows every click must not blank anything meanwhile
    assert "What is in this picture?" in _text(driver, "#chat") and _bot_messages(driver)[-1] == first
    assert driver.execute_script("return document.querySelector('#question textarea').value") == long_question
    assert "Context budget" in _text(driver, "#budget") and "20000 characters long" in _text(driver, "#status")

    _set_question(driver, "")
    driver.find_element(By.ID, "ask").click()
    wait_for(lambda: "Please type a question." in _text(driver, "#status"), timeout=30)
    time.sleep(1.0)
    assert _bot_messages(driver)[-1] == first
    OUTPUT.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(OUTPUT / "rejected_question.png"))


def test_a_rejected_upload_puts_the_current_image_back(browser, page_url: str, tmp_path: Path) -> None:
    from PIL import Image

    driver = browser
    driver.get(page_url)
    _upload(driver, fixture_path("images/bus.jpg"))
    wait_for(lambda: "Image: bus.jpg" in _text(driver, "#status"))
    shown = "return (document.querySelector('#image img') || {}).naturalWidth || 0;"
    wait_for(lambda: driver.execute_script(shown) == 810)

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(fixture_path("images/bus.jpg").read_bytes()[:5000])
    huge = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(huge)
    for bad, message in ((truncated, "Truncated File Read"), (huge, "12000x12000 pixels")):
        driver.execute_script("document.querySelectorAll('[data-testid=toast-close]').forEach(b => b.click())")
        wait_for(lambda: not _toasts(driver), timeout=10)
        _upload(driver, bad)
        wait_for(lambda: message in _text(driver, "#status"), timeout=60)
        wait_for(lambda: driver.execute_script(shown) == 810, timeout=30)  # the bus again, not the rejected file
        time.sleep(1.5)
        assert message in _text(driver, "#status")  # kept until the next action
        toasts = _toasts(driver)
        assert len(toasts) == 1 and toasts[0].count(message) == 1, toasts  # one warning per upload
    answer = _ask(driver, "What is it?")
    assert "experts: caption, ocr, detection" in answer  # answered about the bus, with its experts
    OUTPUT.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(OUTPUT / "rejected_upload.png"))


def test_no_image_and_image_markers_on_their_own_rows(browser, page_url: str) -> None:
    driver = browser
    driver.get(page_url)
    answer = _ask(driver, "What colour is the shape?")
    assert "no image" in answer
    assert "No image attached" in _text(driver, "#status")
    _upload(driver, fixture_path("images/zidane.jpg"))
    wait_for(lambda: any("New image: zidane.jpg" in m for m in _bot_messages(driver)))
    messages = _bot_messages(driver)
    marker = next(m for m in messages if "New image: zidane.jpg" in m)
    assert "tokens/s" not in marker and " token" not in marker  # its own row, not under the answer's footer
    assert messages[-2] == answer and messages[-1] == marker
    OUTPUT.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(OUTPUT / "markers.png"))


def test_narrow_screen_shows_the_upload_first_and_small_images_pixelated(browser, page_url: str) -> None:
    from app.page_examples import TOY_EXAMPLES

    driver = browser
    driver.set_window_size(420, 1200)
    driver.get(page_url)
    wait_for(lambda: driver.execute_script("return !!document.querySelector('#image')"))
    top = "return document.querySelector(arguments[0]).getBoundingClientRect().top;"
    assert driver.execute_script(top, "#image") < driver.execute_script(top, "#chat")
    _upload(driver, TOY_EXAMPLES[0].path)
    wait_for(lambda: driver.execute_script(
        "const i = document.querySelector('#image img'); return i && i.naturalWidth === 64 && i.classList.contains('small-image');"))
    width, rendering = driver.execute_script(
        "const i = document.querySelector('#image img'); return [i.getBoundingClientRect().width, getComputedStyle(i).imageRendering];")
    assert width >= 256 and rendering == "pixelated"
    OUTPUT.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(OUTPUT / "narrow.png"))
