"""The detection primitives against ONNX Runtime's own kernels: RoIAlign equals ORT's RoiAlign
(opset 16, half_pixel), the fixed-size NMS keeps what a plain greedy NMS keeps and exports to
NonMaxSuppression with the same answer."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from edgeseg.models.detection import (box_iou, decode_boxes, encode_boxes, grid_anchors, nms_topk, offset_by_group,
                                      roi_align)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_boxes(g, n, count, extent, outside=10.0):
    xy = torch.rand(n, count, 2, generator=g) * (extent + 2 * outside) - outside
    wh = torch.rand(n, count, 2, generator=g) * extent / 2
    wh[:, :3] = torch.tensor([0.0, 0.3])  # degenerate and sub-pixel boxes too
    return torch.cat([xy, xy + wh], -1)


def _ort_roi_align(features, rois, index, scale, oh, ow, sampling):
    node = helper.make_node("RoiAlign", ["x", "rois", "idx"], ["y"], output_height=oh, output_width=ow,
                            sampling_ratio=sampling, spatial_scale=scale, mode="avg",
                            coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(features.shape)),
                                            helper.make_tensor_value_info("rois", TensorProto.FLOAT, list(rois.shape)),
                                            helper.make_tensor_value_info("idx", TensorProto.INT64, list(index.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": features.numpy(), "rois": rois.numpy(), "idx": index.numpy()})[0]


@pytest.mark.parametrize("scale,oh,ow,sampling", [(0.25, 7, 7, 2), (1.0, 14, 10, 1), (0.125, 5, 6, 3)])
def test_roi_align_matches_onnxruntime(scale, oh, ow, sampling):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 12, 17, generator=g)
    boxes = _random_boxes(g, 2, 40, 17 / scale)  # partly outside the map, empty and tiny ones included
    out = roi_align(features, boxes, (oh, ow), scale, sampling)
    ref = _ort_roi_align(features, boxes.reshape(-1, 4), torch.arange(2).repeat_interleave(40), scale, oh, ow, sampling)
    assert out.shape == ref.shape == (80, 5, oh, ow)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5, rtol=1e-5)


def test_roi_align_with_batch_index_gradients_and_errors():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(3, 4, 10, 10, generator=g, requires_grad=True)
    rois = _random_boxes(g, 1, 30, 40)[0]
    index = torch.randint(0, 3, (30,), generator=g)
    out = roi_align(features, rois, 4, 0.25, 2, batch_index=index)
    ref = _ort_roi_align(features.detach(), rois, index, 0.25, 4, 4, 2)
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=1e-5, rtol=1e-5)
    # the op's backward is autograd through its kernel: compare with a finite difference
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    f64 = features.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad((roi_align(f64, rois.double(), 4, 0.25, 2, batch_index=index) * w).sum(), f64)
    assert torch.autograd.gradcheck(lambda f: (roi_align(f, rois.double(), 4, 0.25, 2, batch_index=index) * w).sum(),
                                    (f64,), eps=1e-6, atol=1e-6)
    assert grad.abs().sum() > 0
    # images with no RoI get no gradient
    untouched = set(range(3)) - set(index.tolist())
    assert all(grad[i].abs().sum() == 0 for i in untouched)
    with pytest.raises(ValueError, match="fixed sampling_ratio"):
        roi_align(features, rois[None], 4, 0.25, 0)
    with pytest.raises(ValueError, match="batch_index"):
        roi_align(features, rois, 4, 0.25, 2)


def _greedy_reference(boxes, scores, iou_threshold, score_threshold, k):
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    kept = []
    for i in order:
        if scores[i] <= score_threshold:
            continue
        if all(box_iou(boxes[i][None], boxes[j][None])[0, 0] <= iou_threshold for j in kept):
            kept.append(i)
    return kept[:k]


@pytest.mark.parametrize("iou,score,k", [(0.5, 0.0, 50), (0.3, 0.4, 10), (0.7, -0.5, 300)])
def test_nms_topk_is_greedy_nms_with_fixed_size(iou, score, k):
    g = torch.Generator().manual_seed(2)
    boxes = _random_boxes(g, 2, 120, 60, outside=0)
    scores = torch.rand(2, 120, generator=g)
    scores[0, :5] = -1.0  # dropped candidates
    index, valid = nms_topk(boxes, scores, iou, k, score_threshold=score)
    assert index.shape == valid.shape == (2, min(k, 120)) and index.dtype == torch.long
    for b in range(2):
        ref = _greedy_reference(boxes[b], scores[b], iou, score, k)
        assert index[b][valid[b]].tolist() == ref
        assert valid[b].tolist() == [True] * len(ref) + [False] * (valid.shape[1] - len(ref))


def test_nms_topk_exports_to_nonmaxsuppression(tmp_path):
    class Net(torch.nn.Module):
        def forward(self, boxes, scores, groups):
            return nms_topk(offset_by_group(boxes, groups, 200.0), scores, 0.5, 25, score_threshold=0.05)

    g = torch.Generator().manual_seed(3)
    boxes, scores = _random_boxes(g, 2, 80, 60, outside=0), torch.rand(2, 80, generator=g)
    groups = torch.randint(0, 3, (2, 80), generator=g)
    path = tmp_path / "nms.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net(), (boxes, scores, groups), str(path), dynamo=False, opset_version=17)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "NonMaxSuppression" in ops and "TopK" in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(3):
        scores = torch.rand(2, 80, generator=g)
        feeds = dict(zip([i.name for i in sess.get_inputs()], [boxes.numpy(), scores.numpy(), groups.numpy()]))
        o_index, o_valid = sess.run(None, feeds)
        index, valid = Net()(boxes, scores, groups)
        np.testing.assert_array_equal(o_valid, valid.numpy())
        np.testing.assert_array_equal(o_index[o_valid], index[valid].numpy())


def test_box_coding_round_trip_and_anchors():
    g = torch.Generator().manual_seed(4)
    ref = _random_boxes(g, 1, 20, 50, outside=0)[0, 3:] + torch.tensor([0, 0, 1.0, 1.0])
    boxes = _random_boxes(g, 1, 20, 50, outside=0)[0, 3:] + torch.tensor([0, 0, 2.0, 2.0])
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        torch.testing.assert_close(decode_boxes(encode_boxes(boxes, ref, weights), ref, weights), boxes, atol=1e-4, rtol=1e-5)
    a = grid_anchors(32, 8, (2, 3))
    assert a.shape == (2 * 3 * 3, 4)
    # the first cell's anchors are centred on (0, 0), ratio 1 is a 32 x 32 square; cells step by the stride
    torch.testing.assert_close(a[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))
    torch.testing.assert_close(a[3:6] - a[0:3], torch.tensor([[8.0, 0, 8.0, 0]] * 3))
