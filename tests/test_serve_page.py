"""The chat page at / in headless Chromium: type a message, press Enter, read the streamed reply.

Chromium is driven through its DevTools protocol over --remote-debugging-pipe (fd 3 in, fd 4 out,
NUL-separated JSON), so no driver or websocket package is needed."""
import json
import os
import shutil
import subprocess
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="nanokimi serve needs the serve extra")

from nanokimi.serve.app import ServeOptions, Server, create_app  # noqa: E402
from nanokimi.serve.run import BackgroundServer  # noqa: E402
from serve_util import make_checkpoint  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--remote-debugging-pipe"]


class DevTools:
    """A minimal Chrome DevTools Protocol client over the two pipes."""

    def __init__(self, url: str, profile: str):
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}', CHROMIUM, *FLAGS,
             f"--user-data-dir={profile}", url],
            pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.buffer, self.next_id = b"", 0

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        raise TimeoutError(method)

    def evaluate(self, session: str, expression: str):
        result = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_chat_page_streams_a_reply_in_headless_chromium(tmp_path):
    server = Server.load(str(make_checkpoint(tmp_path)), ServeOptions(device="cpu", max_cache_tokens=2048))
    with BackgroundServer(create_app(server)) as bg:
        browser = DevTools(bg.url + "/", str(tmp_path / "profile"))
        try:
            target = next(t for t in browser.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            session = browser.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
            deadline = time.monotonic() + 30
            while browser.evaluate(session, "document.readyState + !!document.getElementById('input')") != \
                    "completetrue":
                assert time.monotonic() < deadline, "the page did not load"
                time.sleep(0.1)
            browser.evaluate(session, "document.getElementById('temperature').value = '0';"
                                      "document.getElementById('max-tokens').value = '24';"
                                      "document.getElementById('input').focus()")
            browser.call("Input.insertText", session, text="Hello, who are you?")
            for kind in ("keyDown", "keyUp"):
                browser.call("Input.dispatchKeyEvent", session, type=kind, key="Enter", code="Enter",
                             windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)
            seen, deadline = [], time.monotonic() + 60
            while True:
                state = browser.evaluate(session, "JSON.stringify([...document.querySelectorAll('.msg')].map("
                                                  "m => [m.className, m.textContent, m.dataset.done || '']))")
                bubbles = json.loads(state)
                if len(bubbles) == 2:
                    seen.append(bubbles[1][1])
                    if bubbles[1][2] == "1":
                        break
                assert time.monotonic() < deadline, f"no finished reply: {bubbles}"
                time.sleep(0.02)
            finish = browser.evaluate(session, "document.querySelector('.assistant').dataset.finishReason")
        finally:
            browser.close()
        expected = httpx.post(bg.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hello, who are you?"}], "max_tokens": 24,
            "temperature": 0}).json()["choices"][0]
    assert bubbles[0] == ["msg user", "Hello, who are you?", ""]
    assert bubbles[1][0] == "msg assistant", bubbles  # not an error bubble
    assert bubbles[1][1] == expected["message"]["content"] and finish == expected["finish_reason"]
    assert all(expected["message"]["content"].startswith(s) for s in seen)  # the text only ever grew
