"""What a batch run has to do: the sources a pattern names, the tasks they split into, and the
output options that decide whether earlier results can be reused.

    sources = find_sources("archive/**/*.mp4")     # [Source(path, key, size, mtime_ns, frames)]
    tasks = plan_tasks(sources, chunk_frames=3000)  # one per video, or one per range of a long one

A source's `key` is its path relative to the pattern's fixed part (`archive/`), so results land
under the same tree (`results/cam1/day1.mp4/`). Nothing here imports ray or torch.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2

from edgeseg.errors import EdgesegError, option
from runtime.sources import VIDEO_EXTENSIONS

TABLE_FORMATS = ("parquet", "csv")
MASK_FORMATS = ("png", "rle")


class BatchError(EdgesegError, ValueError):
    """Batch input or options that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class Source:
    """One video of the batch. `frames` is the container's count (an estimate: the last range of
    a split video always reads to the end)."""

    path: str
    key: str
    size: int
    mtime_ns: int
    frames: int | None = None
    fps: float | None = None

    @property
    def signature(self) -> dict:
        """What identifies this file's content well enough to reuse its results."""
        return {"size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Task:
    """Frames [start, stop) of one source (stop None: to the end)."""

    source: Source
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        return f"{self.start:09d}-{'end' if self.stop is None else f'{self.stop:09d}'}"

    def __str__(self) -> str:
        if self.start == 0 and self.stop is None:
            return self.source.key
        return f"{self.source.key} [{self.start}:{'' if self.stop is None else self.stop}]"


@dataclass(frozen=True)
class OutputSpec:
    """What a batch writes per source, and everything that changes those results. Results made
    with another spec are not reused (`key()` differs)."""

    table: str = "parquet"
    masks: str | None = None  # png | rle
    overlay: bool = False
    max_frames: int | None = None  # per source
    alpha: float = 0.5
    mode: str = "blend"
    legend: bool = False
    segmenter: dict = field(default_factory=dict)  # backend, precision, smoothing, keep, ignore, threshold
    bundle_sha256: str = ""

    def __post_init__(self):
        if self.table not in TABLE_FORMATS:
            raise BatchError(f"{option('table')} takes {' or '.join(TABLE_FORMATS)}, got {self.table!r}")
        if self.masks is not None and self.masks not in MASK_FORMATS:
            raise BatchError(f"{option('masks', '--save-masks')} takes {' or '.join(MASK_FORMATS)}, got {self.masks!r}")
        if self.max_frames is not None and (isinstance(self.max_frames, bool) or int(self.max_frames) <= 0):
            raise BatchError(f"{option('max_frames', '--frames')} (frames per source) must be a positive number, got {self.max_frames!r}")
        if self.table == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise BatchError(f"Parquet tables need pyarrow: pip install 'edgeseg[cluster]', or write CSV ({option('table', value='csv')})") from None

    def key(self) -> str:
        """A short hash of the options that change results or their files."""
        d = asdict(self)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- sources ---------------------------------------------------------------------------------
def _fixed_part(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard (`archive/**/*.mp4` -> `archive`)."""
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if any(ch in p for ch in "*?["):
            break
        fixed.append(p)
    base = Path(*fixed) if fixed else Path(".")
    return base if len(fixed) < len(parts) else base.parent


def find_sources(pattern: str | os.PathLike | list) -> list[Source]:
    """The videos a glob (`**` recurses), a folder (recursively) or a video file names, in path
    order; several patterns may be given as a list. Keys are unique relative paths."""
    if isinstance(pattern, (list, tuple)):
        found: dict[str, Source] = {}
        for p in pattern:
            for s in find_sources(p):
                if s.key in found and found[s.key].path != s.path:
                    raise BatchError(f"{s.path} and {found[s.key].path} would share the results folder {s.key!r}; "
                                     "give one pattern with a common folder instead")
                found[s.key] = s
        if not found:
            raise BatchError("no sources given")
        return sorted(found.values(), key=lambda s: s.key)
    text = os.path.expanduser(os.fspath(pattern)).strip()
    if not text:
        raise BatchError(f"{option('sources', '--source')} is empty; name a video, a folder of videos or a pattern such as 'archive/**/*.mp4'")
    if "://" in text and not text.startswith("file://"):
        raise BatchError(f"batch runs take video files, not streams ({text}); a stream is one source: run it with "
                         "`edgeseg run BUNDLE --source URL`")
    text = text[len("file://"):] if text.startswith("file://") else text
    if any(ch in text for ch in "*?[") and not os.path.exists(text):
        base = _fixed_part(text)
        paths = [Path(p) for p in globlib.glob(text, recursive=True) if os.path.isfile(p)]
        where = f"the pattern {text!r}"
    elif os.path.isdir(text):
        base = Path(text)
        paths = [p for p in Path(text).rglob("*") if p.is_file()]
        where = f"the folder {text}"
    elif os.path.isfile(text):
        base = Path(text).parent
        paths = [Path(text)]
        where = text
    else:
        raise BatchError(f"no such file or folder: {text}; pass a video, a folder of videos or a quoted pattern such as 'archive/**/*.mp4'")
    videos = sorted(p for p in paths if p.suffix.lower() in VIDEO_EXTENSIONS)
    if not videos:
        other = f" ({len(paths)} other files)" if paths else ""
        raise BatchError(f"{where} matches no video files{other}; batch runs read {', '.join(VIDEO_EXTENSIONS[:6])} ... "
                         "(quote the pattern so the shell does not expand it)")
    out = []
    for p in videos:
        st = p.stat()
        key = p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name
        out.append(Source(str(p), key, st.st_size, st.st_mtime_ns, *_probe(p)))
    return out


def _probe(path: Path) -> tuple[int | None, float | None]:
    """Frame count and rate from the container (no decoding)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            return None, None
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = cap.get(cv2.CAP_PROP_FPS)
        return (n if n > 0 else None), (float(fps) if fps and 0 < fps < 1000 else None)
    finally:
        cap.release()


# -- tasks -----------------------------------------------------------------------------------
def plan_tasks(sources: list[Source], chunk_frames: int | None = None, max_frames: int | None = None) -> list[Task]:
    """One task per source; with `chunk_frames`, a video longer than that splits into ranges of
    that many frames (the last one reads to the end, so an inexact container count loses
    nothing). `max_frames` caps each source."""
    if chunk_frames is not None and (isinstance(chunk_frames, bool) or int(chunk_frames) <= 0):
        raise BatchError(f"{option('chunk_frames')} must be a positive number of frames, got {chunk_frames!r}")
    tasks = []
    for s in sources:
        n = s.frames if max_frames is None else min(s.frames or max_frames, max_frames)
        end = max_frames  # None: to the end of the file
        if not chunk_frames or n is None or n <= chunk_frames:
            tasks.append(Task(s, 0, end))
            continue
        starts = list(range(0, n, int(chunk_frames)))
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else end
            tasks.append(Task(s, start, stop))
    return tasks


__all__ = ["Source", "Task", "OutputSpec", "BatchError", "find_sources", "plan_tasks", "TABLE_FORMATS", "MASK_FORMATS"]
