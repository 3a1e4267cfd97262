"""What runs where the frames are segmented: a `SegmenterWorker` holds one `Segmenter` (the bundle
opened once) and turns tasks (a video, or a range of its frames) into result parts.

The same class runs in the command's own process (no `--cluster`) and inside a Ray actor, where
the bundle arrives as bytes (`pack_bundle`) instead of a path: workers need no shared disk for
it. Nothing here imports ray or torch.

Workers unpack into `scratch_dir` folders: named after their process (`edgeseg.files`), removed
by `close()`, and, when a worker was killed before it could, by the next worker that starts on
that machine.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import cv2

from edgeseg.bundle import MANIFEST, Bundle, BundleError
from edgeseg.cluster.outputs import FrameRecorder
from edgeseg.cluster.plan import OutputSpec, Task
from edgeseg.errors import EdgesegError, SourceError
from edgeseg.files import clean_stale_temps, make_temp_dir
from runtime.sources import VideoFileSource

log = logging.getLogger("edgeseg.cluster")


def scratch_dir(tag: str) -> Path:
    """A new folder of this process in the system's temporary folder, after removing those that
    workers (or runs) gone from this machine left there: a killed worker cannot clean up itself."""
    clean_stale_temps(tempfile.gettempdir())
    return make_temp_dir(tempfile.gettempdir(), tag)


# -- the bundle, as bytes ------------------------------------------------------------------------
def pack_bundle(bundle: Bundle) -> bytes:
    """manifest.json and every artifact it lists (files or package folders), as one zip."""
    root = bundle.path.resolve()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.write(root / MANIFEST, MANIFEST)
        for art in bundle.manifest.artifacts:
            p = bundle.artifact_path(art).resolve()  # refuses a path that leaves the bundle
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
            for f in files:
                z.write(f, f.relative_to(root).as_posix())
    return buf.getvalue()


def unpack_bundle(blob: bytes, dest: Path) -> Path:
    """Extract a packed bundle into `dest` (names that would leave it are refused)."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        for name in z.namelist():
            p = PurePosixPath(name)
            if p.is_absolute() or ".." in p.parts:
                raise BundleError(f"packed bundle holds an unsafe name {name!r}")
        z.extractall(dest)
    return dest


# -- sources: a range of a video's frames ----------------------------------------------------------
class VideoRange(VideoFileSource):
    """Frames [start, stop) of a video file, with their indices and timestamps in the whole file.

    OpenCV's FFmpeg reader seeks to the keyframe before `start` and decodes forward to it, so the
    frames equal those of a read from the beginning (the tests check it on split videos)."""

    def __init__(self, path: str, start: int = 0, stop: int | None = None, uri: str | None = None):
        super().__init__(uri or path, path)
        self.start, self.stop = int(start), None if stop is None else int(stop)
        if self.start:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, self.start)
            self.frames_read = self.start  # Source._frame numbers frames from here

    def read(self):
        if self.stop is not None and self.frames_read >= self.stop:
            return None
        return super().read()


# -- the worker ------------------------------------------------------------------------------------
class SegmenterWorker:
    """One Segmenter and the tasks it runs. bundle: a path, or the bytes of `pack_bundle`.
    options: Segmenter keywords (backend, precision, smoothing, keep, ignore, threshold, threads).
    stream_options: Segmenter.stream keywords that do not change results (stage_nice)."""

    def __init__(self, bundle, options: dict | None = None, stream_options: dict | None = None):
        t0 = time.perf_counter()
        self._tmp = None
        if isinstance(bundle, (bytes, bytearray, memoryview)):
            self._tmp = scratch_dir("bundle")
            bundle = unpack_bundle(bytes(bundle), self._tmp / "bundle")
        from runtime.segmenter import Segmenter

        self.segmenter = Segmenter(bundle, **(options or {}))
        self.stream_options = dict(stream_options or {})
        self.labels = list(self.segmenter.labels)
        self.pid, self.host = os.getpid(), socket.gethostname()
        self.startup_s = time.perf_counter() - t0
        self.tasks = 0

    def info(self) -> dict:
        s = self.segmenter
        return {"pid": self.pid, "host": self.host, "backend": s.backend, "precision": s.precision,
                "startup_s": round(self.startup_s, 3)}

    def process(self, task: Task, spec: OutputSpec, video: bytes | None = None) -> dict:
        """Segment the task's frames. Returns {"part", "overlay", "info"}, or {"error"} for input
        that cannot be used (retrying would not help). video: the file's bytes when the source
        is not on this machine's disk."""
        t0 = time.perf_counter()
        workdir = make_temp_dir(tempfile.gettempdir(), "task")
        try:
            path = task.source.path
            if video is not None:
                path = str(workdir / Path(task.source.path).name)
                Path(path).write_bytes(video)
            elif not os.path.isfile(path):
                return {"error": f"{path} is not on {self.host}: mount the videos at the same path on every machine, "
                                 "or have them shipped with the tasks", "not_here": True}
            try:
                src = VideoRange(path, task.start, task.stop, uri=task.source.path)
            except SourceError as e:
                return {"error": str(e)}
            recorder = FrameRecorder(self.labels, spec)
            overlay = workdir / "overlay.mp4" if spec.overlay else None
            setup = time.perf_counter() - t0
            try:
                with self.segmenter.stream(src, save=overlay, alpha=spec.alpha, mode=spec.mode, legend=spec.legend, **self.stream_options) as stream:
                    for result in stream:
                        recorder.add(result)
            except EdgesegError as e:
                return {"error": str(e)}
            finally:
                src.close()
            part = recorder.part()
            seconds = time.perf_counter() - t0
            self.tasks += 1
            info = {**self.info(), "frames": int(part["frame"].size), "seconds": round(seconds, 4),
                    "setup_s": round(setup, 4), "corrupt": src.corrupt}
            data = overlay.read_bytes() if overlay is not None and overlay.exists() else None
            return {"part": part, "overlay": data, "info": info}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def close(self) -> None:
        seg, self.segmenter = getattr(self, "segmenter", None), None
        if seg is not None:
            seg.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


__all__ = ["SegmenterWorker", "VideoRange", "pack_bundle", "unpack_bundle", "scratch_dir"]
