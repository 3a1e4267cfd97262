"""Where rendered frames go, by URI (jetson-inference's videoOutput, for the CPU):

    display://0                  an OpenCV window (needs a display: $DISPLAY / $WAYLAND_DISPLAY)
    out.mp4, out.avi, out.webm   a video file (written under a temporary name, renamed on close)
    frames/, "frames/%05d.png"   an image folder (one file per frame, each written atomically;
                                 frames read from image files keep their names)
    result.png                   one image file, overwritten with the latest frame
    http://127.0.0.1:8080        the browser view (MJPEG + live timings, runtime/server.py)

.mp4, .m4v, .mov and .mkv are H.264 (libx264 through PyAV, the `av` package), which browsers and
phones play; without PyAV they fall back to OpenCV's MPEG-4 Part 2 (mp4v), which they do not,
and say so. `VideoSink.codec` tells which was used.
"""
from __future__ import annotations

import logging
import os
import platform
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import cv2
import numpy as np

from edgeseg.errors import EdgesegError
from edgeseg.files import clean_stale_temps, temp_prefix

log = logging.getLogger("edgeseg.runtime")

VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG", ".webm": "VP80"}  # OpenCV's
H264_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}  # written with PyAV when present
H264_OPTIONS = {"crf": "23", "preset": "ultrafast"}  # ultrafast: about OpenCV mp4v's cost per frame (benchmarks/video_writer.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SinkError(EdgesegError, RuntimeError):
    """A sink that cannot be opened or written; the message names the fix."""


class Sink:
    """Base class: `write(image, result=None)`; `close()`; `stopped` turns True when the user
    closes it (a window), which ends the stream."""

    uri = ""
    stopped = False

    def write(self, image: np.ndarray, result=None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return f"{type(self).__name__}({self.uri!r})"


# -- window ----------------------------------------------------------------------------------------
def display_available() -> tuple[bool, str]:
    """(usable, why not): a GUI-enabled OpenCV and a display to show windows on."""
    info = cv2.getBuildInformation()
    gui = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.strip().startswith("GUI:")), "")
    if not gui or gui.upper() == "NONE":
        return False, "this OpenCV has no GUI support (opencv-python-headless?); install opencv-python"
    if platform.system() == "Linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display: neither DISPLAY nor WAYLAND_DISPLAY is set (a headless machine or an SSH session without -X)"
    return True, "ok"


class DisplaySink(Sink):
    """An OpenCV window. `q` or Esc, or closing the window, stops the stream. Must be written from
    the thread that created it (the pipeline's consumer thread does)."""

    def __init__(self, uri: str = "display://0", title: str = "edgeseg"):
        ok, why = display_available()
        if not ok:
            raise SinkError(f"cannot open {uri}: {why}; save to a file instead (--out overlay.mp4) "
                            "or watch in a browser (--serve 127.0.0.1:8080)")
        self.uri, self.title = uri, title
        self._open = False

    def write(self, image, result=None) -> None:
        if not self._open:
            cv2.namedWindow(self.title, cv2.WINDOW_NORMAL)
            self._open = True
        cv2.imshow(self.title, image)
        key = cv2.waitKey(1) & 0xFF
        if key in (27, ord("q")) or cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.stopped = True

    def close(self) -> None:
        if self._open:
            try:
                cv2.destroyWindow(self.title)
                cv2.waitKey(1)
            except cv2.error:
                pass
            self._open = False


# -- files -----------------------------------------------------------------------------------------
def h264_encoder() -> tuple[str | None, str]:
    """(PyAV's H.264 encoder name or None, why not)."""
    try:
        import av
    except ImportError:
        return None, "PyAV is not installed (pip install av)"
    for name in ("libx264", "h264", "libopenh264"):
        try:
            av.codec.Codec(name, "w")
            return name, "ok"
        except Exception:  # this FFmpeg build lacks it
            continue
    return None, "this PyAV's FFmpeg has no H.264 encoder"


class _AvWriter:
    """H.264 in an MP4/MOV/MKV container through PyAV; `write(bgr)`, `release()`."""

    def __init__(self, path: Path, container: str, encoder: str, fps: float, size: tuple[int, int]):
        from fractions import Fraction

        import av

        options = {"movflags": "+faststart"} if container in ("mp4", "mov") else {}  # playable while downloading
        self._out = av.open(str(path), "w", format=container, options=options)
        self._stream = self._out.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = size
        self._stream.pix_fmt = "yuv420p"  # what every player decodes
        if encoder == "libx264":
            self._stream.options = dict(H264_OPTIONS)
        # one encoder thread: the engine keeps the other cores
        self._stream.codec_context.thread_count = 1
        self._frame = av.VideoFrame

    def write(self, image: np.ndarray) -> None:
        for packet in self._stream.encode(self._frame.from_ndarray(image, format="bgr24")):
            self._out.mux(packet)

    def release(self) -> None:
        try:
            for packet in self._stream.encode():
                self._out.mux(packet)
        finally:
            self._out.close()


