"""A bundle: one folder with `manifest.json` and the artifacts it lists.

The runtime needs nothing else to run a bundle: labels, palette, preprocessing, output kind and
each artifact's backend, precision, checksum and measured parity all live in the manifest.

A bundle is a file people pass around, so nothing in it is trusted:
- the manifest is read bounded (size, nesting), as strict JSON, and validated against the
  published schema (edgeseg/schema/manifest.schema.json); every problem is a BundleError that
  names the field, the bad value and the fix;
- every artifact is a plain relative path that resolves inside the folder (no absolute path, no
  `..`, no symlink leading out), is a regular file or a folder of them, and carries a sha256
  that `artifact_path` checks before anything opens it.

Writing: every write is atomic (`edgeseg.files.atomic_path`), and every command that writes a
bundle holds its lock (`Bundle.writing` / `write_lock`): it re-reads the manifest under the lock,
so two writers never drop each other's artifacts; stale temporaries of killed writers go then.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgeseg import schema
from edgeseg.errors import EdgesegError
from edgeseg.files import (UnsafePathError, atomic_path, check_tree, clean_stale_temps, contained, make_temp_dir,
                           read_bounded, relative_path_problem, sha256_file, strip_local_paths, write_text_atomic)
from edgeseg.spec import Preprocess

log = logging.getLogger("edgeseg.bundle")

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# the vocabularies come from the published schema, the one place they are defined
TASKS = schema.enum("task")
OUTPUT_KINDS = schema.enum("output_kind")
BACKENDS = schema.enum("backend")  # == runtime.engines.registry.backend_names() (tested)
PRECISIONS = schema.enum("precision")
MAX_MANIFEST_BYTES = 8 << 20  # calibrated bundles with reports in `metrics` stay far below
MAX_DEPTH = 64
LOCK_TIMEOUT_S = 600.0
FIX = "fix the field or re-create the bundle with `edgeseg convert`"


def backend_names() -> tuple[str, ...]:
    """The artifact backends a manifest may name: runtime.engines.registry's table (imported late:
    the registry is data only, but runtime.engines imports this module's neighbours)."""
    from runtime.engines.registry import backend_names as names

    return names()


class BundleError(EdgesegError, ValueError):
    """A bundle that cannot be read or used; the message names the file and the fix."""


# -- manifest --------------------------------------------------------------------------------
@dataclass
class Artifact:
    """One compiled form of the model inside the bundle."""

    path: str  # relative to the bundle folder
    backend: str  # a name in runtime.engines.registry: onnxruntime | tensorrt | coreml | openvino | litert
    precision: str  # fp32 | fp16 | int8 | int8-weights | palettize4 | w8a8 ...
    sha256: str = ""
    parity: dict[str, Any] = field(default_factory=dict)  # measured against the source model
    metrics: dict[str, Any] = field(default_factory=dict)  # accuracy on held-out data, sizes ...
    target: str | None = None  # quantization target (tensorrt | cpu), engine key, deployment target
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Artifact":
        missing = {"path", "backend", "precision"} - set(d)
        if missing:
            raise BundleError(f"artifact entry {d} lacks {sorted(missing)}")
        if d["backend"] not in backend_names():
            raise BundleError(f"artifact {d['path']!r} names backend {d['backend']!r}, which this edgeseg does not know "
                              f"(known: {', '.join(backend_names())}); upgrade edgeseg or re-create the bundle")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Manifest:
    labels: list[str]
    palette: list[list[int]]  # RGB per class
    preprocess: Preprocess
    input_name: str = "input"
    output_name: str = "logits"
    output_kind: str = "logits"  # logits | probs | mask | instances
    input_shape: list[Any] = field(default_factory=list)  # ints, or strings for dynamic axes
    output_shape: list[Any] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    task: str = "semantic-segmentation"  # | instance-segmentation
    model: dict[str, Any] = field(default_factory=dict)  # name, architecture, source sha256 ...
    # instance-segmentation: the outputs' layout (edgeseg.instance_layout.InstanceLayout as a dict)
    instances: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    edgeseg_version: str = ""
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if not self.labels:
            raise BundleError("a manifest needs at least one label")
        if len(self.palette) != len(self.labels):
            raise BundleError(f"palette has {len(self.palette)} colours for {len(self.labels)} labels; give one [R, G, B] per label")
        if self.output_kind not in OUTPUT_KINDS:
            raise BundleError(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if self.task not in TASKS:
            raise BundleError(f"task must be one of {TASKS}, got {self.task!r}")
        if (self.task == "instance-segmentation") != (self.output_kind == "instances"):
            raise BundleError(f"task {self.task!r} does not go with output_kind {self.output_kind!r}: "
                              "instance-segmentation bundles have output_kind 'instances', semantic ones logits, probs or mask")
        if self.task == "instance-segmentation":
            from edgeseg.instance_layout import InstanceLayout, LayoutError

            try:
                layout = InstanceLayout.from_dict(self.instances)
            except LayoutError as e:
                raise BundleError(str(e)) from None
            if layout.num_classes != len(self.labels):
                raise BundleError(f"instances.num_classes is {layout.num_classes} but there are {len(self.labels)} labels")
            self.instances = layout.to_dict()
        elif self.instances is not None:
            raise BundleError("only instance-segmentation bundles have an 'instances' layout")
        mismatch = _shape_mismatch(self.input_shape, self.preprocess.input_shape)
        if mismatch:
            raise BundleError(f"input_shape {self.input_shape} does not fit preprocess (size {list(self.preprocess.size)}, "
                              f"layout {self.preprocess.layout}: {list(self.preprocess.input_shape)}): {mismatch}")
        if not self.edgeseg_version:
            from edgeseg import __version__

            self.edgeseg_version = __version__
        if not self.created:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "Manifest":
        """A Manifest from parsed JSON, validated against the schema first (BundleError naming
        the field, the value and the fix)."""
        check_manifest_data(d, where)
        d = dict(d)
        try:
            d["preprocess"] = Preprocess.from_dict(d["preprocess"])
            d["artifacts"] = [Artifact.from_dict(a) for a in d.get("artifacts", [])]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in d.items() if k in known})
        except BundleError as e:
            raise BundleError(f"{where}: {e}; {FIX}") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"{where}: invalid field: {e}; {FIX}") from None


