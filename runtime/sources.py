"""Frame sources by URI, in the style of jetson-inference's videoSource.

    with open_source("synthetic://?frames=100") as src:
        for frame in src:                 # Frame(image=BGR uint8, index, timestamp, live)
            ...

URIs:
    0, "0", /dev/video0, v4l2:///dev/video0      a V4L2 camera (live)
    csi://0                                       a MIPI CSI camera through GStreamer (Jetson)
    clip.mp4, file://clip.mp4                     a video file (every frame, in order)
    rtsp://host/stream, http(s)://host/stream     a network stream (live; reconnects with backoff)
    images/, "images/*.png", photo.jpg            an image folder, a glob, a single image
    synthetic://?frames=300&width=640&height=360&seed=7&static=0&noise=3
                                                  generated scenes (frames=0: endless; loop=1 replays
                                                  the clip; live=1&fps=30 paces it like a camera)

`Source.frame_count` is the number of frames a source will deliver when known (None for live,
looping or endless sources). `Source.live` says how the pipeline treats it: live sources are latency-first (stale frames are
dropped so the newest is processed), files and folders are throughput-first (every frame).
Timestamps are seconds: wall-clock capture time (time.time()) for live sources, position in the
media (index / fps) otherwise. A frame that cannot be decoded is skipped and counted in
`Source.corrupt`; a source that cannot be opened raises SourceError naming the URI and the fix.
"""
from __future__ import annotations

import glob as globlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qsl, urlparse

import cv2
import numpy as np

from edgeseg.errors import SourceError
from edgeseg.spec import MAX_FRAME_PIXELS, MIN_FRAME_SIDE, frame_size_problem

log = logging.getLogger("edgeseg.runtime")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jp2")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".mjpeg", ".mjpg", ".h264", ".h265", ".hevc")
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "rtp", "srt", "tcp")


@dataclass
class Frame:
    """One captured frame. image: HxWx3 uint8 BGR. name: the file it was read from (image sources)."""

    image: np.ndarray
    index: int
    timestamp: float
    live: bool
    name: str | None = None

    def __repr__(self) -> str:
        return f"Frame(index={self.index}, timestamp={self.timestamp:.3f}, size={self.image.shape[:2]}, live={self.live})"


class Source:
    """Base class: iterate for Frames; `read()` returns the next Frame or None at the end."""

    live: bool = False
    uri: str = ""
    frame_count: int | None = None
    # frames smaller or larger than this are skipped and counted as corrupt (open_source(max_pixels=, min_side=))
    max_pixels: int | None = MAX_FRAME_PIXELS
    min_side: int = MIN_FRAME_SIDE

    def __init__(self):
        self.fps: float | None = None
        self.size: tuple[int, int] | None = None  # (height, width)
        self.corrupt = 0  # frames skipped because they could not be decoded
        self.reconnects = 0
        self.frames_read = 0
        self._closed = threading.Event()

    # -- protocol -----------------------------------------------------------------------------
    def read(self) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()

    def interrupt(self) -> None:
        """Make a read blocked in this source return soon (safe from another thread); the
        resources are released by `close()`, from the reading thread or after it stopped."""
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __iter__(self) -> Iterator[Frame]:
        while not self.closed:
            frame = self.read()
            if frame is None:
                return
            yield frame

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- helpers ------------------------------------------------------------------------------
    def _frame(self, image: np.ndarray, timestamp: float | None = None, name: str | None = None) -> Frame:
        if self.size is None:
            self.size = tuple(image.shape[:2])
        index = self.frames_read
        self.frames_read += 1
        if timestamp is None:
            timestamp = time.time() if self.live else index / (self.fps or 30.0)
        return Frame(image, index, timestamp, self.live, name)

    @staticmethod
    def _valid(image) -> bool:
        return isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.size > 0

    def _skip_corrupt(self, why: str) -> None:
        self.corrupt += 1
        log.warning("%s: skipped a corrupt frame (%s); %d so far", self.uri, why, self.corrupt)

    def _sized(self, image: np.ndarray) -> bool:
        """False (the frame skipped and counted) when it is too small or too large to segment."""
        why = frame_size_problem(image.shape[0], image.shape[1], self.max_pixels, self.min_side)
        if why:
            self._skip_corrupt(why)
        return why is None

    def describe(self) -> dict:
        return {"uri": self.uri, "kind": type(self).__name__, "live": self.live, "fps": self.fps,
                "size": list(self.size) if self.size else None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, live={self.live}, fps={self.fps}, size={self.size})"


