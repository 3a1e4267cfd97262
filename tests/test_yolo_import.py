"""ONNX files in the Ultralytics YOLO-seg layout convert into instance bundles from their metadata
and run. The fixture is built here in exactly that layout (output0 (1, 4 + nc + 32, anchors) with
cx, cy, w, h; output1 (1, 32, H/4, W/4); names / imgsz / task / stride metadata written as
Ultralytics writes them): its outputs are the known objects of one scene, so the run has an exact
answer. Hostile metadata is refused, never evaluated."""
from __future__ import annotations

import numpy as np
import pytest

from edgeseg.errors import ConversionError
from tests.instance_fixtures import yolo_outputs

IMGSZ = (256, 320)
NAMES = "{0: 'ball', 1: 'box', 2: 'triangle', 3: 'star'}"


def write_yolo_seg(path, pred, protos, **meta):
    """A graph returning `pred` and `protos` for any input (ReduceMean(input) * 0 ties them to it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H, W = IMGSZ
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),
        helper.make_node("Add", ["pred_c", "z"], ["output0"]),
        helper.make_node("Add", ["protos_c", "z"], ["output1"]),
    ]
    inits = [numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(pred.astype(np.float32), "pred_c"),
             numpy_helper.from_array(protos.astype(np.float32), "protos_c")]
    graph = helper.make_graph(nodes, "yolo-seg", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, H, W])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(pred.shape)),
                               helper.make_tensor_value_info("output1", TensorProto.FLOAT, list(protos.shape))], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    props = {"description": "Ultralytics YOLO11n-seg model", "author": "Ultralytics", "task": "segment", "stride": "32",
             "batch": "1", "imgsz": str(list(IMGSZ)), "names": NAMES, **meta}
    for k, v in props.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))
    return path


@pytest.fixture
def scene():
    from edgeseg.data.synthetic import SyntheticInstances
    from edgeseg.spec import Preprocess

    img, ann = SyntheticInstances(size=(360, 640), length=3, split="test")[2]
    pre = Preprocess(size=IMGSZ, resize="letterbox", mean=(0, 0, 0), std=(1, 1, 1), pad_value=114)
    pred, protos = yolo_outputs(ann, pre, img.shape[:2], stride=4, num_masks=32, num_classes=4)
    return img, ann, pred, protos


def test_yolo_seg_onnx_converts_and_runs(scene, tmp_path):
    from converters.onnx import convert
    from runtime.segmenter import Segmenter

    img, ann, pred, protos = scene
    assert pred.shape[1] == 4 + 4 + 32 and protos.shape[1] == 32
    b = convert(write_yolo_seg(tmp_path / "yolo11n-seg.onnx", pred, protos), tmp_path / "bundle")
    m = b.manifest
    assert m.labels == ["ball", "box", "triangle", "star"]  # from the metadata
    assert m.task == "instance-segmentation" and m.instances["layout"] == "yolo"
    assert m.instances["outputs"] == {"predictions": "output0", "protos": "output1"} and m.instances["num_masks"] == 32
    assert (m.preprocess.resize, m.preprocess.pad_value, m.preprocess.size) == ("letterbox", 114, IMGSZ)
    assert m.preprocess.mean == (0.0, 0.0, 0.0) and m.preprocess.std == (1.0, 1.0, 1.0)
    assert m.artifacts[0].parity["ok"]
    with Segmenter(b.path, track=False) as seg:
        r = seg.segment(img)
    # each object found once (the shifted duplicates removed by NMS), its class and mask recovered
    assert len(r) == len(ann)
    from edgeseg.instance_metrics import InstanceEvaluator

    ev = InstanceEvaluator(m.labels)
    ev.add(r, ann)
    assert ev.summary()["mask"]["AP50"] > 0.99


@pytest.mark.parametrize("meta, message", [
    ({"names": "__import__('os').system('touch /tmp/pwned')"}, "not a Python literal"),
    ({"names": "{0: 'ball'}"}, "do not fit the model"),
    ({"names": "{1: 'a', 2: 'b', 3: 'c', 4: 'd'}"}, "ids 0..3"),
    ({"names": "{0: 'a\\nb', 1: 'b', 2: 'c', 3: 'd'}"}, "one-line string"),
    ({"names": "[" * 200 + "]" * 200}, "name"),
    ({"names": "{0: " + "'x' * 9" + "}"}, "not a Python literal"),
    ({"imgsz": "[640]"}, "imgsz"),
    ({"imgsz": "[256, 320, 3]"}, "imgsz"),
    ({"imgsz": "[512, 640]"}, "imgsz means"),
    ({"task": "detect"}, "segmentation models"),
    ({"stride": "lambda: 0"}, "stride"),
    ({"names": "x" * 2_000_000}, "characters long"),
])
def test_hostile_or_wrong_metadata_is_refused(scene, tmp_path, meta, message):
    from converters.onnx import convert

    _, _, pred, protos = scene
    path = write_yolo_seg(tmp_path / "m.onnx", pred, protos, **meta)
    with pytest.raises(ConversionError, match=message):
        convert(path, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
