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