# -- OpenCV capture: cameras, files, network streams -------------------------------------------------
class _CaptureSource(Source):
    def _open_capture(self, target, api: int, params: list[int] | None = None) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(target, api, params or [])
        if not cap.isOpened():
            cap.release()
            return None
        return cap

    def _props(self, cap) -> None:
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else self.fps
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w > 0 and h > 0:
            self.size = (h, w)

    def close(self) -> None:
        super().close()
        cap, self._cap = getattr(self, "_cap", None), None
        if cap is not None:
            cap.release()


class CameraSource(_CaptureSource):
    """A V4L2 (or platform default) camera by index or device path. Live."""

    live = True

    def __init__(self, uri: str, device, width: int | None = None, height: int | None = None,
                 fps: float | None = None, fourcc: str | None = None, max_failures: int = 30, **_):
        super().__init__()
        self.uri, self.device, self.max_failures = uri, device, int(max_failures)
        if isinstance(device, str) and not os.path.exists(device):
            present = sorted(glob_devices())
            raise SourceError(
                f"cannot open camera {uri}: {device} does not exist (cameras present: {', '.join(present) or 'none'}); "
                "plug the camera in, or pick another with --source /dev/videoN"
            )
        api = cv2.CAP_V4L2 if os.name == "posix" and os.uname().sysname == "Linux" else cv2.CAP_ANY
        self._cap = self._open_capture(device, api)
        if self._cap is None:
            raise SourceError(
                f"cannot open camera {uri}: the device did not open; check that it exists (ls /dev/video*), "
                "that no other program is using it, and that this user may read it (group 'video')"
            )
        if fourcc:
            self._cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*fourcc[:4]))
        if width:
            self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, int(width))
        if height:
            self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, int(height))
        if fps:
            self._cap.set(cv2.CAP_PROP_FPS, float(fps))
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # latency first: do not queue old frames in the driver
        self._props(self._cap)
        ok, image = self._cap.read()
        if not ok or not self._valid(image):
            self.close()
            raise SourceError(f"camera {uri} opened but delivers no frames; try another --source, resolution or pixel format (fourcc=MJPG)")
        self._first = image

    def read(self) -> Frame | None:
        if self._first is not None:
            image, self._first = self._first, None
            return self._frame(image)
        failures = 0
        while not self.closed:
            cap = self._cap
            if cap is None:
                return None
            ok, image = cap.read()
            if ok and self._valid(image):
                if not self._sized(image):
                    continue
                return self._frame(image)
            failures += 1
            if failures >= self.max_failures:
                raise SourceError(f"camera {self.uri} stopped delivering frames ({failures} failed reads); check the cable and `dmesg`")
            self._closed.wait(0.02)
        return None


def glob_devices() -> list[str]:
    return globlib.glob("/dev/video*")


class VideoFileSource(_CaptureSource):
    """A video file decoded with FFmpeg: every frame in order (throughput first)."""

    live = False

    def __init__(self, uri: str, path: str, loop: bool = False, max_corrupt_run: int = 8, **_):
        super().__init__()
        self.uri, self.path, self.loop, self.max_corrupt_run = uri, path, bool(loop), int(max_corrupt_run)
        if not os.path.isfile(path):
            raise SourceError(f"cannot open {uri}: no such file {path}; check the path (a camera is 0 or /dev/video0, a folder of images works too)")
        self._cap = self._open_capture(path, cv2.CAP_FFMPEG)
        if self._cap is None:
            raise SourceError(
                f"cannot open video {uri}: FFmpeg cannot decode it (damaged, or an unsupported codec); "
                "re-encode it, e.g. `ffmpeg -i in -c:v libx264 out.mp4`, or point --source at a folder of images"
            )
        self._props(self._cap)
        self.fps = self.fps or 30.0
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT))
        self.frame_count = count if count > 0 and not self.loop else None  # FFmpeg's estimate
        self.ended_early: dict | None = None

    def read(self) -> Frame | None:
        # A failed read is either the end of the file or an undecodable frame inside it; it only
        # counts as corrupt once a later frame decodes (FRAME_COUNT is an estimate, so it cannot tell).
        failed = 0
        while not self.closed:
            cap = self._cap
            if cap is None:
                return None
            ok, image = cap.read()
            if ok and self._valid(image):
                for _ in range(failed):
                    self._skip_corrupt("decode failed")
                failed = 0
                if not self._sized(image):
                    continue
                return self._frame(image)
            failed += 1
            if failed >= self.max_corrupt_run:
                if self.loop and self.frames_read:
                    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    failed = 0
                    continue
                self._note_end()
                return None
        return None

    def _note_end(self) -> None:
        """A file that ends before the frame count its container announces is reported (stats)."""
        announced = self.frame_count
        got = self.frames_read + self.corrupt
        if announced and got < announced and self.ended_early is None:
            self.ended_early = {"frames_announced": announced, "frames_decoded": got}
            log.warning("%s ended after %d of the %d frames its container announces (truncated or damaged file)",
                        self.uri, got, announced)

    def describe(self) -> dict:
        return {**super().describe(), "frame_count": self.frame_count, "ended_early": self.ended_early}


