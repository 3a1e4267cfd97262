"""The browser view: a small threaded HTTP server (stdlib only).

    GET /             a page with the live overlay and the live per-stage timings
    GET /app.js       its script; GET /app.css its style (no inline script: see CSP below)
    GET /stream.mjpg  the overlay as an MJPEG stream (multipart/x-mixed-replace)
    GET /frame.jpg    the latest frame as one JPEG
    GET /stats.json   the latest timings (runtime.stats.Stats.summary())

The page is a camera, so every request is checked before it is answered:
- Host: only the names this server is reached by (for a loopback bind: localhost, 127.0.0.1,
  [::1]); anything else gets 403, so a page from another site cannot read frames through DNS
  rebinding.
- Access token: required when bound to a non-loopback address (generated and printed with the
  URL, like Jupyter's, or given with `--serve-token`), on every request: `?token=` once (the page
  then keeps it in a cookie), compared in constant time.
- Every response says nosniff, no framing, no referrer, no caching; the Content-Security-Policy
  allows this server's own script, style, images and JSON only. Text from a manifest (the model
  name in the title) is HTML-escaped; the script writes values with textContent, never as HTML.
  `Server` names edgeseg, not the Python version.

Binds to 127.0.0.1 unless told otherwise: exposing the view on the network is a decision the user
makes with an explicit host (`--serve 0.0.0.0:8080`).

Publishing is cheap for the pipeline: `publish()` only stores a reference to the newest frame;
JPEG encoding happens once per frame, on demand, in the first client thread that wants it, and
not at all while nobody watches.
"""
from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from edgeseg.errors import EdgesegError

log = logging.getLogger("edgeseg.runtime")

BOUNDARY = "edgesegframe"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/app.css">
</head>
<body>
<div><img id="view" src="/stream.mjpg" alt="live overlay"></div>
<div>
 <h1>__TITLE__</h1>
 <p id="fps">pipeline <b id="pipeline-fps">-</b> FPS &middot; engine-only <b id="engine-fps">-</b> FPS</p>
 <table><thead><tr><th>stage</th><th>p50 ms</th><th>p95 ms</th><th>mean ms</th></tr></thead><tbody id="stages"></tbody></table>
 <p id="counts" class="muted">-</p>
 <table><thead><tr><th>class in view</th><th>share of frame</th></tr></thead><tbody id="classes"></tbody></table>
 <p class="muted">frames shown here: <span id="frames-seen">0</span></p>