def _shape_mismatch(shape: list, expected: tuple) -> str | None:
    """Why a manifest shape (ints, or names for dynamic axes) cannot be `expected`, or None.
    The batch axis and named axes match anything; an empty shape is not stated."""
    if not shape:
        return None
    if len(shape) != len(expected):
        return f"{len(shape)} dimensions instead of {len(expected)}"
    for axis, (got, want) in enumerate(zip(shape, expected)):
        if axis and isinstance(got, int) and got != want:
            return f"dimension {axis} is {got}, preprocessing makes {want}"
    return None


def check_manifest_data(d: Any, where: str = "manifest") -> None:
    """Raise BundleError unless `d` (parsed JSON) is a manifest this edgeseg reads: bounded nesting,
    finite numbers only, the supported schema_version, and valid against the published schema."""
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(d).__name__}; {FIX}")
    for parts, value in schema.walk(d):
        if len(parts) > MAX_DEPTH:
            raise BundleError(f"{where}: {schema.json_path(parts[:MAX_DEPTH])}...: nested deeper than {MAX_DEPTH} levels; {FIX}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BundleError(f"{where}: {schema.json_path(parts)} = {value}: JSON has no NaN or Infinity (Swift's and C++'s "
                              f"parsers refuse them); write null or a finite number, or {FIX}")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{where}: schema_version {version!r} is not supported by this edgeseg (expects {SCHEMA_VERSION}); "
            "re-create the bundle with `edgeseg convert` or upgrade edgeseg"
        )
    found = schema.problems(d, backends=backend_names())
    if found:
        more = f" (and {len(found) - 1} more problem{'s' if len(found) > 2 else ''})" if len(found) > 1 else ""
        raise BundleError(f"{where}: {found[0]}{more}; {FIX}")
    labels, palette = d["labels"], d["palette"]
    if len(palette) != len(labels):
        raise BundleError(f"{where}: $.palette has {len(palette)} colours for {len(labels)} labels; give one [R, G, B] per label; {FIX}")