class StreamSource(_CaptureSource):
    """A network stream (RTSP, HTTP MJPEG/HLS, ...). Live. When it drops, it is reopened with
    exponential backoff (0.5 s doubling up to `max_backoff`) for `reconnect` attempts (-1: forever)."""

    live = True

    def __init__(self, uri: str, timeout: float = 5.0, reconnect: int = 10, backoff: float = 0.5,
                 max_backoff: float = 8.0, transport: str = "tcp", live: bool | None = None, **_):
        super().__init__()
        self.uri, self.timeout = uri, float(timeout)
        self.reconnect_attempts, self.backoff, self.max_backoff = int(reconnect), float(backoff), float(max_backoff)
        if live is not None:
            self.live = bool(live)
        _check_host(uri)
        if urlparse(uri).scheme.startswith("rtsp") and transport and "OPENCV_FFMPEG_CAPTURE_OPTIONS" not in os.environ:
            # RTSP over TCP survives packet loss and NAT better than the UDP default
            os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{transport}"
        self._cap = self._connect()
        if self._cap is None:
            raise SourceError(
                f"cannot open stream {_redact(uri)}: no video within {self.timeout:.0f} s; check the URL, credentials and "
                "that the server is reachable from here (try `ffprobe URL`)"
            )
        self._props(self._cap)

    def _connect(self):
        ms = int(self.timeout * 1000)
        return self._open_capture(self.uri, cv2.CAP_FFMPEG,
                                  [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms])

    def _reopen(self) -> bool:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()
        attempt, delay = 0, self.backoff
        while not self.closed and (self.reconnect_attempts < 0 or attempt < self.reconnect_attempts):
            attempt += 1
            log.warning("%s: stream dropped, reconnecting in %.1f s (attempt %d)", _redact(self.uri), delay, attempt)
            if self._closed.wait(delay):
                return False
            cap = self._connect()
            if cap is not None:
                if self.closed:
                    cap.release()
                    return False
                self._cap = cap
                self.reconnects += 1
                return True
            delay = min(delay * 2, self.max_backoff)
        return False

    def read(self) -> Frame | None:
        while not self.closed:
            cap = self._cap
            ok, image = cap.read() if cap is not None else (False, None)
            if ok and self._valid(image):
                if not self._sized(image):
                    continue
                return self._frame(image)
            if ok:
                self._skip_corrupt("undecodable frame")
                continue
            if self.closed:
                return None
            if not self._reopen():
                if self.closed:
                    return None
                raise SourceError(
                    f"stream {_redact(self.uri)} dropped and did not come back after {self.reconnect_attempts} attempts; "
                    "check the camera/server, or raise reconnect= (use -1 to retry forever)"
                )
        return None


