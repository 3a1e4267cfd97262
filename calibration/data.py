"""Calibration and evaluation frames: where they come from and how they reach the network.

A `FrameSource` opens what the user named — an image folder, a video, a dataset spec
(`synthetic:train?n=256`, `voc:/data/VOC2012`, an images/ + masks/ folder), a dataset reader
object, or arrays — and reads chosen frames from it. Sampling is deterministic: `sample_indices`
spreads the picks evenly over the source, so a video is covered from start to end and a run is
reproducible without a seed.

`CalibrationSet` is ONNX Runtime's `CalibrationDataReader` over such frames, each passed through
the bundle's `Preprocess.apply` — the runtime's own preprocessing, not a copy of it.

Every frame also gets a content hash, so evaluation can prove it never scores a calibration frame.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import parse_qsl

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgeseg import progress
from edgeseg.errors import EdgesegError, option
from edgeseg.spec import FrameError, Preprocess, check_frame

log = logging.getLogger("edgeseg.calibration")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv")
DATASET_KINDS = ("voc", "cityscapes", "camvid", "coco", "folder", "synthetic")
MIN_RECOMMENDED = 100  # fewer frames than this rarely cover the activation ranges a deployment sees
MAX_LISTED = 5  # offending files named in one error message


class CalibrationError(EdgesegError, ValueError):
    """Calibration or evaluation input that cannot be used; the message names the problem and the fix."""


class CalibrationWarning(UserWarning):
    """Calibration that runs but whose figures deserve caution (few frames, overlapping data)."""


# -- sampling ------------------------------------------------------------------------------
def sample_indices(total: int, k: int) -> list[int]:
    """`k` indices spread evenly over range(total): the centres of k equal segments (all when total <= k)."""
    if total <= 0 or k <= 0:
        return []
    if total <= k:
        return list(range(total))
    return sorted({int((j + 0.5) * total / k) for j in range(k)})


def frame_hash(frame: np.ndarray) -> str:
    """Content identity of a frame (shape + pixels)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(str(frame.shape).encode())
    h.update(np.ascontiguousarray(frame).tobytes())
    return h.hexdigest()


# -- sources -------------------------------------------------------------------------------
@dataclass
class Frame:
    index: int
    image: np.ndarray  # BGR uint8 HxWx3
    mask: np.ndarray | None
    name: str


@dataclass
class FrameSource:
    """Frames from one place. `read(indices)` yields them in ascending index order."""

    kind: str  # folder | video | dataset | arrays
    description: str
    length: int
    labelled: bool
    reader: Callable[[list[int]], Iterator[Frame]]
    key: str = ""  # identity of the source (same key = same frames)
    labels: list[str] | None = None
    ignore_index: int | None = 255
    spec: Any = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.length

    def read(self, indices: Sequence[int]) -> Iterator[Frame]:
        return self.reader(sorted(int(i) for i in indices))


def open_source(data: Any, *, split: str = "train", preprocess: Preprocess | None = None,
                default_n: int | None = None) -> FrameSource:
    """Open `data` as a FrameSource.

    data: a folder of images (or one with images/ + masks/: a labelled dataset), a video file, a
    dataset spec string (`synthetic:test?n=200`, `voc:/path`, ...), a dataset reader object
    (`len()`, `[i] -> image` or `(image, mask)`), an (N, H, W, 3) uint8 array or a list of frames.
    split: the split a spec without one uses. preprocess: gives generated (synthetic) frames the
    network's input size. default_n: number of generated frames when the spec gives no `n`.
    """
    if isinstance(data, FrameSource):
        return data
    if isinstance(data, np.ndarray):
        if data.ndim == 3:
            data = data[None]
        if data.ndim != 4:
            raise CalibrationError(f"frames as an array must be (N, H, W, 3) uint8 BGR, got shape {data.shape}")
        return _array_source(list(data), f"array of {len(data)} frames", key=f"array:{id(data)}")
    if isinstance(data, (list, tuple)) and data and all(isinstance(f, np.ndarray) for f in data):
        return _array_source(list(data), f"list of {len(data)} frames", key=f"list:{id(data)}")
    if isinstance(data, (str, os.PathLike)):
        return _open_path_or_spec(str(data), split, preprocess, default_n)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return _dataset_source(data, type(data).__name__, key=f"object:{id(data)}")
    if isinstance(data, (list, tuple)) and not data:
        raise CalibrationError("no calibration frames: the list is empty")
    raise CalibrationError(
        f"cannot read frames from a {type(data).__name__}; pass an image folder, a video file, a dataset spec "
        "such as synthetic:train, a dataset reader, or an (N, H, W, 3) uint8 array"
    )


