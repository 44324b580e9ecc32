"""Open a page in real headless Chromium over the DevTools protocol (``--remote-debugging-pipe``).

Only what the report test needs: load a file at a given viewport width, list the requests *the
page* made (the browser's own background traffic is on other targets and is ignored), read the
decoded size of every image, the page's scroll width and the boxes of chosen elements, and take
a full-page screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageResult:
    requests: list[str]  # URLs the page requested, in order
    images: list[dict]  # id, natural and rendered size and position of every <img>
    screenshot: bytes  # PNG of the whole page at device scale 1
    scroll_width: int  # the document's width: more than the viewport means sideways scrolling
    boxes: dict[str, dict]  # element id -> x, y, width, height, text (absent ids left out)


class _Pipe:
    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds() -> None:  # Chromium reads commands on fd 3 and answers on fd 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=wire_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self.messages: queue.Queue[dict] = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_browser, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self.messages.put(json.loads(message))

    def send(
        self,
        method: str,
        params: dict | None = None,
        *,
        session: str | None = None,
        timeout: float = 60,
    ) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next_message(method, deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, name: str, session: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == name and event.get("sessionId") == session:
                    return event
            self.events.append(self._next_message(name, deadline))

    def _next_message(self, waiting_for: str, deadline: float) -> dict:
        # Wait in short slices so that a browser that died is reported at once, by its exit code,
        # rather than as a bare queue timeout.
        while True:
            with contextlib.suppress(queue.Empty):
                return self.messages.get(timeout=min(max(deadline - time.monotonic(), 0.01), 1))
            if self.proc.poll() is not None and self.messages.empty():
                raise RuntimeError(f"Chromium exited ({self.proc.returncode}) before {waiting_for}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Chromium did not answer {waiting_for} in time")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)


IMAGES_JS = """JSON.stringify([...document.images].map(i => {
  const r = i.getBoundingClientRect();
  return {id: i.id, complete: i.complete, natural_width: i.naturalWidth,
          natural_height: i.naturalHeight, x: r.left + window.scrollX, y: r.top + window.scrollY,
          width: r.width, height: r.height};
}))"""


BOXES_JS = """JSON.stringify(Object.fromEntries(%s.map(id => [id, document.getElementById(id)])
  .filter(([id, el]) => el).map(([id, el]) => {
    const r = el.getBoundingClientRect();
    return [id, {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width,
                 height: r.height, text: el.innerText}];
  })))"""


def _evaluate(pipe: _Pipe, session: str, expression: str):
    reply = pipe.send(
        "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
    )
    return json.loads(reply["result"]["value"])


def open_page(
    binary: str,
    page: Path,
    profile: Path,
    *,
    width: int = 1200,
    element_ids: tuple[str, ...] = (),
) -> PageResult:
    """Load ``page`` in a fresh headless Chromium ``width`` CSS pixels wide and return what it
    requested and rendered."""
    pipe = _Pipe(binary, profile)
    try:
        # The first answer waits for the browser to start, which takes long on a loaded machine
        # (a CI run with every core busy took over 20 s).
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=120)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Network.enable", "Page.enable"):
            pipe.send(domain, session=session)
        pipe.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired", session)
        images = _evaluate(pipe, session, IMAGES_JS)
        boxes = _evaluate(pipe, session, BOXES_JS % json.dumps(list(element_ids)))
        scroll_width = _evaluate(
            pipe, session, "JSON.stringify(document.documentElement.scrollWidth)"
        )
        size = pipe.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = pipe.send(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1},
            },
            session=session,
            timeout=30,
        )
        requests = [
            e["params"]["request"]["url"]
            for e in pipe.events
            if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session
        ]
        return PageResult(
            requests=requests,
            images=images,
            screenshot=base64.b64decode(shot["data"]),
            scroll_width=int(scroll_width),
            boxes=boxes,
        )
    finally:
        pipe.close()
