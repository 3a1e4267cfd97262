"""Mask R-CNN beyond the zoo loop: its instance layout and the runtime pasting its box-relative
masks, the padded training batches it takes, the target checks and backbone weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseg import models
from edgeseg.data import SyntheticInstances
from edgeseg.instance_layout import InstanceLayout, LayoutError
from edgeseg.spec import Preprocess
from runtime.instance_postprocess import InstancePostprocessor
from tests.test_zoo import SIZE, SMALL, build, toy_instances

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _box_mask_outputs(ann, pre: Preprocess, frame_hw, k: int, m: int = 28):
    """`detections` outputs with box-relative masks that are exactly the objects of `ann` (frame
    size): each object's mask resampled onto an m x m grid over its box in input pixels."""
    import cv2

    lb = pre.letterbox(frame_hw)
    sx, sy = lb.width / frame_hw[1], lb.height / frame_hw[0]
    boxes, scores, classes = np.zeros((1, k, 4), np.float32), np.zeros((1, k), np.float32), np.zeros((1, k), np.int64)
    masks = np.zeros((1, k, m, m), np.float32)
    for i in range(len(ann)):
        x0, y0, x1, y1 = ann.xyxy[i]
        boxes[0, i] = (x0 * sx + lb.left, y0 * sy + lb.top, x1 * sx + lb.left, y1 * sy + lb.top)
        scores[0, i], classes[0, i] = 0.9 - 0.01 * i, ann.class_id[i]
        crop = ann.masks[i, int(y0):int(y1), int(x0):int(x1)].astype(np.float32)
        masks[0, i] = cv2.resize(crop, (m, m), interpolation=cv2.INTER_AREA)
    return {"boxes": boxes, "scores": scores, "classes": classes, "masks": masks}


@pytest.mark.parametrize("frame_hw", [(128, 128), (96, 160)])
def test_box_relative_masks_are_pasted_onto_their_boxes(frame_hw):
    ds = SyntheticInstances(size=frame_hw, length=4, split="test")
    pre = Preprocess(size=(128, 128), resize="letterbox")
    layout = InstanceLayout("detections", 4, mask_space="box", max_detections=8, score_threshold=0.05).to_dict()
    post = InstancePostprocessor(ds.labels, SyntheticInstances.palette, pre, layout)
    for i in range(len(ds)):
        img, ann = ds[i]
        r = post(_box_mask_outputs(ann, pre, frame_hw, 8), frame_hw)
        assert len(r) == len(ann)
        masks = r.masks()
        for j in range(len(ann)):
            inter = (masks[j] & ann.masks[j]).sum()
            iou = inter / (masks[j] | ann.masks[j]).sum()
            assert iou > 0.85, (i, j, iou)  # 28 x 28 samples of shapes 10..40 pixels across


def test_mask_space_is_validated():
    with pytest.raises(LayoutError, match="mask_space"):
        InstanceLayout("yolo", 4, mask_space="box")
    with pytest.raises(LayoutError, match="mask_space"):
        InstanceLayout.from_dict({"layout": "detections", "num_classes": 4, "mask_space": "frame"})
    layout = build("maskrcnn_resnet").instance_layout()
    assert layout["layout"] == "detections" and layout["mask_space"] == "box"
    assert layout["outputs"] == {k: k for k in ("boxes", "scores", "classes", "masks")}
    assert layout["max_detections"] == SMALL["maskrcnn_resnet"]["detections_per_img"]