def _check_host(uri: str) -> None:
    """A host name that does not resolve fails here, with that reason, instead of after the
    capture's timeout as 'no video'."""
    import socket

    try:
        parsed = urlparse(uri)
        host, port = parsed.hostname, parsed.port
    except ValueError as e:  # a port that is not a number, a bad IPv6 literal
        raise SourceError(f"cannot open stream {_redact(uri)}: {e}; write it as rtsp://host[:port]/path") from None
    if not host:
        raise SourceError(f"cannot open stream {_redact(uri)}: it names no host; write it as rtsp://host[:port]/path")
    try:
        socket.getaddrinfo(host, port or None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise SourceError(f"cannot open stream {_redact(uri)}: the host {host!r} does not resolve ({e.strerror}); "
                          "check the name, or use the camera's IP address") from None
    except (UnicodeError, OSError) as e:
        raise SourceError(f"cannot open stream {_redact(uri)}: bad host {host!r} ({e})") from None


def _redact(uri: str) -> str:
    """Hide credentials (rtsp://user:pass@host) in messages."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


# -- GStreamer (CSI cameras) -------------------------------------------------------------------------
def has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


class CSISource(_CaptureSource):
    """A MIPI CSI camera through nvarguscamerasrc (Jetson). Needs OpenCV with GStreamer."""

    live = True

    def __init__(self, uri: str, sensor: int, width: int = 1280, height: int = 720, fps: float = 30, flip: int = 0, **_):
        super().__init__()
        self.uri = uri
        if not has_gstreamer():
            raise SourceError(
                f"cannot open {uri}: CSI cameras need OpenCV built with GStreamer, and this OpenCV ({cv2.__version__}) has none "
                "(cv2.getBuildInformation() shows 'GStreamer: NO'); on a Jetson use the JetPack OpenCV "
                "(sudo apt install python3-opencv; pip uninstall opencv-python), or use a V4L2 camera: --source /dev/video0"
            )
        pipeline = (
            f"nvarguscamerasrc sensor-id={int(sensor)} ! video/x-raw(memory:NVMM), width={int(width)}, height={int(height)}, "
            f"framerate={int(fps)}/1 ! nvvidconv flip-method={int(flip)} ! video/x-raw, format=BGRx ! videoconvert ! "
            "video/x-raw, format=BGR ! appsink drop=true max-buffers=1"
        )
        self._cap = self._open_capture(pipeline, cv2.CAP_GSTREAMER)
        if self._cap is None:
            raise SourceError(f"cannot open {uri}: the GStreamer pipeline did not start; check the sensor id and that nvargus-daemon runs")
        self.fps, self.size = float(fps), (int(height), int(width))

    def read(self) -> Frame | None:
        while not self.closed and self._cap is not None:
            ok, image = self._cap.read()
            if ok and self._valid(image):
                if not self._sized(image):
                    continue
                return self._frame(image)
            if not ok:
                raise SourceError(f"{self.uri} stopped delivering frames")
            self._skip_corrupt("bad frame")
        return None


# -- images -----------------------------------------------------------------------------------------
class ImageSource(Source):
    """Image files (a folder, a glob or one image) in name order. Unreadable files, and images too
    small or too large (`max_pixels`, judged from the file's header before decoding when Pillow can
    read it), are skipped and counted; one image given alone (`single`) raises instead. `fps` is
    nominal (timestamps, video sinks); `loop` repeats forever."""

    live = False

    def __init__(self, uri: str, paths: list[str], fps: float = 30.0, loop: bool = False, single: bool = False, **_):
        super().__init__()
        self.uri, self.paths, self.loop, self.single = uri, list(paths), bool(loop), bool(single)
        self.fps = float(fps)
        self.frame_count = None if self.loop else len(self.paths)
        self._i = 0

    def read(self) -> Frame | None:
        failed_pass = 0
        while not self.closed:
            if self._i >= len(self.paths):
                if not self.loop or failed_pass >= len(self.paths):
                    return None
                self._i = 0
            path = self.paths[self._i]
            self._i += 1
            why = self._problem(path)
            image = None if why else cv2.imread(path, cv2.IMREAD_COLOR)
            if image is None or not self._valid(image):
                why = why or "not an image OpenCV can decode (damaged, empty or another format)"
            else:
                why = frame_size_problem(image.shape[0], image.shape[1], self.max_pixels, self.min_side)
            if why:
                if self.single:
                    raise SourceError(f"cannot use {path}: {why}")
                self._skip_corrupt(f"{path}: {why}")
                failed_pass += 1
                continue
            return self._frame(image, name=os.path.basename(path))
        return None

    def _problem(self, path: str) -> str | None:
        """A size problem read from the image header, before decoding (a 100-megapixel PNG is a
        few kB of zeros: decoding it first would take gigabytes)."""
        try:
            from PIL import Image
        except ImportError:  # the runtime does not need Pillow; OpenCV's own limit applies then
            return None
        try:
            with Image.open(path) as im:
                width, height = im.size
        except Image.DecompressionBombError:
            return "too large to decode safely (Pillow's decompression-bomb limit)"
        except Exception:  # not something Pillow reads: OpenCV decides
            return None
        return frame_size_problem(height, width, self.max_pixels, self.min_side)


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


# -- synthetic ---------------------------------------------------------------------------------------
class SyntheticSource(Source):
    """Generated scenes (edgeseg.data.synthetic.SyntheticClip); `mask` of the last frame is kept
    for accuracy checks. live=1 paces frames at `fps` like a camera (for latency tests)."""

    def __init__(self, uri: str, frames: int = 300, width: int = 640, height: int = 360, seed: int = 7,
                 static: bool = False, noise: float = 3.0, objects: int = 5, speed: float = 2.5,
                 fps: float = 30.0, live: bool = False, loop: bool = False, **_):
        super().__init__()
        from edgeseg.data.synthetic import SyntheticClip

        frames, width, height = int(frames), int(width), int(height)
        if frames < 0 or width < 16 or height < 16:
            raise SourceError(f"{uri}: need frames >= 0 (0: endless) and width, height >= 16")
        too_big = frame_size_problem(height, width, MAX_FRAME_PIXELS)
        if too_big:
            raise SourceError(f"{uri}: {too_big.split(';')[0]}; ask for a smaller width and height")
        self.uri, self.live, self.fps, self.size, self.loop = uri, bool(live), float(fps), (height, width), bool(loop)
        self.frame_count = frames if frames and not self.loop else None
        self.clip = SyntheticClip(size=(height, width), frames=frames or None, seed=int(seed), objects=int(objects),
                                  speed=float(speed), static=bool(static), noise=float(noise))
        self._it = iter(self.clip)
        self.mask: np.ndarray | None = None
        self._next_t: float | None = None

    def read(self) -> Frame | None:
        if self.closed:
            return None
        if self.live:
            now = time.perf_counter()
            if self._next_t is None:
                self._next_t = now
            elif self._next_t > now:
                if self._closed.wait(self._next_t - now):
                    return None
            self._next_t = max(self._next_t + 1.0 / self.fps, time.perf_counter() - 1.0 / self.fps)
        try:
            image, self.mask = next(self._it)
        except StopIteration:
            if not self.loop:
                return None
            self._it = iter(self.clip)  # the same clip again (a seeded generator)
            image, self.mask = next(self._it)
        return self._frame(image)


def write_synthetic_clip(path: str | os.PathLike, frames: int = 300, size: tuple[int, int] = (720, 1280),
                         seed: int = 7, fps: float = 30.0, **clip_options) -> Path:
    """Render a SyntheticClip to a video file (mp4v/.mp4 or MJPG/.avi): a real decode path for
    benchmarks, without the cost of generating scenes on the fly."""
    from edgeseg.data.synthetic import SyntheticClip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = "MJPG" if path.suffix.lower() == ".avi" else "mp4v"
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), float(fps), (int(w), int(h)))
    if not writer.isOpened():
        raise SourceError(f"cannot write {path}: no {fourcc} encoder in this OpenCV")
    try:
        for image, _ in SyntheticClip(size=(h, w), frames=int(frames), seed=seed, **clip_options):
            writer.write(image)
    finally:
        writer.release()
    return path


# -- the URI parser ----------------------------------------------------------------------------------
def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def open_source(uri, max_pixels: int | None = MAX_FRAME_PIXELS, min_side: int = MIN_FRAME_SIDE, **opts) -> Source:
    """Open a frame source by URI (see the module docstring). `opts` override URI query options
    and tune the source: live=, fps=, loop=, width=/height= (cameras), timeout=, reconnect= (streams).
    Frames with fewer than `min_side` pixels a side or more than `max_pixels` (None: no limit) are
    skipped and counted as corrupt; a single image given alone raises instead."""
    if isinstance(uri, Source):
        return uri
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise SourceError(f"max_pixels must be a positive number of pixels (or None: no limit), got {max_pixels!r}")
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1:
        raise SourceError(f"min_side must be a positive number of pixels, got {min_side!r}")
    src = _open(uri, opts)
    src.max_pixels, src.min_side = max_pixels, min_side
    return src


def _open(uri, opts: dict) -> Source:
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if isinstance(uri, (int, np.integer)) and not isinstance(uri, bool):
        return _with_live(CameraSource(str(uri), int(uri), **opts), opts)
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"--source must be a camera index, a path or a URI, got {uri!r}")
    uri = uri.strip()
    if uri.isdigit():
        return _with_live(CameraSource(uri, int(uri), **opts), opts)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower() if len(parsed.scheme) > 1 else ""  # "C:\..." is a path
    if scheme == "synthetic":
        params = {k: _parse_value(v) for k, v in parse_qsl(parsed.query)}
        params.update(opts)
        known = {"frames", "width", "height", "seed", "static", "noise", "objects", "speed", "fps", "live", "loop"}
        unknown = set(params) - known
        if unknown:
            raise SourceError(f"{uri}: unknown options {sorted(unknown)}; known: {sorted(known)}")
        return SyntheticSource(uri, **params)
    if scheme in ("v4l2", "v4l"):
        device = parsed.path or parsed.netloc
        if device.isdigit():
            device = f"/dev/video{device}"
        return _with_live(CameraSource(uri, device, **opts), opts)
    if scheme == "csi":
        sensor = (parsed.netloc or parsed.path.strip("/") or "0")
        if not sensor.isdigit():
            raise SourceError(f"{uri}: expected csi://N with a sensor number")
        return CSISource(uri, int(sensor), **opts)
    if scheme in STREAM_SCHEMES:
        return StreamSource(uri, **opts)
    if scheme == "file":
        path = parsed.netloc + parsed.path if parsed.netloc not in ("", "localhost") else parsed.path
        return _open_path(uri, path, opts)
    if scheme and scheme not in ("", "file"):
        raise SourceError(
            f"unknown source scheme {scheme!r} in {uri}; use a camera (0, /dev/video0, v4l2://, csi://0), a file or folder path, "
            "rtsp:// or http(s):// streams, or synthetic://"
        )
    return _open_path(uri, uri, opts)


def _with_live(src: Source, opts: dict) -> Source:
    if "live" in opts and opts["live"] is not None:
        src.live = bool(opts["live"])
    return src


def _open_path(uri: str, path: str, opts: dict) -> Source:
    path = os.path.expanduser(path)
    live = opts.pop("live", None)
    if path.startswith("/dev/video") or path.startswith("/dev/v4l/"):
        return _with_live(CameraSource(uri, path, **opts), {"live": live})
    if any(ch in path for ch in "*?[") and not os.path.exists(path):
        paths = sorted((p for p in globlib.glob(path) if os.path.isfile(p)), key=_natural_key)
        if not paths:
            raise SourceError(f"cannot open {uri}: the pattern matches no files; check the pattern and quote it so the shell does not expand it")
        return _with_live(ImageSource(uri, paths, **opts), {"live": live})
    if os.path.isdir(path):
        # hidden files are not frames: a killed writer's temporaries, macOS's ._ resource forks
        paths = sorted((str(p) for p in Path(path).iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
        if not paths:
            raise SourceError(f"cannot open {uri}: the folder has no images ({', '.join(IMAGE_EXTENSIONS)}); put frames there or pass a video file")
        return _with_live(ImageSource(uri, paths, **opts), {"live": live})
    if not os.path.exists(path):
        raise SourceError(
            f"cannot open source {uri}: no such file or folder; pass a video file, an image folder or glob, a camera "
            "(0, /dev/video0), rtsp:// or http:// stream, or synthetic://"
        )
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return _with_live(ImageSource(uri, [path], single=True, **opts), {"live": live})
    return _with_live(VideoFileSource(uri, path, **opts), {"live": live})


__all__ = ["Frame", "Source", "open_source", "CameraSource", "VideoFileSource", "StreamSource", "CSISource",
           "ImageSource", "SyntheticSource", "has_gstreamer", "write_synthetic_clip", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS"]
