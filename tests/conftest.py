"""Shared fixtures; hardware markers skip with the reason when the hardware is missing."""
from __future__ import annotations

import importlib.util
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cuda_reason() -> str | None:
    if importlib.util.find_spec("pycuda") is None:
        return "pycuda is not installed (needs an NVIDIA GPU and the CUDA toolkit)"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device"
    except Exception as e:
        return f"CUDA unusable: {e}"
    return None


def _tensorrt_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (its builder is not installable here: pip install 'edgeseg[tensorrt]' on a GPU machine)"
    import tensorrt

    if not hasattr(tensorrt, "Builder"):
        return "only TensorRT's lean runtime is installed; building engines needs the full tensorrt package"
    return _cuda_reason()


def pytest_collection_modifyitems(config, items):
    reasons = {}
    for item in items:
        for marker, probe in (("gpu", _cuda_reason), ("tensorrt", _tensorrt_reason),
                              ("macos", lambda: None if platform.system() == "Darwin" else "CoreML predict needs macOS")):
            # the marker itself, not `item.keywords`: those also hold folder names (a checkout in gpu/)
            if item.get_closest_marker(marker) is not None:
                if marker not in reasons:
                    reasons[marker] = probe()
                if reasons[marker]:
                    item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture
def one_torch_thread():
    """torch on one thread for tiny ops: on a loaded 2-core machine, thread hand-offs cost more."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (torch) and its checkpoint dict."""
    from edgeseg.models import load_checkpoint
    from edgeseg.train import DEFAULT_CHECKPOINT

    return load_checkpoint(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory):
    """A bundle converted from the default model (ONNX fp32), shared by the session's tests."""
    from converters.onnx import convert

    out = tmp_path_factory.mktemp("bundles") / "default"
    return convert("default", out)


def outlier_model(default_model, scale: float = 300.0):
    """The default model with one head channel scaled up `scale` times and the next layer's weights
    for that channel scaled down: the same function, but one activation channel dwarfs the rest,
    as happens in real networks. Per-tensor activation ranges then crush the other channels."""
    import copy

    import torch

    from edgeseg.data.synthetic import SyntheticScenes
    from edgeseg.spec import Preprocess

    model = copy.deepcopy(default_model[0]).eval()
    bn, relu_out = model.cbr[1], {}
    hook = model.cbr.register_forward_hook(lambda m, i, o: relu_out.__setitem__("y", o))
    pre = Preprocess.from_dict(default_model[1]["preprocess"])
    scenes = SyntheticScenes(size=pre.size, length=4, split="val")
    with torch.no_grad():
        model(torch.from_numpy(pre.apply_batch([scenes[i][0] for i in range(4)])))
    hook.remove()
    c = int(relu_out["y"].mean((0, 2, 3)).argmax())  # a channel that is alive on real frames
    with torch.no_grad():
        bn.weight[c] *= scale  # ReLU(s*z) = s*ReLU(z) for s > 0: the channel grows s times
        bn.bias[c] *= scale
        model.high_classifier.weight[:, c] /= scale  # ... and the consumer undoes it
    return model, c
