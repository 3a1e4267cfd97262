"""Every zoo model trains a few steps, exports to ONNX with parity against torch, passes the
TensorRT preflight and converts to CoreML; plus the encoders' feature strides and weight loading.
Instance models (Mask R-CNN) are checked the same way on detections instead of logits."""
from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch

from edgeseg import models
from edgeseg.spec import Preprocess

# small configurations so the whole zoo runs in a couple of minutes on two cores
SMALL = {
    "unet": dict(base=8, depth=3),
    "lraspp_mobilenetv3": dict(width=0.5),
    "lraspp_mobilenetv3_small": dict(width=0.5),
    "deeplabv3plus_mobilenetv3": dict(variant="small", width=0.5, aspp_channels=32, decoder_channels=32, low_channels=16),
    "deeplabv3plus_resnet": dict(depth=18, width=0.5, aspp_channels=32, decoder_channels=32, low_channels=16),
    "fastfcn_resnet": dict(depth=18, width=0.5, jpu_width=32, head_channels=32),
    "gscnn_resnet": dict(depth=18, width=0.5, aspp_channels=32, decoder_channels=32, shape_channels=16),
    # every candidate is kept (score threshold 0), so parity compares full, untrained detection lists
    "yoloseg": dict(width=0.5, channels=16, num_masks=8, proto_channels=16),
    "maskrcnn_resnet": dict(depth=18, width=0.25, fpn_channels=32, anchor_sizes=(8, 16, 32, 64), rpn_pre_nms_top_n=(200, 100),
                            rpn_post_nms_top_n=(100, 50), box_batch_size_per_image=32, rpn_batch_size_per_image=64,
                            detections_per_img=12, representation_size=64, mask_channels=16, mask_convs=2, mask_pool=7,
                            box_score_thresh=0.0),
}
INSTANCE_MODELS = ("maskrcnn_resnet", "yoloseg")
SEMANTIC_MODELS = [n for n in models.available() if n not in INSTANCE_MODELS]
NUM_CLASSES = 3
SIZE = (64, 64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name):
    torch.manual_seed(0)
    return models.create(name, num_classes=NUM_CLASSES, **SMALL.get(name, {}))


def toy_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *SIZE, generator=g)
    y = torch.zeros(2, *SIZE, dtype=torch.long)
    y[:, 16:48, 8:40] = 1
    y[1, 40:60, 30:60] = 2
    y[0, :4] = 255
    return x, y


def _optional(module, name):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def export(model, path, pre):
    """The SDK's exporter when present; otherwise the dynamo exporter directly."""
    export_onnx = _optional("converters.onnx", "export_onnx")
    if export_onnx is not None:
        export_onnx(model, path, preprocess=pre)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, *pre.size),), str(path), dynamo=True, input_names=["input"],
                          output_names=["logits"], external_data=False)


def to_coreml(model, path, pre, labels):
    convert_coreml = _optional("converters.coreml", "convert_coreml")
    if convert_coreml is not None:
        palette = [[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256] for i in range(len(labels))]
        convert_coreml(model, path, preprocess=pre, labels=labels, palette=palette, precision="fp16")
        return
    import coremltools as ct

    x = torch.zeros(1, 3, *pre.size)
    program = torch.export.export(model, (x,)).run_decompositions({})
    mlmodel = ct.convert(program, inputs=[ct.TensorType(name="input", shape=x.shape)], convert_to="mlprogram",
                         compute_precision=ct.precision.FLOAT16, minimum_deployment_target=ct.target.iOS16)
    mlmodel.save(str(path))


def test_every_model_is_tested_for_its_task():
    for name in models.available():
        task = getattr(build(name), "task", "semantic-segmentation")
        assert (name in INSTANCE_MODELS) == (task == "instance-segmentation"), name