class VideoSink(Sink):
    """A video file written into a temporary (`.edgeseg-tmp-<pid>-...<ext>`) beside the target and
    renamed to the target on close: a half-written file never appears under the final name, and one
    left by a killed run is removed by the next run writing there. Opens on the first
    frame (the size is known then); later frames of another size are resized to it. H.264 through
    PyAV for .mp4/.m4v/.mov/.mkv (odd sizes lose their last row or column: yuv420p needs even
    ones), else cv2.VideoWriter with `fourcc` (default by extension, VIDEO_CODECS)."""

    def __init__(self, path: str | os.PathLike, fps: float = 30.0, fourcc: str | None = None):
        self.path = Path(path)
        self.uri = str(path)
        ext = self.path.suffix.lower()
        if ext not in VIDEO_CODECS and fourcc is None:
            raise SinkError(f"cannot write {path}: unknown video extension {ext!r}; use one of {sorted(VIDEO_CODECS)}")
        self.fourcc = fourcc or VIDEO_CODECS[ext]
        self._encoder = None
        if fourcc is None and ext in H264_CONTAINERS:
            self._encoder, why = h264_encoder()
            if self._encoder is None:
                log.warning("%s: %s, so it is written as MPEG-4 Part 2 (mp4v), which browsers and phones do not play; "
                            "install av for H.264", self.path.name, why)
        self.codec = f"H.264, {self._encoder}" if self._encoder else f"{self.fourcc}, OpenCV"
        self.fps = float(fps) if fps and fps > 0 else 30.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise SinkError(f"cannot write {path}: it is a folder; name a file such as {self.path / 'overlay.mp4'}")
        clean_stale_temps(self.path.parent)
        self.tmp = self.path.with_name(f"{temp_prefix(self.path.stem)}-{id(self):x}{self.path.suffix}")
        self._writer = None
        self._size: tuple[int, int] | None = None
        self.frames = 0
        self._lock = threading.Lock()

    def _open(self, w: int, h: int):
        if self._encoder:
            w, h = w - w % 2, h - h % 2
            try:
                writer = _AvWriter(self.tmp, H264_CONTAINERS[self.path.suffix.lower()], self._encoder, self.fps, (w, h))
            except Exception as e:  # an FFmpeg that refuses the options or the size
                _unlink(self.tmp)
                raise SinkError(f"cannot write {self.path}: the H.264 encoder did not start ({e}); use .avi (MJPG)") from None
            return writer, (w, h)
        writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (w, h))
        if not writer.isOpened():
            writer.release()
            _unlink(self.tmp)
            raise SinkError(f"cannot write {self.path}: OpenCV has no {self.fourcc} encoder for {self.path.suffix}; "
                            "use .mp4 or .avi (MJPG)")
        return writer, (w, h)

    def write(self, image, result=None) -> None:
        with self._lock:
            h, w = image.shape[:2]
            if self._writer is None:
                self._writer, self._size = self._open(w, h)
            if (w, h) != self._size:
                if w >= self._size[0] and h >= self._size[1] and (w - self._size[0], h - self._size[1]) <= (1, 1):
                    image = image[: self._size[1], : self._size[0]]  # the odd row or column H.264 cannot take
                else:
                    image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
            self._writer.write(np.ascontiguousarray(image))
            self.frames += 1

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
            if writer is None:
                return
            writer.release()
            if self.frames and self.tmp.exists():
                os.replace(self.tmp, self.path)
                log.info("wrote %s (%d frames, %s)", self.path, self.frames, self.codec)
            else:
                _unlink(self.tmp)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _write_image_atomic(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(path.suffix, image)
    if not ok:
        raise SinkError(f"cannot encode {path.suffix} images; use .jpg or .png")
    tmp = path.with_name(f"{temp_prefix()}{path.name}")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, path)