def _json_ready(x):
    """Non-finite floats (a parity ratio over zero ...) become null: a manifest is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# -- bundles ---------------------------------------------------------------------------------
class Bundle:
    """A bundle folder. `Bundle.load(path)` validates; `Bundle.create(...)` starts a new one;
    `with Bundle.writing(path) as b:` changes one under its lock."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest
        self._verified: dict[str, tuple] = {}  # artifact path -> stat of the file whose checksum matched

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        """Read and validate a bundle. verify: also check that every artifact is present, inside
        the folder and a plain file or folder (checksums are checked when an artifact is opened)."""
        path = Path(path)
        if path.name == MANIFEST and not path.is_dir():
            path = path.parent
        mpath = path / MANIFEST
        if not path.exists():
            raise BundleError(f"bundle not found: {path}; create one with `edgeseg convert MODEL --out {path}`")
        if not path.is_dir():
            raise BundleError(f"{path} is not a bundle folder; pass the folder `edgeseg convert` wrote")
        if not os.path.lexists(mpath):
            raise BundleError(f"{path} is not a bundle: no {MANIFEST} inside; create one with `edgeseg convert`")
        try:
            contained(path, MANIFEST, "the manifest")
            raw = read_bounded(mpath, MAX_MANIFEST_BYTES, "the manifest")
        except UnsafePathError as e:
            raise BundleError(f"{path}: {e}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is damaged, re-create it with `edgeseg convert`") from None
        except RecursionError:
            raise BundleError(f"{mpath} is nested too deeply to be a manifest; re-create it with `edgeseg convert`") from None
        bundle = cls(path, Manifest.from_dict(data, where=str(mpath)))
        if verify:
            for art in bundle.manifest.artifacts:
                bundle._locate(art)
        return bundle

    def _locate(self, art: Artifact) -> tuple[Path, os.stat_result]:
        """The artifact's path, checked to be inside the bundle and a plain file or folder."""
        what = f"artifact {art.path!r}"
        try:
            p = contained(self.path, art.path, "artifact")
            return p, check_tree(p, what)
        except UnsafePathError as e:
            raise BundleError(f"{self.path / MANIFEST}: {e}") from None

    def artifact_path(self, art: Artifact) -> Path:
        """The artifact's file, once it is known to be safe to open: inside the bundle, a plain
        file or folder, and matching the manifest's sha256 (checked once per file version)."""
        p, st = self._locate(art)
        if not art.sha256:
            raise BundleError(f"{self.path / MANIFEST}: artifact {art.path!r} has no sha256, so it cannot be checked; "
                              "re-create it with `edgeseg convert` / `edgeseg build`")
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if not p.is_dir() else None
        if key is None or self._verified.get(art.path) != key:
            try:
                digest = sha256_file(p)
            except UnsafePathError as e:
                raise BundleError(f"{self.path / MANIFEST}: artifact {art.path!r}: {e}") from None
            if digest != art.sha256:
                raise BundleError(
                    f"{p} does not match the checksum in the manifest; "
                    "the file was changed or damaged: re-create it with `edgeseg convert`/`edgeseg build`"
                )
            if key is not None:
                self._verified[art.path] = key
        return p

    def verify_artifact(self, art: Artifact) -> None:
        self.artifact_path(art)

    def find(self, backend: str | None = None, precision: str | None = None, target: str | None = None) -> list[Artifact]:
        return [
            a
            for a in self.manifest.artifacts
            if (backend is None or a.backend == backend)
            and (precision is None or a.precision == precision)
            and (target is None or a.target == target)
        ]

    def select(self, backend: str, precision: str | None = None, target: str | None = None) -> Artifact:
        """The artifact for a backend (default precision: the most accurate available).

        Among equals, the one quantized for this backend's hardware wins: ONNX Runtime prefers
        the `cpu` INT8 graph to the `tensorrt` one, which runs slower on a CPU."""
        found = self.find(backend, precision, target)
        if not found:
            have = ", ".join(f"{a.backend}/{a.precision}" for a in self.manifest.artifacts) or "none"
            want = f"{backend}/{precision}" if precision else backend
            raise BundleError(f"bundle {self.path} has no {want} artifact (it has: {have})")
        order = ["fp32", "fp16", "int8"]
        from runtime.engines.registry import get_backend

        preferred = get_backend(backend).quant_target if backend in backend_names() else None
        return sorted(found, key=lambda a: (order.index(a.precision) if a.precision in order else len(order),
                                            a.target not in (None, preferred)))[0]

    # -- writing ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, manifest: Manifest) -> "Bundle":
        b = cls(path, manifest)
        b.path.mkdir(parents=True, exist_ok=True)
        return b

    @classmethod
    @contextlib.contextmanager
    def writing(cls, path: str | os.PathLike, timeout: float | None = None) -> Iterator["Bundle"]:
        """Change a bundle under its exclusive lock:

            with Bundle.writing("bundle") as b:     # b: the manifest as it is now on disk
                with atomic_path(b.path / "model.xml") as tmp: ...
                b.add_artifact(Artifact("model.xml", "openvino", "int8"))
                b.save()

        The manifest is re-read once the lock is held, so what another writer added meanwhile is
        kept. A second writer waits (saying so) up to `timeout` seconds, then fails clearly."""
        with write_lock(path, timeout):
            yield cls.load(path)

    def staging_dir(self, tag: str) -> Path:
        """A temporary folder inside the bundle for work that is moved in at the end (removed by
        the next write if this process dies first)."""
        clean_stale_temps(self.path)
        return make_temp_dir(self.path, tag)

    def add_artifact(self, art: Artifact, replace: bool = True) -> Artifact:
        """Record an artifact whose file is already in place; its checksum is computed here."""
        p = self.path / art.path
        why = relative_path_problem(art.path)
        if why:
            raise BundleError(f"cannot add artifact {art.path!r}: {why}")
        if not p.exists():
            raise BundleError(f"cannot add artifact {art.path}: {p} does not exist")
        p, _ = self._locate(art)
        art.sha256 = sha256_file(p)
        if replace:
            self.manifest.artifacts = [a for a in self.manifest.artifacts if a.path != art.path]
        self.manifest.artifacts.append(art)
        return art

    def save(self) -> None:
        """Write the manifest (atomically), checked against the schema first: a writer cannot
        produce a bundle that readers would refuse. Absolute paths of this machine (a checkpoint,
        calibration frames) are cut to their names: the manifest travels."""
        d = strip_local_paths(_json_ready(self.manifest.to_dict()), skip=("labels",))  # it travels
        check_manifest_data(d, where=f"manifest for {self.path}")
        write_text_atomic(self.path / MANIFEST, json.dumps(d, indent=2, allow_nan=False) + "\n")

    def __repr__(self) -> str:
        arts = ", ".join(f"{a.backend}/{a.precision}" for a in self.manifest.artifacts)
        return f"Bundle({str(self.path)!r}, classes={self.manifest.num_classes}, artifacts=[{arts}])"


