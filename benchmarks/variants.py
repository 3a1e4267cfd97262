"""The models the CPU benchmarks compare, and one bundle per model holding every CPU engine's FP32
and INT8 artifact, built with edgeseg's own converters (what a user gets from `edgeseg convert`).

    default      the embedded LR-ASPP MobileNetV3-Small, 256x256, trained: its mIoU means something
    default512   the same trained network at 512x512: a 512x512 mobile model whose mIoU is measured
    mobile512    LR-ASPP MobileNetV3-Large, 512x512, 21 classes, random weights (latency only)
    resnet       DeepLabV3+ ResNet-50, 512x512, 21 classes, random weights (latency only)

Latency does not depend on the weights; accuracy does, so random-weight models report agreement
with their FP32 model only.
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("default", "default512", "mobile512", "resnet")
ENGINES = ("onnxruntime", "openvino", "litert")
VARIANTS = tuple((e, p) for e in ENGINES for p in ("fp32", "int8"))


@dataclass
class Model:
    key: str
    label: str
    trained: bool
    net: object  # torch module
    input_size: tuple[int, int]
    labels: list[str] | None = None


def load_model(key: str) -> Model:
    import torch

    from edgeseg import models

    if key in ("default", "default512"):
        from edgeseg.train import DEFAULT_CHECKPOINT

        net, ckpt = models.load_checkpoint(DEFAULT_CHECKPOINT)
        size = (512, 512) if key == "default512" else tuple(ckpt["preprocess"]["size"])
        name = ckpt["arch"]["name"]
        return Model(key, f"{'default' if key == 'default' else 'default net'} ({name}, {size[0]}x{size[1]})", True, net.eval(), size,
                     list(ckpt["labels"]))
    torch.manual_seed(0)
    if key == "mobile512":
        return Model(key, "LR-ASPP MobileNetV3-Large (512x512, random weights)", False,
                     models.create("lraspp_mobilenetv3", num_classes=21).eval(), (512, 512))
    if key == "resnet":
        return Model(key, "DeepLabV3+ ResNet-50 (512x512, random weights)", False,
                     models.create("deeplabv3plus_resnet", num_classes=21).eval(), (512, 512))
    raise SystemExit(f"unknown model {key!r}; choose from {', '.join(MODELS)}")


def available_engines() -> list[str]:
    import importlib.util

    have = ["onnxruntime"]
    if importlib.util.find_spec("openvino") and importlib.util.find_spec("nncf"):
        have.append("openvino")
    if all(importlib.util.find_spec(m) for m in ("ai_edge_litert", "ai_edge_quantizer", "litert_torch")):
        have.append("litert")
    return have


def build_bundle(model: Model, out: Path, engines: list[str], calib_frames: int, eval_frames: int, say=print):
    """model.onnx + the ONNX Runtime `cpu` INT8 graph + OpenVINO FP32/INT8 IRs + LiteRT FP32/INT8,
    all calibrated on the same synthetic training frames through the bundle's Preprocess."""
    from calibration import CalibrationWarning, calibrate_bundle
    from converters.onnx import convert
    from edgeseg.bundle import Bundle

    calib = f"synthetic:train?n={calib_frames}"
    # accuracy is only meaningful for trained weights; for the others the INT8 tools keep every layer INT8
    budget = 0.5 if model.trained else 1e9
    evaluation = dict(eval_max_images=eval_frames if model.trained else 4)
    say(f"  {model.label}: ONNX")
    bundle = convert(model.net, out, input_size=model.input_size, labels=model.labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        say(f"  {model.label}: ONNX Runtime INT8 (cpu preset)")
        calibrate_bundle(bundle.path, calib, target="cpu", method="minmax", max_miou_drop=budget, sensitivity=False,
                         max_images=calib_frames, **evaluation)
        if "openvino" in engines:
            from converters.openvino import add_openvino

            say(f"  {model.label}: OpenVINO FP32, INT8 (NNCF)")
            add_openvino(bundle.path, "fp32")
            add_openvino(bundle.path, "int8", calib=calib, max_miou_drop=budget, max_images=calib_frames, **evaluation)
        if "litert" in engines:
            from converters.litert import add_litert

            say(f"  {model.label}: LiteRT FP32, INT8 (LiteRT quantizer)")
            add_litert(bundle.path, model.net, "int8", calib=calib, max_miou_drop=budget, max_images=calib_frames, **evaluation)
    return Bundle.load(bundle.path)


def open_engine(bundle, backend: str, precision: str, threads: int):
    from runtime.engines.registry import get_backend

    return get_backend(backend).engine_class().from_bundle(bundle, precision=precision, threads=threads)


def cpu_description() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "unknown")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    extras = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{model}; {os.cpu_count()} logical cores; {', '.join(extras) or 'no VNNI/BF16/AMX'}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"
