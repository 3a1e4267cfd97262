"""Per-source results: recorded frame by frame where the frames are segmented, written where the
results folder is.

A worker turns each task's frames into a `part` (plain data: arrays, PNG bytes, RLE dicts and the
overlay video's bytes) with `FrameRecorder`; only data travels back, so workers need no access to
the results folder. `ResultStore` (on the machine running the command) writes each part
atomically under `.parts/`, and once every part of a source is there merges them into the
source's final files and writes `done.json` last:

    results/<key>/areas.parquet | areas.csv   frame, time_s, height, width, area:<label> ... (pixels)
                                              [, count:<label> ... objects, for instance bundles]
    results/<key>/masks/000000.png ...        --save-masks png: the class map, one 8-bit PNG per frame
                                              (instance bundles: 0 background, class c at c + 1)
    results/<key>/masks.json                  --save-masks rle: COCO results (image_id = frame), one
                                              entry per class present (instance bundles: per object,
                                              with its box and score)
    results/<key>/overlay.mp4                 --overlay
    results/<key>/done.json                   the source's signature, the options, frames, timings

A source whose `done.json` matches its file and the options is skipped by the next run; parts
already written are reused, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from edgeseg.files import atomic_path, clean_stale_temps, write_text_atomic
from edgeseg.cluster.plan import BatchError, OutputSpec, Source, Task
from edgeseg.errors import option

DONE = "done.json"
PARTS = ".parts"
MASK_NAME = "{:06d}.png"


# -- on the worker ---------------------------------------------------------------------------
class FrameRecorder:
    """Collects one task's per-frame outputs from the results a Segmenter streams."""

    def __init__(self, labels: list[str], spec: OutputSpec):
        self.labels, self.spec = list(labels), spec
        self.frames: list[int] = []
        self.times: list[float] = []
        self.sizes: list[tuple[int, int]] = []
        self.areas: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.masks: list = []

    def add(self, result) -> None:
        """One frame's SegmentationResult, or InstanceResult (whose class map has background 0 and
        class c at c + 1: its areas are counted per class, and its objects per class too)."""
        C = len(self.labels)
        instances = callable(result.class_map)
        cm = result.class_map() if instances else result.class_map
        self.frames.append(int(result.frame_index))
        self.times.append(float(result.timestamp) if result.timestamp is not None else float("nan"))
        self.sizes.append((int(cm.shape[0]), int(cm.shape[1])))
        first = 1 if instances else 0  # the class map's index of class 0
        pixels = np.bincount(cm.ravel(), minlength=C + first)
        self.areas.append(pixels[first:C + first].astype(np.int64))
        if instances:
            self.counts.append(np.bincount(result.class_id, minlength=C)[:C].astype(np.int64))
        if self.spec.masks == "png":
            ok, data = cv2.imencode(".png", np.ascontiguousarray(cm, np.uint8))
            if not ok:
                raise RuntimeError("OpenCV could not encode a PNG mask")
            self.masks.append(data.tobytes())
        elif self.spec.masks == "rle":
            self.masks.append(rle_objects(result) if instances else rle_encode(cm, int(result.frame_index), C))

    def part(self) -> dict:
        C = len(self.labels)
        return {
            "frame": np.asarray(self.frames, np.int64),
            "time_s": np.asarray(self.times, np.float64),
            "size": np.asarray(self.sizes, np.int32).reshape(-1, 2),
            "areas": np.asarray(self.areas, np.int64).reshape(-1, C),
            "counts": np.asarray(self.counts, np.int64).reshape(-1, C) if self.counts else None,
            "masks": self.masks if self.spec.masks else None,
        }


def _coco_mask():
    try:
        from pycocotools import mask as coco_mask
    except ImportError:
        raise BatchError(f"RLE masks need pycocotools: pip install pycocotools, or save PNG masks ({option('masks', '--save-masks', 'png')})") from None
    return coco_mask