@pytest.mark.parametrize("name", SEMANTIC_MODELS)
def test_zoo_model_trains_exports_and_converts(name, tmp_path):
    model = build(name)
    assert getattr(model, "input_multiple", 0) >= 1 and SIZE[0] % model.input_multiple == 0

    # -- trains: a few steps on a fixed toy batch lower the loss (through the training hook if any)
    from edgeseg.losses import build_loss
    from edgeseg.train import _step_loss

    x, y = toy_batch()
    loss_fn = build_loss("ce")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = _step_loss(model, x, y, loss_fn, 255)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], f"{name}: loss {losses}"

    # -- exports to ONNX, output matching torch
    model.eval()
    pre = Preprocess(size=SIZE)
    onnx_path = tmp_path / f"{name}.onnx"
    export(model, onnx_path, pre)
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(onnx_path)).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Shape", "NonZero", "Loop", "If"}, f"{name}: data-dependent ops {ops & {'Shape', 'NonZero', 'Loop', 'If'}}"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    frames = torch.randn(2, 1, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    for frame in frames:
        (out,) = sess.run(None, {sess.get_inputs()[0].name: frame.numpy()})[:1]
        with torch.no_grad():
            ref = model(frame).numpy()
        assert out.shape == ref.shape == (1, NUM_CLASSES, *SIZE)
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.abs(out - ref).max() <= 1e-4 * scale, f"{name}: ONNX parity {np.abs(out - ref).max():.2e}"
        assert np.mean(out.argmax(1) == ref.argmax(1)) > 0.999

    # -- passes the TensorRT preflight
    preflight = _optional("converters.tensorrt", "preflight")
    if preflight is not None:
        errors = [p for p in preflight(str(onnx_path)) if getattr(p, "severity", "error") == "error"]
        assert not errors, f"{name}: " + "; ".join(map(str, errors))

    # -- converts to CoreML (an ML program; predict needs macOS, so the spec is inspected)
    import coremltools as ct

    ml_path = tmp_path / f"{name}.mlpackage"
    to_coreml(model, ml_path, pre, [f"c{i}" for i in range(NUM_CLASSES)])
    spec = ct.utils.load_spec(str(ml_path))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert len(spec.description.output) >= 1


def test_gscnn_edges_on_request():
    model = build("gscnn_resnet").eval()
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        seg = model(x)
        seg2, edges = model(x, return_edges=True)
    assert seg.shape == (1, NUM_CLASSES, *SIZE) and edges.shape == (1, 1, *SIZE)
    torch.testing.assert_close(seg, seg2)
    # the label boundaries the edge head learns from: a 2-class step has edges on both sides only
    t = torch.zeros(1, 4, 6, dtype=torch.long)
    t[:, :, 3:] = 1
    t[0, 0, 0] = 255
    edges, valid = model.edge_target(t)
    assert edges[0, 0].tolist() == [[0, 0, 1, 1, 0, 0]] * 4 and not valid[0, 0, 0, 0]


@pytest.mark.parametrize("depth,os_,expected", [
    (18, 32, {2: 64, 4: 64, 8: 128, 16: 256, 32: 512}),
    (18, 16, {2: 64, 4: 64, 8: 128, 16: 512}),
    (50, 8, {2: 64, 4: 256, 8: 2048}),
])
def test_resnet_features_by_stride(depth, os_, expected):
    from edgeseg.models.resnet import ResNet

    enc = ResNet(depth, output_stride=os_).eval()
    with torch.no_grad():
        feats = enc(torch.zeros(1, 3, 64, 64))
    assert {s: f.shape[1] for s, f in feats.items()} == expected
    assert all(f.shape[-1] == 64 // s for s, f in feats.items())


def test_backbone_weights_load_from_a_local_file(tmp_path):
    from edgeseg.models.resnet import ResNet

    # a torchvision-style ResNet-18 state_dict (with its classifier, which is not part of the encoder)
    src = ResNet(18)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)
    model = models.create("deeplabv3plus_resnet", num_classes=3, depth=18, backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])
    torch.testing.assert_close(model.backbone.conv1.weight, sd["conv1.weight"])
    with pytest.raises(FileNotFoundError, match="local files only"):
        models.create("fastfcn_resnet", num_classes=3, depth=18, backbone_weights=str(tmp_path / "missing.pth"))


# -- Mask R-CNN ------------------------------------------------------------------------------------
OUTPUTS = ("boxes", "scores", "classes", "masks")


