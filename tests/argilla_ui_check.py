"""Headless-browser check of the Argilla web UI (run by tests/test_label_argilla.py with the server venv's
Python, which has `websockets`): sign in through the form as a person would, open a dataset's
annotation page, wait until it shows every EXPECTED_TEXT (the record and the dataset's name render
separately), print what the page shows as JSON and save a screenshot.

    python argilla_ui_check.py URL USERNAME PASSWORD DATASET_ID SCREENSHOT.png EXPECTED_TEXT...

Drives Debian's chromium over the Chrome DevTools Protocol; no other browser tooling is needed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Page:
    def __init__(self, connection):
        self.connection = connection
        self.next_id = 0

    async def send(self, method: str, **params):
        self.next_id += 1
        message_id = self.next_id
        await self.connection.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.connection.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise TimeoutError(f"timed out waiting for {expression}")


SET_INPUT = """(() => {{
  const el = document.querySelector('input[name="{name}"]');
  el.value = {value};
  el.dispatchEvent(new Event('input', {{bubbles: true}}));
  return true;
}})()"""


async def check(url: str, username: str, password: str, dataset_id: str, screenshot: str, *expected: str) -> dict:
    port = free_port()
    profile = tempfile.mkdtemp(prefix="argilla-ui-")
    browser = subprocess.Popen(
        [shutil.which("chromium") or "chromium", "--headless=new", "--no-sandbox", "--disable-gpu",
         "--disable-dev-shm-usage", f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
         "--window-size=1400,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.2)
        async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as connection:
            page = Page(connection)
            await page.send("Page.enable")
            await page.send("Page.navigate", url=f"{url}/sign-in")
            await page.wait_for("!!document.querySelector('input[name=\"Password\"]')")
            await page.evaluate(SET_INPUT.format(name="Username", value=json.dumps(username)))
            await page.evaluate(SET_INPUT.format(name="Password", value=json.dumps(password)))
            await page.wait_for("!document.querySelector('button[type=submit]').disabled")
            await page.evaluate("document.querySelector('button[type=submit]').click(), true")
            await page.wait_for("!location.pathname.startsWith('/sign-in')")
            await page.send("Page.navigate", url=f"{url}/dataset/{dataset_id}/annotation-mode")
            shows_all = " && ".join(f"document.body.innerText.includes({json.dumps(item)})" for item in expected)
            text = await page.wait_for(f"{shows_all} && document.body.innerText", timeout=90)
            shot = await page.send("Page.captureScreenshot", format="png")
            with open(screenshot, "wb") as handle:
                handle.write(base64.b64decode(shot["data"]))
            return {"path": await page.evaluate("location.pathname"), "text": text}
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=10)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(check(*sys.argv[1:]))))