# -- one writer at a time --------------------------------------------------------------------
_lock_guard = threading.Lock()


@contextlib.contextmanager
def write_lock(path: str | os.PathLike, timeout: float | None = None) -> Iterator[Path]:
    """Hold the exclusive write lock of the bundle (or future bundle) at `path`, then remove stale
    temporaries of killed writers in it and beside it. Re-entrant within a thread.

    The lock file, `.<name>.edgeseg-lock`, sits beside the bundle rather than inside: converting
    into an existing bundle replaces the whole folder, and a lock inside would go with it. The OS
    releases it when its process dies, so a killed writer never blocks the next one."""
    from filelock import FileLock, Timeout

    real = Path(path).expanduser().absolute()
    real = real.parent.resolve() / real.name
    real.parent.mkdir(parents=True, exist_ok=True)
    lock_file = real.parent / f".{real.name}.edgeseg-lock"
    timeout = LOCK_TIMEOUT_S if timeout is None else float(timeout)
    with _lock_guard:  # one FileLock object per file: it counts re-entries per thread
        lock = FileLock(str(lock_file), is_singleton=True)
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("%s is being written by another edgeseg command; waiting for it to finish (up to %.0f s)", real, timeout)
            lock.acquire(timeout=timeout)
    except Timeout:
        raise BundleError(f"{real} is still being written by another edgeseg command after {timeout:.0f} s "
                          f"(lock {lock_file}); wait for it to finish and try again") from None
    except OSError as e:
        raise BundleError(f"cannot lock {real} for writing ({lock_file}: {e.strerror or e}); "
                          "the folder must be writable by this user") from None
    try:
        clean_stale_temps(real.parent)
        if real.is_dir():
            clean_stale_temps(real)
        yield real
    finally:
        lock.release()


def default_palette(n: int) -> list[list[int]]:
    """Distinct RGB colours (PASCAL VOC's bit-interleaved palette; class 0 black)."""
    out = []
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out