class ImageFolderSink(Sink):
    """One image per frame into a folder: under the frame's own file name when it was read from
    an image file (`frame_0042.png` in, `folder/frame_0042.png` out), else `000000.jpg`...; or
    numbered by a printf pattern such as `out/%05d.png`."""

    def __init__(self, target: str | os.PathLike, ext: str = ".jpg", start: int = 0):
        target = str(target)
        self.uri = target
        self.numbered = "%" in Path(target).name
        if self.numbered:
            self.folder, self.pattern = Path(target).parent, Path(target).name
            try:
                self.pattern % 0
            except (TypeError, ValueError):
                raise SinkError(f"bad image pattern {target}; use one integer field such as frame_%05d.png") from None
        else:
            ext = ext if ext.startswith(".") else "." + ext
            if ext.lower() not in IMAGE_SUFFIXES:
                raise SinkError(f"image folders take {IMAGE_SUFFIXES}, got {ext!r}")
            self.folder, self.pattern = Path(target), "%06d" + ext
        self.folder.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.folder)
        self.index = int(start)

    def _name(self, result) -> str:
        name = getattr(result, "frame_name", None)
        if name and not self.numbered:
            name = Path(name).name  # never a path: only a file name, inside this folder
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                name += ".png"  # an input OpenCV reads but cannot write (.ppm, .jp2 ...)
            if name not in ("", ".", ".."):
                return name
        return self.pattern % self.index

    def write(self, image, result=None) -> None:
        _write_image_atomic(self.folder / self._name(result), image)
        self.index += 1


class ImageFileSink(Sink):
    """One image file holding the latest frame (e.g. `--source photo.jpg --out result.png`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.uri = str(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.path.parent)

    def write(self, image, result=None) -> None:
        _write_image_atomic(self.path, image)


class ServerSink(Sink):
    """The browser view: publishes frames, and stats with the classes in view (label, RGB colour,
    share of the frame's pixels, largest first, as the legend shows them), to a
    runtime.server.FrameServer."""

    CLASSES_EVERY_S = 0.25  # counting a frame's classes costs about a millisecond at 720p

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, server=None, **server_opts):
        from runtime.server import FrameServer

        self.server = server if server is not None else FrameServer(host, port, **server_opts).start()
        self._own = server is None
        self.uri = self.server.url
        self.classes: list[dict] = []
        self._counted = float("-inf")

    def write(self, image, result=None) -> None:
        self.server.publish(image)
        now = time.monotonic()
        if isinstance(getattr(result, "class_map", None), np.ndarray) and now - self._counted >= self.CLASSES_EVERY_S:
            from runtime.legend import present_classes

            self._counted = now
            self.classes = [{"label": label, "color": list(rgb), "share": round(share, 4)}
                            for _, label, rgb, share in present_classes(result)]

    def publish_stats(self, summary: dict) -> None:
        self.server.publish_stats({**summary, "classes": self.classes})

    def close(self) -> None:
        if self._own:
            self.server.close()


def parse_host_port(spec: str | int, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'8080' -> (127.0.0.1, 8080); 'HOST:PORT'; '[::1]:8080'. Loopback unless a host is given."""
    s = str(spec).strip()
    if s.startswith("http://"):
        s = s[len("http://"):].rstrip("/")
    host, port = default_host, s
    if s.startswith("["):
        host, _, port = s[1:].partition("]")
        port = port.lstrip(":")
    elif ":" in s:
        host, _, port = s.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise SinkError(f"--serve expects HOST:PORT or PORT (e.g. 127.0.0.1:8080), got {spec!r}")
    return host or default_host, int(port)


def open_sink(uri, fps: float = 30.0, **opts) -> Sink:
    """A sink by URI or path (see the module docstring)."""
    if isinstance(uri, Sink):
        return uri
    s = os.fspath(uri) if isinstance(uri, os.PathLike) else str(uri)
    parsed = urlparse(s)
    scheme = parsed.scheme.lower() if len(parsed.scheme) > 1 else ""
    if scheme == "display":
        return DisplaySink(s, **opts)
    if scheme == "http":
        host, port = parse_host_port(parsed.netloc)
        return ServerSink(host, port, **opts)
    if scheme == "file":
        s = parsed.path
    elif scheme:
        raise SinkError(f"unknown sink {s!r}; use display://0, a video file (.mp4/.avi), an image folder or pattern, "
                        "an image file, or http://HOST:PORT")
    path = Path(os.path.expanduser(s))
    ext = path.suffix.lower()
    if ext in VIDEO_CODECS:
        return VideoSink(path, fps=fps, **opts)
    if "%" in path.name:
        return ImageFolderSink(path, **opts)
    if ext in IMAGE_SUFFIXES:
        return ImageFileSink(path)
    if s.endswith(("/", os.sep)) or path.is_dir() or not ext:
        return ImageFolderSink(path, **opts)
    raise SinkError(f"cannot tell what to write for {s!r}: use a video file (.mp4, .avi, .webm), an image file (.png/.jpg), "
                    "or a folder")


__all__ = ["Sink", "SinkError", "DisplaySink", "VideoSink", "ImageFolderSink", "ImageFileSink", "ServerSink",
           "open_sink", "display_available", "parse_host_port", "h264_encoder"]
