"""Drive `mmdit serve`'s web page in headless Chromium over the DevTools protocol, as a user would:
type a prompt and the settings, click Generate, watch the progress bar, wait for the image in the
gallery, take a screenshot. Prints one JSON line: the progress values seen, the final state, the
gallery's image urls and captions. Used by tests/serve.rs; also makes docs/serve-page.png:

  python3 scripts/page_check.py http://127.0.0.1:8080 out.png [--key KEY] [--prompt P] [--steps N]
      [--size WxH] [--seed S]

Needs Debian's `chromium` and the `websocket-client` package (scripts/requirements-ci.txt).
"""
import argparse
import base64
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket


class Page:
    """One page target, spoken to over its DevTools websocket."""

    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=30)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expr):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def type_into(self, element_id, text):
        """Focus a field, select what it holds and type `text` over it (real input events)."""
        self.eval(f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); e.focus(); e.select(); }})()")
        self.call("Input.insertText", text=text)

    def click(self, element_id):
        """A mouse click at the middle of an element."""
        box = self.eval(
            f"(() => {{ const r = document.getElementById({json.dumps(element_id)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def wait(what, check, seconds, every=0.05):
    t0 = time.time()
    while time.time() - t0 < seconds:
        v = check()
        if v:
            return v
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {seconds} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("screenshot")
    ap.add_argument("--key", default="")
    ap.add_argument("--prompt", default="a red circle on a white background")
    ap.add_argument("--steps", default="20")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--seed", default="5")
    a = ap.parse_args()
    width, height = a.size.split("x")
    profile = tempfile.mkdtemp(prefix="mmdit-chromium-")
    page_url = a.url + "/" + (f"#key={a.key}" if a.key else "")
    browser = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--window-size=1100,800", page_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = None
        t0 = time.time()
        while port is None and time.time() - t0 < 60:
            line = browser.stderr.readline()
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        if port is None:
            raise TimeoutError("chromium did not start its DevTools server")
        targets = wait(
            "the page target",
            lambda: [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
                     if t["type"] == "page" and t["url"].startswith(a.url)],
            30, 0.1,
        )
        page = Page(targets[0]["webSocketDebuggerUrl"])
        wait("the page and the model's name", lambda: page.eval(
            "(() => { const m = document.getElementById('model');"
            " return document.readyState === 'complete' && !!m && m.textContent !== 'loading...'; })()"), 30)
        page.type_into("prompt", a.prompt)
        page.type_into("width", width)
        page.type_into("height", height)
        page.type_into("steps", a.steps)
        page.type_into("seed", a.seed)
        page.click("go")
        seen = []
        def progressed():
            v = page.eval("[document.getElementById('bar').value, document.getElementById('bar').max,"
                          " document.querySelectorAll('img.result').length, document.getElementById('error').textContent]")
            if not seen or seen[-1] != v[0]:
                seen.append(v[0])
            if v[3]:
                raise RuntimeError("the page shows an error: " + v[3])
            return v[2] > 0
        wait("the image in the gallery", progressed, 120)
        state = page.eval("""({
            state: document.getElementById('state').textContent,
            preview: document.getElementById('preview').src.startsWith('data:image/png'),
            results: [...document.querySelectorAll('img.result')].map((i) => i.src),
            captions: [...document.querySelectorAll('figcaption')].map((c) => c.textContent),
        })""")
        wait("the image to load", lambda: page.eval("document.querySelector('img.result').complete"), 30)
        shot = page.call("Page.captureScreenshot", format="png")
        with open(a.screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        state["progress_seen"] = seen
        print(json.dumps(state))
    finally:
        browser.kill()
        browser.wait()


if __name__ == "__main__":
    sys.exit(main())
