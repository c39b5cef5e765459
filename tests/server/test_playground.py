"""The playground page at `/`, in a real browser: headless Chromium (Debian's package, which `make test` installs)
driven over the DevTools protocol."""

import itertools
import json
import re
import shutil
import subprocess
import time

import httpx
import pytest


class Browser:
    """A headless Chromium on one page, and Runtime.evaluate on it."""

    def __init__(self, url: str, profile) -> None:
        from websockets.sync.client import connect

        chromium = shutil.which("chromium")
        if chromium is None:
            pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")
        self.process = subprocess.Popen(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--mute-audio",
             "--autoplay-policy=no-user-gesture-required", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        for line in self.process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if match := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(match.group(1))
                break
        assert port is not None, "chromium did not start its DevTools endpoint"
        deadline = time.monotonic() + 30
        while True:
            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json", timeout=5).json() if t["type"] == "page"]
            if pages and pages[0]["url"].startswith(url) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.cdp = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self.ids = itertools.count(1)

    def evaluate(self, expression: str):
        request_id = next(self.ids)
        self.cdp.send(json.dumps({"id": request_id, "method": "Runtime.evaluate", "params": {
            "expression": expression, "awaitPromise": True, "returnByValue": True}}))
        while True:
            message = json.loads(self.cdp.recv(timeout=30))
            if message.get("id") == request_id:
                result = message["result"]
                assert "exceptionDetails" not in result, result
                return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # the page may still be loading: its elements missing
            if value := self.evaluate(f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"):
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)

    def close(self) -> None:
        self.cdp.close()
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def browser(server, tmp_path):
    page = Browser(f"{server.url}/", tmp_path)
    yield page
    page.close()


def test_the_page_is_served_whole_by_the_server_itself(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script>" in page.text and not re.search(r"""src=["']https?://""", page.text), "nothing from a CDN"


def test_the_playground_plays_the_audio_as_it_arrives_and_shows_ttfa(browser):
    assert browser.wait_for("document.getElementById('voice').options.length") == 8  # Orpheus's voices
    assert "random weights" in browser.evaluate("document.getElementById('model-info').textContent")
    browser.evaluate("document.getElementById('text').value = 'A real browser hears this.';"
                     "document.getElementById('speak').click(); true")
    stats = json.loads(browser.wait_for(
        "window.playground.stats.done || window.playground.stats.error ? JSON.stringify(window.playground.stats) : ''"))
    assert stats["error"] is None and stats["ttfaMs"] > 0 and stats["receivedS"] > 0.3, stats
    assert stats["scheduledSamples"] == round(stats["receivedS"] * 24000)
    played = browser.wait_for("window.playground.stats.playedSamples", timeout_s=30)  # the AudioContext played them
    assert played > 0
    assert re.fullmatch(r"\d+ ms", browser.evaluate("document.getElementById('ttfa').textContent"))
    assert re.fullmatch(r"\d+", browser.evaluate("document.getElementById('late').textContent"))
    assert re.fullmatch(r"[\d.]+×", browser.evaluate("document.getElementById('rt').textContent"))
