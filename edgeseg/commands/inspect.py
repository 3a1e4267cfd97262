"""edgeseg inspect PATH — a bundle, an ONNX file or a checkpoint: what it is and whether it deploys."""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from edgeseg.errors import EdgesegError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="bundle folder, .onnx file or edgeseg checkpoint")
    p.add_argument("--json", action="store_true", help="print the manifest / facts as JSON")


def run(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise EdgesegError(f"nothing to inspect at {path}")
    if path.is_dir() or path.name == "manifest.json":
        return _bundle(path, args.json)
    if path.suffix.lower() == ".onnx":
        facts = onnx_facts(path)
        print(json.dumps(facts, indent=2) if args.json else _format_onnx(facts))
        return 0 if not facts["preflight"] else 1
    return _checkpoint(path, args.json)


def _bundle(path: Path, as_json: bool) -> int:
    from edgeseg.bundle import Bundle
    from edgeseg.commands.convert import describe_artifact

    bundle = Bundle.load(path)
    m = bundle.manifest
    if as_json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    print(f"bundle {bundle.path}  (schema {m.schema_version}, edgeseg {m.edgeseg_version}, created {m.created})")
    print(f"  model     {m.model.get('name', '?')}  source sha256 {str(m.model.get('source_sha256', ''))[:12]}")
    print(f"  labels    {', '.join(m.labels)}")
    pre = m.preprocess
    print(f"  input     {m.input_name} {m.input_shape}  ({pre.dtype}, {pre.color.upper()}, {pre.resize}, mean {pre.mean}, std {pre.std})")
    print(f"  output    {m.output_name} {m.output_shape}  ({m.output_kind})")
    print("  artifacts")
    for art in m.artifacts:
        print("    " + describe_artifact(art))
    status = 0
    onnx_art = bundle.find("onnxruntime", "fp32")
    if onnx_art:
        problems = onnx_facts(bundle.artifact_path(onnx_art[0]))["preflight"]
        print(f"  TensorRT preflight: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"    - {p}")
        status = 1 if problems else 0
    return status


def onnx_facts(path: Path) -> dict:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EdgesegError(f"{path} is not a readable ONNX file: {e}") from None
    ops = collections.Counter(n.op_type for n in m.graph.node)

    def io(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]}

    try:
        from converters.tensorrt import preflight

        problems = [str(p) for p in preflight(m) if p.severity == "error"]
    except ImportError:
        problems = []
    return {
        "path": str(path), "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "inputs": [io(v) for v in m.graph.input], "outputs": [io(v) for v in m.graph.output],
        "nodes": len(m.graph.node), "ops": dict(ops.most_common()), "preflight": problems,
        "metadata": {p.key: p.value for p in m.metadata_props},
    }


def _format_onnx(f: dict) -> str:
    lines = [f"onnx {f['path']}  opset {f['opset']}  {f['nodes']} nodes"]
    for kind in ("inputs", "outputs"):
        for v in f[kind]:
            lines.append(f"  {kind[:-1]:<6} {v['name']} {v['shape']} {v['dtype']}")
    lines.append("  ops    " + ", ".join(f"{k}×{v}" for k, v in f["ops"].items()))
    lines.append(f"  TensorRT preflight: {'ok' if not f['preflight'] else ''}")
    lines += [f"    - {p}" for p in f["preflight"]]
    return "\n".join(lines)


def _checkpoint(path: Path, as_json: bool) -> int:
    from edgeseg.models import read_checkpoint

    ckpt = read_checkpoint(path)
    facts = {k: ckpt.get(k) for k in ("arch", "labels", "preprocess")}
    facts["parameters"] = int(sum(v.numel() for v in ckpt["state_dict"].values()))
    extra = ckpt.get("extra") or {}
    if "test" in extra:
        facts["held_out_miou"] = extra["test"].get("miou")
    if as_json:
        print(json.dumps(facts, indent=2))
    else:
        print(f"checkpoint {path}")
        for k, v in facts.items():
            print(f"  {k:<14} {v}")
    return 0