def _rle(mask: np.ndarray, coco_mask) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_encode(class_map: np.ndarray, frame: int, num_classes: int) -> list[dict]:
    """COCO results entries (compressed RLE, pycocotools) for each class present in a class map."""
    coco_mask = _coco_mask()
    out = []
    counts = np.bincount(class_map.ravel(), minlength=num_classes)
    for c in np.nonzero(counts[:num_classes])[0]:
        out.append({"image_id": int(frame), "category_id": int(c), "area": int(counts[c]),
                    "segmentation": _rle(class_map == c, coco_mask)})
    return out


def rle_objects(result) -> list[dict]:
    """COCO results entries for each object of an InstanceResult: its mask, box (x, y, w, h), score."""
    coco_mask = _coco_mask()
    out = []
    for i in range(len(result)):
        x0, y0, x1, y1 = (float(v) for v in result.xyxy[i])
        out.append({"image_id": int(result.frame_index), "category_id": int(result.class_id[i]),
                    "score": float(result.confidence[i]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(np.count_nonzero(result.mask_crops[i])), "segmentation": _rle(result.mask(i), coco_mask)})
    return out


# -- where the results folder is -------------------------------------------------------------
class ResultStore:
    """The results folder of one batch run (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, spec: OutputSpec, labels: list[str]):
        self.root, self.spec, self.labels = Path(root), spec, list(labels)
        if self.root.exists() and not self.root.is_dir():
            raise BatchError(f"{option('out')} {self.root} is a file; batch results go into a folder such as results/")
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = spec.key()

    def folder(self, source: Source) -> Path:
        p = (self.root / source.key).resolve()
        if not p.is_relative_to(self.root.resolve()):  # keys come from relative paths; never write outside
            raise BatchError(f"source {source.path} maps outside the results folder")
        return p

    def _part_dir(self, task: Task) -> Path:
        return self.folder(task.source) / PARTS / self.key / task.name

    # -- state ---------------------------------------------------------------------------
    def done(self, source: Source) -> dict | None:
        """The source's done.json when it matches the file and these options, else None."""
        path = self.folder(source) / DONE
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(info, dict) or info.get("spec_key") != self.key or info.get("signature") != source.signature:
            return None
        if not all((self.folder(source) / name).exists() for name in self._final_names()):
            return None
        return info

    def part_done(self, task: Task) -> bool:
        return (self._part_dir(task) / "part.json").is_file()

    # -- writing -------------------------------------------------------------------------
    def write_part(self, task: Task, part: dict, overlay: bytes | None, info: dict) -> None:
        """One task's outputs, written into a temporary folder and renamed into place."""
        clean_stale_temps(self._part_dir(task).parent)  # what a killed run was writing
        with atomic_path(self._part_dir(task)) as tmp:
            tmp.mkdir()
            arrays = {k: part[k] for k in ("frame", "time_s", "size", "areas")}
            if part.get("counts") is not None:
                arrays["counts"] = part["counts"]
            np.savez(tmp / "table.npz", **arrays)
            if self.spec.masks == "png":
                (tmp / "masks").mkdir()
                for frame, data in zip(part["frame"], part["masks"]):
                    (tmp / "masks" / MASK_NAME.format(int(frame))).write_bytes(data)
            elif self.spec.masks == "rle":
                with open(tmp / "masks.jsonl", "w") as fh:
                    for entries in part["masks"]:
                        fh.write(json.dumps(entries) + "\n")
            if self.spec.overlay:
                if overlay:
                    (tmp / "overlay.mp4").write_bytes(overlay)
            (tmp / "part.json").write_text(json.dumps(info, default=str))

    def finish(self, source: Source, tasks: list[Task], extra: dict | None = None) -> dict:
        """Merge a source's parts into its final files (each atomically), then write done.json."""
        folder = self.folder(source)
        parts = [self._part_dir(t) for t in sorted(tasks, key=lambda t: t.start)]
        missing = [str(t) for t, p in zip(tasks, parts) if not (p / "part.json").is_file()]
        if missing:
            raise BatchError(f"cannot finish {source.key}: parts {missing} are missing")
        tables = [dict(np.load(p / "table.npz")) for p in parts]
        table = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
        infos = [json.loads((p / "part.json").read_text()) for p in parts]
        clean_stale_temps(folder)
        self._remove_other_outputs(folder)
        name = self._table_name()
        with atomic_path(folder / name) as tmp:
            write_table(tmp, table, self.labels)
        if self.spec.masks == "png":
            with atomic_path(folder / "masks") as tmp:
                tmp.mkdir()
                for p in parts:
                    for f in sorted((p / "masks").iterdir()):
                        _link_or_copy(f, tmp / f.name)
        elif self.spec.masks == "rle":
            with atomic_path(folder / "masks.json") as tmp:
                with open(tmp, "w") as out:
                    out.write("[")
                    first = True
                    for p in parts:
                        for line in open(p / "masks.jsonl"):
                            for entry in json.loads(line):
                                out.write(("" if first else ",\n") + json.dumps(entry))
                                first = False
                    out.write("]\n")
        if self.spec.overlay:
            videos = [p / "overlay.mp4" for p in parts if (p / "overlay.mp4").exists()]
            if len(videos) > 1:
                raise BatchError(f"{source.key}: an overlay is written per source; it cannot be split into ranges")
            if videos:
                with atomic_path(folder / "overlay.mp4") as tmp:
                    _link_or_copy(videos[0], tmp)
        frames = int(table["frame"].size)
        info = {
            "source": source.path, "key": source.key, "signature": source.signature, "spec_key": self.key,
            "spec": {k: v for k, v in self.spec.__dict__.items()}, "frames": frames,
            "tasks": [{"start": t.start, "stop": t.stop, **i} for t, i in zip(sorted(tasks, key=lambda t: t.start), infos)],
            "outputs": self._final_names(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(extra or {}),
        }
        write_text_atomic(folder / DONE, json.dumps(info, indent=2, default=str) + "\n")
        shutil.rmtree(folder / PARTS, ignore_errors=True)
        return info

    def _table_name(self) -> str:
        return f"areas.{self.spec.table}"

    def _final_names(self) -> list[str]:
        names = [self._table_name()]
        if self.spec.masks == "png":
            names.append("masks")
        elif self.spec.masks == "rle":
            names.append("masks.json")
        return names

    def _remove_other_outputs(self, folder: Path) -> None:
        """Outputs an earlier run with other options left (another table format, masks, overlay)."""
        keep = set(self._final_names()) | ({"overlay.mp4"} if self.spec.overlay else set())
        for name in ("areas.parquet", "areas.csv", "masks", "masks.json", "overlay.mp4", DONE):
            p = folder / name
            if name in keep or not p.exists():
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def write_summary(self, summary: dict) -> Path:
        clean_stale_temps(self.root)
        path = self.root / "summary.json"
        write_text_atomic(path, json.dumps(summary, indent=2, default=str) + "\n")
        return path


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (instant, and the part keeps its file until the merge is complete), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# -- tables ----------------------------------------------------------------------------------
def table_columns(table: dict, labels: list[str]) -> dict[str, np.ndarray]:
    cols = {"frame": table["frame"], "time_s": table["time_s"], "height": table["size"][:, 0], "width": table["size"][:, 1]}
    for i, label in enumerate(labels):
        cols[f"area:{label}"] = table["areas"][:, i]
    if table.get("counts") is not None:
        for i, label in enumerate(labels):
            cols[f"count:{label}"] = table["counts"][:, i]
    return cols


def write_table(path: Path, table: dict, labels: list[str]) -> None:
    """Parquet (pyarrow) or CSV, by the path's suffix."""
    cols = table_columns(table, labels)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(cols), path)
        return
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for row in zip(*cols.values()):
            w.writerow([repr(float(v)) if isinstance(v, np.floating) else int(v) for v in row])


def read_table(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A per-frame table written by a batch run, as columns (NumPy arrays)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return {k: np.asarray(v) for k, v in pq.read_table(path).to_pydict().items()}
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    head, body = rows[0], rows[1:]
    return {h: np.array([float(r[i]) if h == "time_s" else int(r[i]) for r in body]) for i, h in enumerate(head)}


__all__ = ["FrameRecorder", "ResultStore", "rle_encode", "rle_objects", "write_table", "read_table", "table_columns", "DONE"]