def test_training_loss_takes_padded_batches():
    """The padded batches of edgeseg.train_instances (masks at a quarter of the input, 0..255)
    give the same objective as per-image targets with the same masks."""
    model = build("maskrcnn_resnet").train()
    x, targets = toy_instances()
    g = max(len(t["labels"]) for t in targets)
    boxes, classes = torch.zeros(2, g, 4), torch.full((2, g), -1, dtype=torch.long)
    masks = torch.zeros(2, g, SIZE[0] // 4, SIZE[1] // 4, dtype=torch.uint8)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        boxes[i, :n], classes[i, :n] = t["boxes"], t["labels"]
        masks[i, :n] = (torch.nn.functional.avg_pool2d(t["masks"][:, None].float(), 4)[:, 0] * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    padded = model.training_loss(x, {"boxes": boxes, "classes": classes, "masks": masks})
    torch.manual_seed(0)
    per_image = model.training_loss(x, [{"boxes": boxes[i, classes[i] >= 0], "labels": classes[i, classes[i] >= 0],
                                          "masks": masks[i, classes[i] >= 0].float() / 255} for i in range(2)])
    assert torch.isfinite(padded) and torch.allclose(padded, per_image)


def test_maskrcnn_targets_are_checked():
    model = build("maskrcnn_resnet").train()
    x, targets = toy_instances()
    with pytest.raises(ValueError, match="needs targets"):
        model(x)
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        model(x, bad)
    bad = [dict(t) for t in targets]
    bad[1]["masks"] = bad[1]["masks"][:, :32]
    with pytest.raises(ValueError, match="integer fraction"):
        model(x, bad)
    with pytest.raises(ValueError, match="got 1 targets for 2 images"):
        model(x, targets[:1])
    with pytest.raises(ValueError, match="multiples of 32"):
        model.eval()(torch.zeros(1, 3, 48, 64))


def test_maskrcnn_backbone_weights_from_torchvision_style_files(tmp_path):
    from edgeseg.models.maskrcnn import load_backbone_weights
    from edgeseg.models.resnet import ResNet

    kw = {**SMALL["maskrcnn_resnet"], "width": 1.0, "fpn_channels": 64}
    model = models.create("maskrcnn_resnet", num_classes=3, **kw)
    # a classification ResNet-18 state_dict (its fc is not part of the backbone)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ResNet(18).state_dict().items()}
    sd["fc.weight"] = torch.randn(1000, 512)
    torch.save(sd, tmp_path / "resnet18.pth")
    missing = load_backbone_weights(model, tmp_path / "resnet18.pth")
    torch.testing.assert_close(model.backbone.body.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])
    assert missing and all(k.startswith("backbone.fpn.") for k in missing)
    # a torchvision Mask R-CNN checkpoint: backbone.body.* and an FPN in the pre-0.13 naming
    det = {f"backbone.body.{k}": v.clone() for k, v in sd.items() if not k.startswith("fc.")}
    det["backbone.fpn.inner_blocks.2.weight"] = torch.randn_like(model.backbone.fpn.inner_blocks[2][0].weight)
    det["roi_heads.box_predictor.cls_score.weight"] = torch.randn(91, 1024)
    torch.save({"state_dict": det}, tmp_path / "maskrcnn.pth")
    model = models.create("maskrcnn_resnet", num_classes=3, backbone_weights=str(tmp_path / "maskrcnn.pth"), **kw)
    torch.testing.assert_close(model.backbone.fpn.inner_blocks[2][0].weight, det["backbone.fpn.inner_blocks.2.weight"])
    torch.testing.assert_close(model.backbone.body.conv1.weight, sd["conv1.weight"])
    assert "backbone_weights" not in model.edgeseg_arch["kwargs"]
    with pytest.raises(FileNotFoundError, match="local files only"):
        models.create("maskrcnn_resnet", num_classes=3, backbone_weights=str(tmp_path / "missing.pth"), **kw)
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no tensor fits the ResNet-18 backbone"):
        models.create("maskrcnn_resnet", num_classes=3, backbone_weights=str(tmp_path / "other.pth"), **kw)


def test_compact_preset_exports_with_parity(tmp_path):
    """The preset `edgeseg train` documents, exported as the zoo test exports: fixed shapes,
    RoiAlign (half_pixel) and NonMaxSuppression inside, ONNX Runtime's detections equal torch's."""
    import warnings

    import onnx
    import onnxruntime as ort

    from edgeseg.models.maskrcnn import OUTPUTS, PRESETS

    torch.manual_seed(0)
    model = models.create("maskrcnn_resnet", num_classes=4, preset="compact", box_score_thresh=0.0).eval()
    assert model.backbone.body.depth == 18 and model.detections_per_img == PRESETS["compact"]["detections_per_img"]
    size = (64, 96)
    path = tmp_path / "compact.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, *size),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=list(OUTPUTS))
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("NonMaxSuppression") == 2 and ops.count("RoiAlign") == 2  # RPN + box head; box + mask pooling
    assert [d.dim_value for d in graph.output[3].type.tensor_type.shape.dim] == [1, 20, 14, 14]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ds = SyntheticInstances(size=size, length=2, split="test")
    pre = Preprocess(size=size)
    for i in range(2):
        x = pre.apply(ds[i][0])
        got = dict(zip(OUTPUTS, sess.run(None, {"input": x})))
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in zip(OUTPUTS, model(torch.from_numpy(x)))}
        assert (ref["scores"] > 0).sum() == 20
        np.testing.assert_array_equal(got["classes"], ref["classes"])
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-5)
        np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=1e-3)
        a, b = got["masks"][0] > 0.5, ref["masks"][0] > 0.5
        union = (a | b).sum((1, 2))
        iou = np.where(union > 0, (a & b).sum((1, 2)) / np.maximum(union, 1), 1.0)
        assert iou.min() >= 0.99, iou


def test_maskrcnn_bundle_runs_through_the_segmenter(tmp_path):
    """`edgeseg convert` of a Mask R-CNN checkpoint gives an instance bundle (detections layout,
    box-relative masks, parity on matched objects) that `Segmenter` runs to InstanceResults."""
    from converters.onnx import convert
    from edgeseg import Segmenter
    from runtime.instances import InstanceResult

    torch.manual_seed(0)
    model = models.create("maskrcnn_resnet", num_classes=4, preset="compact", box_score_thresh=0.0)
    ckpt = tmp_path / "m.pt"
    models.save_checkpoint(model, ckpt, labels=SyntheticInstances.labels, palette=SyntheticInstances.palette,
                           preprocess=Preprocess(size=(64, 64)))
    bundle = convert(str(ckpt), tmp_path / "bundle", parity_frames=2)
    m = bundle.manifest
    assert m.task == "instance-segmentation" and m.output_kind == "instances"
    assert m.instances["layout"] == "detections" and m.instances["mask_space"] == "box"
    parity = m.artifacts[0].parity
    assert parity["ok"] and parity["matched"] == parity["detections_reference"] > 0 and parity["min_mask_iou"] >= 0.99
    seg = Segmenter(bundle, backend="onnxruntime")
    frame = SyntheticInstances(size=(96, 128), length=1, split="test")[0][0]
    r = seg.segment(frame)
    assert isinstance(r, InstanceResult) and r.frame_size == (96, 128) and 0 < len(r) <= 20
    assert r.masks().shape == (len(r), 96, 128) and set(r.names) <= set(SyntheticInstances.labels)
