"""A bundle: one folder with `manifest.json` and the artifacts it lists.

The runtime needs nothing else to run a bundle: labels, palette, preprocessing, output kind and
each artifact's backend, precision, checksum and measured parity all live in the manifest.
Every write is atomic (temporary file or folder, then `os.replace`), so a crash never leaves a
half-written manifest, engine or package behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgeseg.errors import EdgesegError
from edgeseg.spec import Preprocess

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
OUTPUT_KINDS = ("logits", "probs", "mask", "instances")
TASKS = ("semantic-segmentation", "instance-segmentation")


def backend_names() -> tuple[str, ...]:
    """The artifact backends a manifest may name: runtime.engines.registry's table (imported late:
    the registry is data only, but runtime.engines imports this module's neighbours)."""
    from runtime.engines.registry import backend_names as names

    return names()


class BundleError(EdgesegError, ValueError):
    """A bundle that cannot be read or used; the message names the file and the fix."""


# -- atomic file helpers ---------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file in a folder (sorted relative paths + contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success move it into place, on error remove it.

    Works for files and folders (e.g. an .mlpackage): a half-built artifact never appears at `dest`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp = tmpdir / (dest.name + suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise BundleError(f"nothing was written for {dest}")
        if dest.is_dir() and not dest.is_symlink():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())


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
            raise BundleError(f"palette has {len(self.palette)} colours for {len(self.labels)} labels")
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
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{where}: schema_version {version!r} is not supported by this edgeseg (expects {SCHEMA_VERSION}); "
                "re-create the bundle with `edgeseg convert` or upgrade edgeseg"
            )
        for key in ("labels", "palette", "preprocess"):
            if key not in d:
                raise BundleError(f"{where}: missing required field {key!r}; re-create the bundle with `edgeseg convert`")
        d = dict(d)
        try:
            d["preprocess"] = Preprocess.from_dict(d["preprocess"])
            d["artifacts"] = [Artifact.from_dict(a) for a in d.get("artifacts", [])]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in d.items() if k in known})
        except BundleError as e:
            raise BundleError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"{where}: invalid field: {e}") from None


class Bundle:
    """A bundle folder. `Bundle.load(path)` validates; `Bundle.create(...)` starts a new one."""

    def __init__(self, path: str | os.PathLike, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        path = Path(path)
        if path.is_file() and path.name == MANIFEST:
            path = path.parent
        mpath = path / MANIFEST
        if not path.exists():
            raise BundleError(f"bundle not found: {path}; create one with `edgeseg convert MODEL --out {path}`")
        if not mpath.is_file():
            raise BundleError(f"{path} is not a bundle: no {MANIFEST} inside; create one with `edgeseg convert`")
        try:
            data = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is damaged, re-create it with `edgeseg convert`") from None
        bundle = cls(path, Manifest.from_dict(data, where=str(mpath)))
        if verify:
            for art in bundle.manifest.artifacts:
                p = bundle.path / art.path
                if not p.exists():
                    raise BundleError(f"{mpath}: artifact {art.path} is listed but missing from the bundle")
        return bundle

    def artifact_path(self, art: Artifact) -> Path:
        return self.path / art.path

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

    def verify_artifact(self, art: Artifact) -> None:
        if art.sha256 and sha256_file(self.artifact_path(art)) != art.sha256:
            raise BundleError(
                f"{self.artifact_path(art)} does not match the checksum in the manifest; "
                "the file was changed or damaged: re-create it with `edgeseg convert`/`edgeseg build`"
            )

    # -- writing ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, manifest: Manifest) -> "Bundle":
        b = cls(path, manifest)
        b.path.mkdir(parents=True, exist_ok=True)
        return b

    def add_artifact(self, art: Artifact, replace: bool = True) -> Artifact:
        """Record an artifact whose file is already in place; its checksum is computed here."""
        p = self.artifact_path(art)
        if not p.exists():
            raise BundleError(f"cannot add artifact {art.path}: {p} does not exist")
        art.sha256 = sha256_file(p)
        if replace:
            self.manifest.artifacts = [a for a in self.manifest.artifacts if a.path != art.path]
        self.manifest.artifacts.append(art)
        return art

    def save(self) -> None:
        write_text_atomic(self.path / MANIFEST, json.dumps(self.manifest.to_dict(), indent=2) + "\n")

    def __repr__(self) -> str:
        arts = ", ".join(f"{a.backend}/{a.precision}" for a in self.manifest.artifacts)
        return f"Bundle({str(self.path)!r}, classes={self.manifest.num_classes}, artifacts=[{arts}])"


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
