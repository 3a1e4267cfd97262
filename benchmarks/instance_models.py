"""The zoo's instance models side by side in one run: Mask R-CNN (two-stage) and yoloseg
(one-stage), ONNX Runtime on this CPU, same input size, same frames.

Each model is a checkpoint from `edgeseg train` (or, without one, the architecture freshly
initialised: the graphs have fixed shapes, so the engine's work is the same whatever the weights,
except the NMS inside Mask R-CNN, whose cost follows how many boxes score above its threshold -
the output says which models were trained). Each is exported to ONNX with its outputs in its
instance layout, simplified with onnxsim, and timed:

* engine-only: `infer` on one preprocessed synthetic scene (sessions without spinning workers, so
  neither takes the cores from the other between runs), interleaved rounds (both models see the
  same background load), median ms over rounds, and FPS = 1000 / ms;
* engine + post-processing: the same plus the runtime's `InstancePostprocessor` to an
  `InstanceResult` at frame size (for yoloseg's raw layout, NMS and mask assembly happen there; for
  Mask R-CNN the graph already did them and the boxes' masks are pasted).

    python benchmarks/instance_models.py --maskrcnn runs/maskrcnn.pt --yoloseg runs/yoloseg.pt
    python benchmarks/instance_models.py --size 128 128 --threads 2 --rounds 9 --json instance.json

This script imports torch (to export the models); the runtime it measures does not.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from variants import cpu_description, load_average  # noqa: E402

# what each architecture is built with when no checkpoint is given
FRESH = {"maskrcnn_resnet": {"preset": "compact"}, "yoloseg": {}}


def load(name: str, checkpoint: str | None, num_classes: int):
    """(model in eval mode, labels, trained?) for an architecture or its checkpoint."""
    import torch

    from edgeseg import models

    if checkpoint and checkpoint != "fresh":
        model, ckpt = models.load_checkpoint(checkpoint)
        if model.edgeseg_arch["name"] != name:
            raise SystemExit(f"{checkpoint} holds a {model.edgeseg_arch['name']}, not a {name}")
        return model, list(ckpt["labels"]), True
    if name not in models.available():
        return None, None, False
    torch.manual_seed(0)
    model = models.create(name, num_classes=num_classes, **FRESH.get(name, {})).eval()
    return model, [f"class_{i}" for i in range(num_classes)], False


def export(model, path: Path, size) -> None:
    """ONNX with the outputs named by the model's instance layout (TorchScript exporter: the zoo's
    detection ops have symbolics for it), simplified."""
    import onnx
    import onnxsim
    import torch

    names = list(model.instance_layout()["outputs"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, *size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=names)
    simplified, ok = onnxsim.simplify(onnx.load(str(path)))
    if ok:
        onnx.save(simplified, str(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maskrcnn", help="Mask R-CNN checkpoint (default: the compact preset, freshly initialised)")
    ap.add_argument("--yoloseg", help="yoloseg checkpoint (default: freshly initialised, when the zoo has it)")
    ap.add_argument("--size", nargs=2, type=int, default=(128, 128), metavar=("H", "W"), help="input size of both models")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--runs", type=int, default=10, help="infers per round")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)

    import torch

    from edgeseg.data import SyntheticInstances
    from edgeseg.spec import Preprocess
    from runtime.engines.onnxruntime import OnnxRuntimeEngine
    from runtime.instance_postprocess import InstancePostprocessor

    torch.set_num_threads(max(1, args.threads))
    size = tuple(args.size)
    pre = Preprocess(size=size)
    frames = [SyntheticInstances(size=size, length=4, split="test")[i][0] for i in range(4)]
    inputs = [pre.apply(f) for f in frames]
    nc = len(SyntheticInstances.labels)
    runners, notes = {}, {}
    tmp = tempfile.TemporaryDirectory(prefix="edgeseg-instance-bench-")
    for name, ckpt in (("maskrcnn_resnet", args.maskrcnn), ("yoloseg", args.yoloseg)):
        model, labels, trained = load(name, ckpt, nc)
        if model is None:
            notes[name] = "not in this installation's zoo: not measured"
            continue
        path = Path(tmp.name) / f"{name}.onnx"
        t0 = time.perf_counter()
        export(model, path, size)
        # no spinning: two sessions' idle workers would otherwise take the cores from each other's runs
        engine = OnnxRuntimeEngine(path, threads=args.threads, spinning=False)
        palette = [[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256] for i in range(len(labels))]
        post = InstancePostprocessor(labels, palette, pre, model.instance_layout())
        runners[name] = (engine, post)
        notes[name] = (f"{'trained: ' + ckpt if trained else 'freshly initialised'}; "
                       f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; exported in "
                       f"{time.perf_counter() - t0:.0f} s")

    def engine_only(name, i):
        runners[name][0].infer(inputs[i % len(inputs)])

    def with_post(name, i):
        engine, post = runners[name]
        post(engine.infer(inputs[i % len(inputs)]), frames[i % len(frames)].shape[:2])

    steps = {"engine": engine_only, "engine+post": with_post}
    for name in runners:  # warm-up: first runs allocate and tune
        for i in range(10):
            with_post(name, i)
    times = {(label, name): [] for label in steps for name in runners}
    for _ in range(args.rounds):  # both models and both measures in every round: the same background load
        for name in runners:
            for label, step in steps.items():
                t0 = time.perf_counter()
                for i in range(args.runs):
                    step(name, i)
                times[label, name].append((time.perf_counter() - t0) / args.runs * 1e3)
    results = {label: {name: statistics.median(times[label, name]) for name in runners} for label in steps}
    tmp.cleanup()

    print(f"CPU: {cpu_description()}; ONNX Runtime, {args.threads} threads; input {size[0]}x{size[1]}; "
          f"load average {load_average()}")
    for name, note in notes.items():
        print(f"  {name}: {note}")
    print(f"{'model':<18}{'engine ms':>10}{'FPS':>8}{'engine+post ms':>16}{'FPS':>8}")
    for name in runners:
        e, p = results["engine"][name], results["engine+post"][name]
        print(f"{name:<18}{e:>10.2f}{1e3 / e:>8.1f}{p:>16.2f}{1e3 / p:>8.1f}")
    if len(runners) == 2:
        m, y = results["engine"]["maskrcnn_resnet"], results["engine"]["yoloseg"]
        print(f"Mask R-CNN engine time / yoloseg engine time: {m / y:.2f}x (same run, same input size)")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "threads": args.threads, "notes": notes, "ms": results,
                                               "load_average": load_average()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