def _open_path_or_spec(text: str, split: str, pre: Preprocess | None, default_n: int | None) -> FrameSource:
    text = text.strip()
    if not text:
        raise CalibrationError("empty data argument; pass an image folder, a video or a dataset spec (e.g. synthetic:train)")
    kind, sep, _ = text.partition(":")
    is_spec = text.lower() == "synthetic" or text.lower().startswith(("synthetic?", "synthetic:")) or (
        sep and kind.lower() in DATASET_KINDS and not Path(text).exists()
    )
    if is_spec:
        return _spec_source(text, split, pre, default_n)
    path = Path(text).expanduser()
    if not path.exists():
        raise CalibrationError(
            f"data not found: {path}; pass an image folder, a video file, or a dataset spec such as "
            "synthetic:train or voc:/path/to/VOC2012"
        )
    if path.is_dir():
        try:
            # images/ + masks/, at the top or per split (train/images, train/masks): a labelled dataset
            labelled = any((d / "images").is_dir() and (d / "masks").is_dir()
                           for d in [path, *(p for p in path.iterdir() if p.is_dir())])
        except PermissionError as e:
            raise CalibrationError(f"cannot read folder {path}: {e.strerror}; check its permissions") from None
        if labelled:
            return _spec_source(f"folder:{path}", split, pre, default_n)
        return _folder_source(path / "images" if (path / "images").is_dir() else path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return _video_source(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return _files_source([path], str(path), key=f"files:{path.resolve()}")
    raise CalibrationError(
        f"{path} is neither a folder of images nor a video ({', '.join(VIDEO_EXTENSIONS[:5])} ...); "
        "pass a folder of calibration frames or a video file"
    )


def _synthetic_parts(spec: str, split: str) -> tuple[str, dict]:
    rest = spec[len("synthetic"):].lstrip(":")
    split_part, _, query = rest.partition("?")
    return (split_part or split), dict(parse_qsl(query, keep_blank_values=True)) if query else {}


def _spec_source(spec: str, split: str, pre: Preprocess | None, default_n: int | None) -> FrameSource:
    from edgeseg.data import open_dataset

    kw = {}
    synthetic = spec.lower() == "synthetic" or spec.lower().startswith(("synthetic:", "synthetic?"))
    if synthetic:
        the_split, opts = _synthetic_parts(spec, split)
        # generated frames: the network's own input size unless the spec says otherwise
        if pre is not None and "size" not in opts:
            kw["size"] = tuple(pre.size)
        if default_n is not None and "n" not in opts:
            kw["length"] = int(default_n)
    try:
        ds = open_dataset(spec, split=split, **kw)
    except EdgesegError as e:
        raise CalibrationError(f"cannot open dataset {spec!r}: {e}") from None
    if synthetic:
        key = f"synthetic:{the_split}:seed={getattr(ds, 'seed', opts.get('seed', 0))}"
        desc = f"synthetic:{the_split} ({len(ds)} scenes of {ds.size[1]}x{ds.size[0]})"
    else:
        # readers without splits report split None: then every split name means the same files
        actual = getattr(ds, "split", split) if getattr(ds, "has_splits", True) else None
        key = f"dataset:{spec}:{actual}"
        desc = f"{spec}{f' [{actual}]' if actual else ''} ({len(ds)} samples)"
    return _dataset_source(ds, desc, key=key, spec=spec)


def _dataset_source(ds, description: str, key: str, spec=None) -> FrameSource:
    n = len(ds)
    if n == 0:
        raise CalibrationError(f"{description}: the dataset is empty")
    name = getattr(ds, "name", None)
    probe = ds[0]
    labelled = isinstance(probe, (tuple, list)) and len(probe) >= 2 and probe[1] is not None

    def reader(indices):
        for i in indices:
            try:
                item = ds[i]
            except EdgesegError as e:
                raise CalibrationError(f"{description}: sample {i}: {e}") from None
            img, mask = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
            label = name(i) if callable(name) else f"{description}[{i}]"
            yield Frame(i, _check(img, label), None if mask is None else np.asarray(mask), label)

    return FrameSource("dataset", description, n, labelled, reader, key=key, labels=list(getattr(ds, "labels", []) or []) or None,
                       ignore_index=getattr(ds, "ignore_index", 255), spec=spec)


def _array_source(frames: list[np.ndarray], description: str, key: str) -> FrameSource:
    if not frames:
        raise CalibrationError("no calibration frames: the array is empty")

    def reader(indices):
        for i in indices:
            yield Frame(i, _check(frames[i], f"frame {i}"), None, f"frame {i}")

    return FrameSource("arrays", description, len(frames), False, reader, key=key)


def _check(img, label: str) -> np.ndarray:
    try:
        return check_frame(img)
    except FrameError as e:
        raise CalibrationError(f"{label}: {e}") from None


def list_image_files(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, hidden entries skipped), sorted by relative path."""
    try:
        files = []
        for root, dirs, names in os.walk(folder, onerror=_raise_walk_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(Path(root) / n for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    except PermissionError as e:
        raise CalibrationError(f"cannot read folder {folder}: {e.strerror}; check its permissions") from None
    return sorted(files, key=lambda p: str(p.relative_to(folder)))


def _raise_walk_error(e: OSError):
    raise CalibrationError(f"cannot read folder {e.filename}: {e.strerror}; check its permissions")


def _folder_source(folder: Path) -> FrameSource:
    files = list_image_files(folder)
    if not files:
        try:
            present = sorted(p.name for p in folder.iterdir())[:MAX_LISTED]
        except OSError:
            present = []
        what = f" (it holds: {', '.join(present)})" if present else " (it is empty)"
        raise CalibrationError(
            f"no images in calibration folder {folder}{what}; put representative camera frames there "
            f"({', '.join(IMAGE_EXTENSIONS[:5])} ...), or pass a video or a dataset spec"
        )
    return _files_source(files, f"{folder} ({len(files)} images)", key=f"folder:{folder.resolve()}")


def read_frame_file(path: Path) -> np.ndarray:
    """Read an image file as a BGR uint8 frame, or raise a CalibrationError that names the file.

    The file is decoded as stored: calibration must see what the camera delivers, so greyscale,
    alpha and 16-bit files are refused rather than silently converted (each message gives the fix).
    """
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise CalibrationError(f"cannot decode {path}: the file is damaged or not an image; remove or re-export it")
    if img.dtype != np.uint8:
        raise CalibrationError(
            f"{path} has {img.dtype} pixels (e.g. a 16-bit PNG); calibration frames must be 8-bit like the frames "
            "the runtime sees: convert with cv2.convertScaleAbs(img, alpha=255 / img.max())"
        )
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels == 3:
        return img
    if channels == 4:
        raise CalibrationError(
            f"{path} has 4 channels (colour + alpha) but the model takes 3-channel BGR frames; what the alpha covers "
            "is undefined for the network: save the frames without alpha (cv2.cvtColor(img, cv2.COLOR_BGRA2BGR))"
        )
    raise CalibrationError(
        f"{path} has {channels} channel(s) but the model takes 3-channel colour frames; calibrate with frames like "
        "those the deployment feeds it. If the camera is greyscale, convert them exactly as the deployment does "
        "(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))"
    )


def _files_source(files: list[Path], description: str, key: str) -> FrameSource:
    def reader(indices):
        errors = []
        for i in indices:
            try:
                img = read_frame_file(files[i])
            except CalibrationError as e:
                errors.append(str(e))
                continue
            if not errors:
                yield Frame(i, _check(img, str(files[i])), None, str(files[i]))
        if errors:
            more = f" (and {len(errors) - MAX_LISTED} more)" if len(errors) > MAX_LISTED else ""
            raise CalibrationError(f"{len(errors)} unusable calibration image(s){more}:\n  " + "\n  ".join(errors[:MAX_LISTED]))

    return FrameSource("folder", description, len(files), False, reader, key=key, info={"files": files})


def _video_source(path: Path) -> FrameSource:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise CalibrationError(f"cannot open video {path}: the file is damaged or its codec is not supported by OpenCV's FFmpeg")
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    if count <= 0:  # some containers do not record a frame count: count by decoding
        while cap.grab():
            count += 1
    cap.release()
    if count == 0:
        raise CalibrationError(f"video {path} has no frames that OpenCV can decode")

    def reader(indices):
        cap = cv2.VideoCapture(str(path))
        wanted, pos = iter(indices), 0
        target = next(wanted, None)
        try:
            while target is not None:
                if not cap.grab():
                    break  # the recorded frame count overstated the stream: keep what was read
                if pos == target:
                    ok, frame = cap.retrieve()
                    if ok and frame is not None:
                        if frame.ndim == 2:
                            raise CalibrationError(f"video {path} decodes to single-channel frames; the model takes colour frames")
                        yield Frame(pos, _check(frame, f"{path} frame {pos}"), None, f"{path}#{pos}")
                    target = next(wanted, None)
                pos += 1
        finally:
            cap.release()

    return FrameSource("video", f"{path} ({count} frames)", count, False, reader, key=f"video:{path.resolve()}")


# -- the reader ONNX Runtime calibrates with -------------------------------------------------
class CalibrationSet(CalibrationDataReader):
    """Representative frames, preprocessed for the network, as ONNX Runtime's calibration reader.

        calib = CalibrationSet("frames/", bundle.manifest.preprocess, max_images=512)
        quantize_static(model, out, calib, ...)

    Frames are chosen with `sample_indices` (deterministic, spread over the source), read once,
    checked, and passed through `preprocess.apply`. `set_range` lets ONNX Runtime collect
    statistics chunk by chunk (bounded memory); `rewind` starts a new pass.
    """

    def __init__(self, data: Any, preprocess: Preprocess, *, input_name: str = "input", max_images: int = 512,
                 warn: bool = True):
        if int(max_images) < 1:
            raise CalibrationError(f"{option('max_images')} must be at least 1, got {max_images}")
        self.preprocess, self.input_name, self.max_images = preprocess, input_name, int(max_images)
        self.source = open_source(data, split="train", preprocess=preprocess, default_n=self.max_images)
        self.indices = sample_indices(len(self.source), self.max_images)
        self.inputs: list[np.ndarray] = []
        self.names: list[str] = []
        self.shapes: list[tuple[int, int]] = []
        self.masks: list[np.ndarray] | None = [] if self.source.labelled else None
        self._hashes: list[str] = []
        self.held_out = 0  # frames moved to the evaluation split by `hold_out`
        read = []
        for frame in progress.iterate(self.source.read(self.indices), "reading calibration frames", total=len(self.indices), unit="frames"):
            self._hashes.append(frame_hash(frame.image))
            self.names.append(frame.name)
            self.shapes.append(tuple(frame.image.shape[:2]))
            self.inputs.append(preprocess.apply(frame.image))
            read.append(frame.index)
            if self.masks is not None:
                self.masks.append(np.asarray(frame.mask))
        if not self.inputs:
            raise CalibrationError(f"no frames could be read from {self.source.description}")
        self.indices = read
        if warn:
            self.warn_if_few()
        self._start, self._end, self._pos = 0, len(self.inputs), 0

    def warn_if_few(self) -> None:
        if len(self.inputs) < MIN_RECOMMENDED:
            warnings.warn(
                f"calibrating with {len(self.inputs)} frames (fewer than {MIN_RECOMMENDED}): activation ranges may miss "
                "what the deployment sees; give more representative frames", CalibrationWarning, stacklevel=3,
            )

    @property
    def hashes(self) -> set[str]:
        """Content hashes of the frames calibration uses (evaluation must not score them)."""
        return set(self._hashes)

    def hold_out(self, k: int):
        """Move `k` frames, spread evenly over the ones read (deterministic: `sample_indices`), out of
        calibration into an `EvalSet` (masks kept when the source is labelled) and return it."""
        from calibration.evaluate import EvalSet

        n = len(self.inputs)
        if not 0 < k < n:
            raise CalibrationError(f"cannot hold out {k} of {n} calibration frames")
        out = set(sample_indices(n, k))
        pick = lambda xs, held: [x for i, x in enumerate(xs) if (i in out) == held]  # noqa: E731
        ev = EvalSet(pick(self.inputs, True), pick(self.masks, True) if self.masks is not None else None,
                     pick(self.shapes, True), pick(self.names, True),
                     f"{k} of {n} frames of {self.source.description}, held out from calibration (every {n / k:.1f}th)",
                     source_key=f"{self.source.key}:held-out", ignore_index=self.source.ignore_index,
                     dataset_labels=self.source.labels)
        for name in ("inputs", "names", "shapes", "_hashes", "indices"):
            setattr(self, name, pick(getattr(self, name), False))
        if self.masks is not None:
            self.masks = pick(self.masks, False)
        self.held_out = k
        self.rewind()
        return ev

    @classmethod
    def from_bundle(cls, bundle, data: Any, max_images: int = 512) -> "CalibrationSet":
        return cls(data, bundle.manifest.preprocess, input_name=bundle.manifest.input_name, max_images=max_images)

    @property
    def description(self) -> str:
        return self.source.description

    def unused_indices(self) -> list[int]:
        """Source indices not used for calibration (held-out frames of the same source)."""
        used = set(self.indices)
        return [i for i in range(len(self.source)) if i not in used]

    # CalibrationDataReader
    def get_next(self) -> dict | None:
        i = self._start + self._pos
        if i >= self._end:
            return None
        self._pos += 1
        return {self.input_name: self.inputs[i]}

    def rewind(self) -> None:
        self._start, self._end, self._pos = 0, len(self.inputs), 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._pos = max(0, int(start_index)), min(len(self.inputs), int(end_index)), 0

    def __len__(self) -> int:
        return len(self.inputs)

    def __repr__(self) -> str:
        return f"CalibrationSet({len(self)} frames from {self.description})"


__all__ = [
    "CalibrationError", "CalibrationWarning", "CalibrationSet", "Frame", "FrameSource", "open_source",
    "sample_indices", "frame_hash", "read_frame_file", "list_image_files", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS",
]
