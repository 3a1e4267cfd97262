"""`import edgeseg` and the whole runtime stay free of torch: a device app ships without it."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CHECK = """
import sys
{imports}
heavy = sorted(m for m in ("torch", "torchvision", "coremltools", "onnxsim") if m in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize("imports", [
    "import edgeseg; edgeseg.Preprocess; edgeseg.Bundle",
    "import runtime, runtime.engines, runtime.engines.onnxruntime",
    "import runtime.segmenter, runtime.sources, runtime.sinks, runtime.pipeline, runtime.postprocess, runtime.stats, runtime.server",
    "import edgeseg.cli, edgeseg.commands.run, edgeseg.commands.inspect",
    "import edgeseg.data, edgeseg.metrics",
])
def test_no_torch(imports):
    out = subprocess.run([sys.executable, "-c", CHECK.format(imports=imports)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{imports!r} imported {out.stdout.strip()}"


def test_runtime_source_never_mentions_torch():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "runtime").rglob("*.py") if "import torch" in p.read_text()]
    assert offenders == []


# -- layers: the runtime opens what a bundle holds, the layers above build it -------------------------
FORBIDDEN = ("converters", "calibration", "torch", "onnxsim", "edgeseg.data.synthetic", "edgeseg.models", "edgeseg.train")

LAYER_CHECK = """
import sys
{code}
bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {forbidden!r}))
print(",".join(bad))
"""

CPU_RUN = """
import numpy as np
from runtime.segmenter import Segmenter
seg = Segmenter({bundle!r}, backend="onnxruntime")
frame = np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)
r = seg.segment(frame)
assert r.class_map.shape == (120, 160)
for _ in seg.stream({folder!r}, max_frames=3):
    pass
"""


def _forbidden_imports(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", LAYER_CHECK.format(code=code, forbidden=FORBIDDEN)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_tensorrt_engine_module_imports_no_converter():
    assert _forbidden_imports("import runtime.engines.tensorrt, runtime.cuda.kernels, runtime.engines") == ""


def test_cpu_runtime_run_imports_no_converter(default_bundle, tmp_path):
    import cv2
    import numpy as np

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((90, 120, 3), 40 * i, np.uint8))
    assert _forbidden_imports(CPU_RUN.format(bundle=str(default_bundle.path), folder=str(folder))) == ""


def _imported_modules(path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_runtime_module_imports_converters_or_calibration():
    """The layers point one way: converters and calibration use the runtime, never the reverse
    (so there is no import cycle between them)."""
    offenders = {}
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        bad = sorted(m for m in _imported_modules(path) if m.split(".")[0] in ("converters", "calibration", "torch", "onnxsim"))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_the_walk_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from converters.tensorrt import build_engine\n    import calibration.data\n")
    assert {"converters.tensorrt", "calibration.data"} <= _imported_modules(probe)