</div>
<script src="/app.js"></script>
</body></html>
"""

STYLE = """body{font:14px system-ui,sans-serif;margin:0;background:#111;color:#ddd;display:flex;flex-wrap:wrap;gap:16px;padding:16px}
#view{max-width:min(100%,1280px);background:#000;border:1px solid #333}
table{border-collapse:collapse;min-width:340px} td,th{padding:3px 8px;text-align:right;border-bottom:1px solid #333}
td:first-child,th:first-child{text-align:left} h1{font-size:16px;margin:0 0 8px} .muted{color:#888}
#fps b{font-size:18px;color:#fff} .swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border:1px solid #555}
"""

SCRIPT = """"use strict";
// Count the distinct frames the page actually displays (a checksum of a thumbnail of the image).
window.edgesegFramesSeen = 0;
const img = document.getElementById("view");
const canvas = document.createElement("canvas"); canvas.width = 48; canvas.height = 27;
const ctx = canvas.getContext("2d", {willReadFrequently: true});
let last = null;
function sample() {
  try {
    if (img.complete && img.naturalWidth > 0) {
      ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
      const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      let h = 0; for (let i = 0; i < d.length; i += 4) h = (h * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) >>> 0;
      if (h !== last) { last = h; window.edgesegFramesSeen++; document.getElementById("frames-seen").textContent = window.edgesegFramesSeen; }
    }
  } catch (e) {}
}
setInterval(sample, 100);
const fmt = v => (v === null || v === undefined) ? "-" : Number(v).toFixed(2);
function row(cells) {  // values become text, never markup
  const tr = document.createElement("tr");
  for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
  return tr;
}
async function refresh() {
  try {
    const s = await (await fetch("/stats.json", {cache: "no-store", credentials: "same-origin"})).json();
    window.edgesegStats = s;
    document.getElementById("pipeline-fps").textContent = s.pipeline_fps == null ? "-" : Number(s.pipeline_fps).toFixed(1);
    document.getElementById("engine-fps").textContent = s.engine_fps == null ? "-" : Number(s.engine_fps).toFixed(1);
    const rows = [];
    for (const [name, st] of Object.entries(s.stages || {})) {
      if (st.count) rows.push(row([name, fmt(st.p50_ms), fmt(st.p95_ms), fmt(st.mean_ms)]));
    }
    if (s.latency && s.latency.count) rows.push(row(["latency", fmt(s.latency.p50_ms), fmt(s.latency.p95_ms), fmt(s.latency.mean_ms)]));
    document.getElementById("stages").replaceChildren(...rows);
    const classes = [];
    for (const c of (Array.isArray(s.classes) ? s.classes : [])) {
      const tr = row(["", (100 * Number(c.share)).toFixed(1) + " %"]);
      const sw = document.createElement("span"); sw.className = "swatch";
      const rgb = Array.isArray(c.color) ? c.color.map(v => Math.max(0, Math.min(255, Number(v) | 0))) : [0, 0, 0];
      sw.style.backgroundColor = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;  // CSSOM, allowed by the CSP; numbers only
      tr.firstChild.append(sw, document.createTextNode(String(c.label)));
      classes.push(tr);
    }
    document.getElementById("classes").replaceChildren(...classes);
    document.getElementById("counts").textContent =
      `frames ${s.frames_out ?? 0} out / ${s.frames_in ?? 0} in, dropped ${s.dropped ?? 0}, corrupt ${s.corrupt ?? 0}`;
  } catch (e) {}
}
setInterval(refresh, 500); refresh();
"""

# sent with every response, errors included
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")


class ServerError(EdgesegError, OSError):
    """The browser view cannot start (port taken, bad address, bad token)."""


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> str:
    if not isinstance(token, str) or not TOKEN_RE.match(token):
        raise ServerError("an access token (--serve-token) is 16 to 256 characters of letters, digits and ._~- "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


class Access:
    """Who may read the view: the Host names it answers to, and the token when there is one."""

    def __init__(self, host: str, port: int, token: str | None, allowed_hosts=()):
        self.port, self.token = int(port), token
        self.any_ip = host in ("", "0.0.0.0", "::")
        names = {host.lower()} | {h.lower() for h in allowed_hosts}
        if is_loopback(host) or self.any_ip:
            names |= set(LOOPBACK_NAMES)
        if not is_loopback(host):  # reached over the network: by this machine's names too
            hostname = socket.gethostname().lower()
            names |= {hostname, socket.getfqdn().lower(), f"{hostname}.local"}
        self.names = frozenset(n for n in names if n)
        self.cookie = f"edgeseg_token_{self.port}"

    def host_problem(self, header: str | None) -> str | None:
        """Why a request with this Host header is refused, or None."""
        if not header:
            return "a Host header is required"
        m = re.match(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::(\d{1,5}))?$", header.strip())
        if not m:
            return "the Host header is malformed"
        name, port = m.group(1).strip("[]").lower().rstrip("."), m.group(2)
        if port is not None and int(port) != self.port:
            return f"port {port} is not this server's ({self.port})"
        if name in self.names:
            return None
        if self.any_ip:
            try:
                ipaddress.ip_address(name)
                return None
            except ValueError:
                pass
        return f"this view answers to {', '.join(sorted(self.names))}{' or an IP address' if self.any_ip else ''}"

    def token_ok(self, query: str, cookie_header: str | None) -> tuple[bool, bool]:
        """(allowed, came in the query): the token from `?token=` or this server's cookie."""
        if self.token is None:
            return True, False
        given = parse_qs(query).get("token", [])
        if given:
            return hmac.compare_digest(given[-1].encode(), self.token.encode()), True
        for part in (cookie_header or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie:
                return hmac.compare_digest(value.encode(), self.token.encode()), False
        return False, False


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgeseg"
    timeout = 10  # a stalled client cannot hold a thread forever

    def version_string(self) -> str:
        return self.server_version  # no Python version

    def log_message(self, fmt, *args):
        log.debug("http %s " + fmt, self.client_address[0], *args)

    def end_headers(self):
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def _send(self, status, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, why: str) -> None:
        self._send(HTTPStatus.FORBIDDEN, f"403 forbidden: {why}\n".encode(), "text/plain; charset=utf-8")

    def do_GET(self):
        fs: FrameServer = self.server.frame_server
        parts = urlsplit(self.path)
        path = parts.path
        try:
            why = fs.access.host_problem(self.headers.get("Host"))
            if why:
                log.warning("browser view: refused a request for Host %r (%s)", (self.headers.get("Host") or "")[:100], why)
                return self._refuse(why)
            ok, from_query = fs.access.token_ok(parts.query, self.headers.get("Cookie"))
            if not ok:
                return self._refuse("this view needs its access token: open the URL edgeseg printed (...?token=...)")
            if from_query:  # keep it in a cookie, and out of the address bar and history
                cookie = {"Set-Cookie": f"{fs.access.cookie}={fs.access.token}; HttpOnly; SameSite=Strict; Path=/"}
                if path in ("/", "/index.html"):
                    return self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {**cookie, "Location": "/"})
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, fs.page.encode(), "text/html; charset=utf-8")
            elif path == "/app.js":
                self._send(HTTPStatus.OK, SCRIPT.encode(), "text/javascript; charset=utf-8")
            elif path == "/app.css":
                self._send(HTTPStatus.OK, STYLE.encode(), "text/css; charset=utf-8")
            elif path == "/stats.json":
                self._send(HTTPStatus.OK, json.dumps(fs.stats).encode(), "application/json")
            elif path == "/frame.jpg":
                seq, jpeg = fs.jpeg()
                if jpeg is None:
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, b"no frame yet\n", "text/plain")
                else:
                    self._send(HTTPStatus.OK, jpeg, "image/jpeg")
            elif path == "/stream.mjpg":
                self._stream(fs)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found: try / , /stream.mjpg, /frame.jpg or /stats.json\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout, OSError):
            pass  # the client went away

    def _stream(self, fs: "FrameServer") -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Pragma", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        seq = -1
        fs._register(self.connection)
        try:
            while not fs.closing:
                seq, jpeg = fs.wait_frame(seq, timeout=0.25)
                if jpeg is None:
                    continue
                self.wfile.write(
                    f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode() + jpeg + b"\r\n"
                )
                self.wfile.flush()
        finally:
            fs._unregister(self.connection)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # joined in server_close(): no thread left behind
    block_on_close = True
    allow_reuse_address = True


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class FrameServer:
    """MJPEG + stats server. `start()`, then `publish(image)` / `publish_stats(dict)`, `close()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, quality: int = 80, title: str = "edgeseg live view",
                 token: str | None = None, allowed_hosts=()):
        """token: the access token (required, and generated when not given, for a non-loopback
        host). allowed_hosts: more Host names the view answers to (a DNS name, a reverse proxy)."""
        self.host, self.port, self.quality = host, int(port), int(quality)
        self.page = PAGE.replace("__TITLE__", html.escape(str(title), quote=True))
        if token is not None:
            check_token(token)
        elif not is_loopback(host):
            token = secrets.token_urlsafe(24)
        self.token, self.allowed_hosts = token, tuple(allowed_hosts)
        self.access: Access | None = None
        self.stats: dict = {}
        self.closing = False
        self._cond = threading.Condition()
        self._image: np.ndarray | None = None
        self._seq = 0
        self._jpeg: tuple[int, bytes | None] = (-1, None)
        self._encode_lock = threading.Lock()
        self._conns: set = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FrameServer":
        try:
            cls = _HTTPServer6 if ":" in self.host else _HTTPServer
            self._httpd = cls((self.host, self.port), _Handler)
        except OSError as e:
            raise ServerError(f"cannot serve on {self.host}:{self.port}: {e.strerror or e}; pick another port (--serve {self.host}:8081) "
                              "or stop the program using it") from None
        self._httpd.frame_server = self
        self.port = self._httpd.server_address[1]
        self.access = Access(self.host, self.port, self.token, self.allowed_hosts)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="edgeseg-server", daemon=True)
        self._thread.start()
        log.info("browser view on %s", self.url)
        if not is_loopback(self.host):
            log.warning("the browser view on %s:%d is reachable from other machines (it shows the camera); "
                        "it answers only with its access token", self.host, self.port)
        return self

    @property
    def url(self) -> str:
        """The address to open (with the token, when there is one)."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def close(self) -> None:
        if self._httpd is None:
            return
        self.closing = True
        with self._cond:
            self._cond.notify_all()
        # unblock handlers stuck writing to slow clients
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join(5.0)
        self._httpd = None

    def __enter__(self):
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- publishing -------------------------------------------------------------------------
    def publish(self, image: np.ndarray) -> None:
        """Offer a new BGR frame (kept by reference: do not modify it afterwards)."""
        with self._cond:
            self._image = image
            self._seq += 1
            self._cond.notify_all()

    def publish_stats(self, summary: dict) -> None:
        self.stats = summary

    @property
    def clients(self) -> int:
        return len(self._conns)

    # -- for handlers -----------------------------------------------------------------------
    def _register(self, conn) -> None:
        with self._cond:
            self._conns.add(conn)

    def _unregister(self, conn) -> None:
        with self._cond:
            self._conns.discard(conn)

    def jpeg(self) -> tuple[int, bytes | None]:
        """(sequence number, JPEG bytes) of the newest frame, encoding it once."""
        with self._cond:
            seq, image = self._seq, self._image
        if image is None:
            return seq, None
        with self._encode_lock:
            if self._jpeg[0] != seq:
                ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
                self._jpeg = (seq, data.tobytes() if ok else None)
            return self._jpeg

    def wait_frame(self, after: int, timeout: float) -> tuple[int, bytes | None]:
        """Wait for a frame newer than `after`; (seq, None) on timeout."""
        with self._cond:
            if self._seq == after or self._image is None:
                self._cond.wait(timeout)
            if self._seq == after or self._image is None or self.closing:
                return after, None
        return self.jpeg()


__all__ = ["FrameServer", "ServerError", "PAGE", "BOUNDARY"]
