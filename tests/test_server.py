"""The browser view: HTTP endpoints, loopback by default, clean shutdown, and the page in headless
Chromium really showing moving frames (driven over the DevTools protocol on a pipe)."""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from runtime.server import BOUNDARY, FrameServer, ServerError
from runtime.sinks import SinkError, parse_host_port


def _wait_threads(baseline, timeout=5.0):
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    return threading.active_count()


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def _frame(i):
    img = np.full((90, 160, 3), (i * 9) % 256, np.uint8)
    cv2.putText(img, str(i), (10, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (0, 0, 255), 3)
    return img


def test_endpoints():
    baseline = threading.active_count()
    with FrameServer("127.0.0.1", 0) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        status, ctype, body = _get(srv.url)
        assert status == 200 and ctype.startswith("text/html") and b'src="/stream.mjpg"' in body
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(srv.url + "frame.jpg")
        assert e.value.code == 503
        srv.publish(_frame(1))
        srv.publish_stats({"pipeline_fps": 12.5, "stages": {}})
        status, ctype, body = _get(srv.url + "frame.jpg")
        assert ctype == "image/jpeg" and cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (90, 160, 3)
        assert json.loads(_get(srv.url + "stats.json")[2]) == {"pipeline_fps": 12.5, "stages": {}}
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(srv.url + "nope")
        assert e.value.code == 404
    assert _wait_threads(baseline) == baseline


def test_mjpeg_stream_delivers_successive_frames_and_shutdown_is_clean_with_a_client_attached():
    baseline = threading.active_count()
    srv = FrameServer("127.0.0.1", 0).start()
    stop = threading.Event()

    def publish():
        i = 0
        while not stop.is_set():
            srv.publish(_frame(i))
            i += 1
            time.sleep(0.02)

    t = threading.Thread(target=publish)
    t.start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(f"GET /stream.mjpg HTTP/1.0\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
        data = b""
        while data.count(b"--" + BOUNDARY.encode()) < 3:
            chunk = s.recv(65536)
            assert chunk, "stream closed early"
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        assert "multipart/x-mixed-replace" in head and BOUNDARY in head
        parts = data.split(b"--" + BOUNDARY.encode())[1:3]
        images = [cv2.imdecode(np.frombuffer(p.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n"), np.uint8), cv2.IMREAD_COLOR) for p in parts]
        assert all(im is not None and im.shape == (90, 160, 3) for im in images)
        assert not np.array_equal(images[0], images[1])
        assert srv.clients == 1
    finally:
        stop.set()
        t.join()
        srv.close()  # with the client still connected
        s.close()
    assert _wait_threads(baseline) == baseline


def test_loopback_by_default_and_address_parsing():
    assert FrameServer().host == "127.0.0.1"
    assert parse_host_port("8080") == ("127.0.0.1", 8080)
    assert parse_host_port("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_host_port("[::1]:8081") == ("::1", 8081)
    assert parse_host_port("http://127.0.0.1:8082/") == ("127.0.0.1", 8082)
    with pytest.raises(SinkError, match="HOST:PORT"):
        parse_host_port("localhost:http")


def test_port_in_use_is_a_clear_error():
    with FrameServer("127.0.0.1", 0) as a:
        with pytest.raises(ServerError, match="pick another port"):
            FrameServer("127.0.0.1", a.port).start()


# -- headless Chromium --------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="edgeseg-chromium-")
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()

        def child_fds():
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "--window-size=900,600", "about:blank"]
        # os.pipe() descriptors are non-inheritable (PEP 446): only fds 3 and 4 reach the browser
        self.proc = subprocess.Popen(args, close_fds=False, preexec_fn=child_fds,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._w, self._r, self._buf, self._id = cmd_w, out_r, b"", 0

    def call(self, method, params=None, session=None, timeout=30.0):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            ready, _, _ = select.select([self._r], [], [], 0.5)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (status {self.proc.poll()})")
                self._buf += chunk
        raise TimeoutError(f"no answer to {method} within {timeout} s")

    def open_page(self, url):
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        return session

    def evaluate(self, session, expression):
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)["result"].get("value")

    def screenshot(self, session):
        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
        return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def _poll(fn, until, timeout=30.0, every=0.25):
    deadline = time.monotonic() + timeout
    value = fn()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(every)
        value = fn()
    return value


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (apt-get install -y chromium)")
def test_browser_view_shows_moving_frames_and_live_timings(default_bundle):
    from runtime.segmenter import Segmenter

    baseline = threading.active_count()
    seg = Segmenter(default_bundle)
    stream = seg.stream("synthetic://?frames=0&live=1&fps=15&width=320&height=180", serve="127.0.0.1:0")
    url = stream.sinks[0].server.url
    assert url.startswith("http://127.0.0.1:")
    stop = threading.Event()
    errors = []

    def consume():
        try:
            for _ in stream:
                if stop.is_set():
                    break
        except BaseException as e:  # surfaced below
            errors.append(e)
        finally:
            stream.close()

    consumer = threading.Thread(target=consume)
    consumer.start()
    browser = DevTools(CHROMIUM)
    try:
        page = browser.open_page(url)
        seen = _poll(lambda: browser.evaluate(page, "window.edgesegFramesSeen || 0"), lambda n: n >= 3)
        assert seen >= 3, "the page shows no frames"
        first = browser.screenshot(page)
        time.sleep(1.0)
        later_seen = browser.evaluate(page, "window.edgesegFramesSeen")
        second = browser.screenshot(page)
        assert later_seen > seen, "the picture does not change"
        assert np.abs(first.astype(int) - second.astype(int)).mean() > 0.1, "screenshots a second apart are identical"
        rows = _poll(lambda: browser.evaluate(page, "document.querySelectorAll('#stages tr').length"), lambda n: n >= 4)
        assert rows >= 4, "the timings table is empty"
        fps = browser.evaluate(page, "document.getElementById('pipeline-fps').textContent")
        assert float(fps) > 0
        names = browser.evaluate(page, "Array.from(document.querySelectorAll('#stages td:first-child')).map(e => e.textContent)")
        assert {"capture", "preprocess", "inference", "postprocess", "sink"} <= set(names)
        # the classes in view, with their share of the frame (what the legend shows)
        classes = _poll(lambda: browser.evaluate(
            page, "Array.from(document.querySelectorAll('#classes tr')).map(r => [r.cells[0].textContent, r.cells[1].textContent])"),
            lambda v: len(v) >= 1)
        assert classes, "the class table is empty"
        for label, share in classes:
            assert label in seg.bundle.manifest.labels and label != seg.bundle.manifest.labels[0]
            assert share.endswith(" %") and 0 < float(share[:-2]) <= 100
    finally:
        browser.close()
        stop.set()
        consumer.join(30)
    assert not errors, errors
    assert _wait_threads(baseline) == baseline