def toy_instances():
    """Two 64x64 images with two and one objects: boxes, labels, masks as Mask R-CNN trains on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *SIZE, generator=g)
    targets = []
    for rects, labels in (([(8, 16, 40, 48), (30, 40, 60, 60)], [0, 2]), ([(4, 4, 30, 24)], [1])):
        masks = torch.zeros(len(rects), *SIZE, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, rects):
            m[y0:y1, x0:x1] = 1
            x[len(targets), :, y0:y1, x0:x1] += 2.0  # objects stand out from the noise
        targets.append({"boxes": torch.tensor(rects, dtype=torch.float32), "labels": torch.tensor(labels), "masks": masks})
    return x, targets


def _box_masks(masks: np.ndarray) -> np.ndarray:
    return masks > 0.5


def test_maskrcnn_trains_exports_and_converts(tmp_path):
    name = "maskrcnn_resnet"
    model = build(name)
    assert model.task == "instance-segmentation" and SIZE[0] % model.input_multiple == 0

    # -- trains: a few steps on a fixed batch lower the sum of the five losses
    x, targets = toy_instances()
    torch.manual_seed(0)  # the anchor and proposal samples
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    totals = []
    for _ in range(8):
        losses = model(x, targets)
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(float(loss.detach()))
    assert min(totals[-3:]) < totals[0], f"losses {totals}"

    # -- exports to ONNX (NonMaxSuppression and RoiAlign inside, fixed shapes), detections matching torch
    import onnx
    import onnxruntime as ort
    import onnxsim

    model.eval()
    onnx_path = tmp_path / "maskrcnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, *SIZE),), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=list(OUTPUTS))
    simplified, ok = onnxsim.simplify(onnx.load(str(onnx_path)))
    assert ok
    onnx.save(simplified, str(onnx_path))
    ops = {n.op_type for n in simplified.graph.node}
    assert {"NonMaxSuppression", "RoiAlign", "TopK"} <= ops
    assert not ops & {"Shape", "NonZero", "Loop", "If"}, f"data-dependent ops {ops & {'Shape', 'NonZero', 'Loop', 'If'}}"
    roi_align = next(n for n in simplified.graph.node if n.op_type == "RoiAlign")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in roi_align.attribute}
    assert attrs["coordinate_transformation_mode"] == b"half_pixel" and attrs["mode"] == b"avg"
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    D = model.detections_per_img
    frames = torch.randn(2, 1, 3, *SIZE, generator=torch.Generator().manual_seed(1)) + x[:1]
    for frame in frames:
        got = dict(zip(OUTPUTS, sess.run(None, {"input": frame.numpy()})))
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in zip(OUTPUTS, model(frame))}
        assert got["boxes"].shape == (1, D, 4) and got["masks"].shape == (1, D, model.mask_size, model.mask_size)
        live = ref["scores"][0] > 0
        assert live.sum() == D  # score threshold 0: every slot holds a detection
        np.testing.assert_array_equal(got["classes"], ref["classes"])
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-5)
        np.testing.assert_allclose(got["boxes"], ref["boxes"], atol=1e-3)
        a, b = _box_masks(got["masks"][0]), _box_masks(ref["masks"][0])
        inter, union = (a & b).sum((1, 2)), (a | b).sum((1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        assert iou.min() >= 0.99, f"mask IoU per detection {iou}"

    # -- TensorRT preflight: nothing in the way; it names the plugin TensorRT builds RoiAlign from
    from converters.tensorrt import preflight

    problems = preflight(str(onnx_path))
    assert not [p for p in problems if p.severity == "error"], "; ".join(map(str, problems))
    assert {p.op for p in problems} == {"RoiAlign"} and all("ROIAlign_TRT plugin" in p.message for p in problems)

    # -- Core ML converts the whole network (RoIAlign and NMS lowered to crop_resize and
    # non_maximum_suppression; iOS17 for per-box image indices). Predicting needs macOS.
    import coremltools as ct

    from converters.coreml.detection_ops import register

    register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.zeros(1, 3, *SIZE),)).run_decompositions({})
        mlmodel = ct.convert(program, inputs=[ct.TensorType(name="input", shape=(1, 3, *SIZE))], convert_to="mlprogram",
                             minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    ml_path = tmp_path / "maskrcnn.mlpackage"
    mlmodel.save(str(ml_path))
    spec = ct.utils.load_spec(str(ml_path))
    assert spec.WhichOneof("Type") == "mlProgram" and len(spec.description.output) == len(OUTPUTS)
    ops = {op.type for f in spec.mlProgram.functions.values() for b in f.block_specializations.values() for op in b.operations}
    assert {"crop_resize", "non_maximum_suppression"} <= ops
    # before iOS17 the RoIAlign lowering refuses and says what it needs
    with pytest.raises(Exception, match="iOS17"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ct.convert(program, inputs=[ct.TensorType(name="input", shape=(1, 3, *SIZE))], convert_to="mlprogram",
                       minimum_deployment_target=ct.target.iOS16, skip_model_load=True)


# -- YOLO-seg ------------------------------------------------------------------------------------
def toy_padded_instances():
    """toy_instances as the padded batch edgeseg's instance training gives (classes -1 = padding,
    masks at 1/4 of the input as coverage 0..255)."""
    x, targets = toy_instances()
    g = max(len(t["labels"]) for t in targets)
    boxes, classes = torch.zeros(2, g, 4), torch.full((2, g), -1, dtype=torch.long)
    masks = torch.zeros(2, g, SIZE[0] // 4, SIZE[1] // 4, dtype=torch.uint8)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        boxes[i, :k], classes[i, :k] = t["boxes"], t["labels"]
        masks[i, :k] = (torch.nn.functional.avg_pool2d(t["masks"][:, None].float(), 4)[:, 0] * 255).round().to(torch.uint8)
    return x, {"boxes": boxes, "classes": classes, "masks": masks}


@pytest.mark.parametrize("encoder", ["mobilenetv3_small", "resnet18"])
def test_yoloseg_trains_exports_and_converts(encoder, tmp_path):
    torch.manual_seed(0)
    kw = dict(SMALL["yoloseg"], encoder=encoder, **(dict(width=0.25) if encoder == "resnet18" else {}))
    model = models.create("yoloseg", num_classes=NUM_CLASSES, **kw)
    assert model.task == "instance-segmentation" and SIZE[0] % model.input_multiple == 0
    assert models.task("yoloseg") == "instance-segmentation"

    # -- trains: box, class and mask losses fall on a fixed batch
    x, targets = toy_padded_instances()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    totals = []
    for _ in range(8):
        loss = model.training_loss(x, targets)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(float(loss.detach()))
    assert min(totals[-3:]) < totals[0], f"losses {totals}"

    # -- exports: the yolo layout, no data-dependent ops in the body, outputs matching torch
    import onnx
    import onnxruntime as ort

    from converters.instance_export import export_instance_onnx, tail_module
    from edgeseg.instance_layout import InstanceLayout

    model.eval()
    pre = Preprocess(size=SIZE)
    layout = InstanceLayout.from_dict(model.instance_layout())
    A = sum((SIZE[0] // s) * (SIZE[1] // s) for s in (8, 16, 32))
    body = tmp_path / "body.onnx"
    export_instance_onnx(model, body, preprocess=pre, layout=layout)
    ops = {n.op_type for n in onnx.load(str(body)).graph.node}
    assert not ops & {"Shape", "NonZero", "Loop", "If"}, f"data-dependent ops {ops & {'Shape', 'NonZero', 'Loop', 'If'}}"
    sess = ort.InferenceSession(str(body), providers=["CPUExecutionProvider"])
    frame = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    pred, protos = sess.run(None, {"input": frame.numpy()})
    with torch.no_grad():
        ref_pred, ref_protos = (t.numpy() for t in model(frame))
    assert pred.shape == (1, 4 + NUM_CLASSES + 8, A) and protos.shape == (1, 8, SIZE[0] // 4, SIZE[1] // 4)
    np.testing.assert_allclose(pred, ref_pred, atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(protos, ref_protos, atol=1e-4, rtol=1e-4)

    # -- the in-graph tail: NonMaxSuppression and TopK inside, fixed-size outputs
    tail, tail_layout = tail_module(model, layout, max_detections=10, score_threshold=0.0)
    tail_path = tmp_path / "tail.onnx"
    export_instance_onnx(tail, tail_path, preprocess=pre, layout=tail_layout)
    tail_ops = {n.op_type for n in onnx.load(str(tail_path)).graph.node}
    assert {"NonMaxSuppression", "TopK"} <= tail_ops and not tail_ops & {"Loop", "If", "NonZero"}
    got = ort.InferenceSession(str(tail_path), providers=["CPUExecutionProvider"]).run(None, {"input": frame.numpy()})
    assert [g.shape for g in got] == [(1, 10, 4), (1, 10), (1, 10), (1, 10, SIZE[0] // 4, SIZE[1] // 4)]

    # -- TensorRT preflight: nothing in the way, body and tail
    from converters.tensorrt import preflight

    for path in (body, tail_path):
        errors = [p for p in preflight(str(path)) if p.severity == "error"]
        assert not errors, "; ".join(map(str, errors))

    # -- Core ML converts the body (an ML program; predict needs macOS)
    import coremltools as ct

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.zeros(1, 3, *SIZE),)).run_decompositions({})
        mlmodel = ct.convert(program, inputs=[ct.TensorType(name="input", shape=(1, 3, *SIZE))], convert_to="mlprogram",
                             minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    ml_path = tmp_path / "yoloseg.mlpackage"
    mlmodel.save(str(ml_path))
    spec = ct.utils.load_spec(str(ml_path))
    assert spec.WhichOneof("Type") == "mlProgram" and len(spec.description.output) == 2
    # the tail too, its NMS lowered to Core ML's non_maximum_suppression (iOS17: converters.coreml.detection_ops)
    from converters.coreml.detection_ops import register

    register()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(tail, (torch.zeros(1, 3, *SIZE),)).run_decompositions({})
        mlmodel = ct.convert(program, inputs=[ct.TensorType(name="input", shape=(1, 3, *SIZE))], convert_to="mlprogram",
                             minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    mlmodel.save(str(tmp_path / "tail.mlpackage"))
    spec = ct.utils.load_spec(str(tmp_path / "tail.mlpackage"))
    ops = {op.type for f in spec.mlProgram.functions.values() for b in f.block_specializations.values() for op in b.operations}
    assert "non_maximum_suppression" in ops and len(spec.description.output) == 4
