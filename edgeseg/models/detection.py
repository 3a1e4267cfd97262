"""Detection primitives for instance models, built to export: box coding and IoU, anchors, a
fixed-size NMS and RoIAlign.

NMS and RoIAlign are torch custom ops (`edgeseg::nms_topk`, `edgeseg::roi_align`), so exporters
see one node each instead of tracing their Python bodies:

* `nms_topk` exports as ONNX `NonMaxSuppression` followed by a scatter of the kept scores and a
  `TopK`, so its result has a fixed size (`k` indices, best first, and a validity flag) although
  the number of boxes NMS keeps depends on the data. Its torch kernel is an exact greedy NMS with
  ONNX Runtime's rules (IoU strictly above the threshold suppresses, scores at or below
  `score_threshold` never count, zero-area boxes suppress nothing).
* `roi_align` exports as ONNX `RoiAlign` (opset 16, `coordinate_transformation_mode=half_pixel`,
  `mode=avg`, a fixed `sampling_ratio`); its torch kernel follows ONNX Runtime's sampling and
  border rules, so both give the same features (tested). A fixed sampling ratio keeps the number
  of samples independent of the box size: adaptive sampling would make the work data-dependent.

torchvision has these ops, but it does not import beside the pinned torch, and its NMS returns a
data-dependent number of boxes; these are written here for that reason.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BBOX_CLIP = math.log(1000.0 / 16)  # the largest log-scale a decoded box may grow by (as in Faster R-CNN)


# -- boxes -------------------------------------------------------------------------------------
def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in a (..., n, 4) against every box in b (..., m, 4): (..., n, m).
    Boxes are (x1, y1, x2, y2); a pair with an empty box has IoU 0."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a, area_b = box_area(a), box_area(b)
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    ok = (area_a[..., :, None] > 0) & (area_b[..., None, :] > 0) & (union > 0)
    return torch.where(ok, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def encode_boxes(boxes: torch.Tensor, ref: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Regression targets (dx, dy, dw, dh) that turn `ref` boxes into `boxes`."""
    wx, wy, ww, wh = weights
    rw, rh = ref[..., 2] - ref[..., 0], ref[..., 3] - ref[..., 1]
    rx, ry = ref[..., 0] + 0.5 * rw, ref[..., 1] + 0.5 * rh
    bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    bx, by = boxes[..., 0] + 0.5 * bw, boxes[..., 1] + 0.5 * bh
    return torch.stack([wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw), wh * torch.log(bh / rh)], -1)


def decode_boxes(deltas: torch.Tensor, ref: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Apply (dx, dy, dw, dh) deltas (..., 4) to `ref` boxes (broadcastable): (..., 4) boxes."""
    wx, wy, ww, wh = weights
    rw, rh = ref[..., 2] - ref[..., 0], ref[..., 3] - ref[..., 1]
    rx, ry = ref[..., 0] + 0.5 * rw, ref[..., 1] + 0.5 * rh
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw, dh = (deltas[..., 2] / ww).clamp(max=BBOX_CLIP), (deltas[..., 3] / wh).clamp(max=BBOX_CLIP)
    cx, cy = dx * rw + rx, dy * rh + ry
    w, h = torch.exp(dw) * rw, torch.exp(dh) * rh
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def clip_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = size
    x = boxes[..., 0::2].clamp(0, w)
    y = boxes[..., 1::2].clamp(0, h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def grid_anchors(size: int, stride: int, grid: tuple[int, int], ratios=(0.5, 1.0, 2.0)) -> torch.Tensor:
    """Anchors of one feature level, (H * W * len(ratios), 4), location-major: the layout of an
    RPN head's (N, A * k, H, W) output viewed as (N, A, k, H, W) and permuted to (N, H, W, A, k).

    As in torchvision, each anchor of area size**2 and aspect ratio h/w sits at the top-left corner
    of its cell, with rounded half-extents; a torchvision-trained RPN therefore keeps its meaning."""
    r = torch.tensor(ratios, dtype=torch.float64)
    hr = r.sqrt()
    ws, hs = size / hr, size * hr
    base = (torch.stack([-ws, -hs, ws, hs], 1) / 2).round()
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64) * stride, torch.arange(gw, dtype=torch.float64) * stride,
                            indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4)
    return (shifts + base[None]).reshape(-1, 4).float()


# -- NMS ---------------------------------------------------------------------------------------
def _greedy(boxes: np.ndarray, iou_threshold: float, k: int) -> list[int]:
    """Greedy NMS over float32 boxes (n, 4) sorted best first: the indices kept, at most k.

    Each kept box is compared with the candidates still alive only (the survivors shrink every
    round), so the cost is kept x candidates, not candidates squared. The arithmetic is box_iou's,
    in float32, so the answers are the same."""
    x1, y1, x2, y2 = boxes.T
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    alive = np.arange(len(boxes))
    kept: list[int] = []
    while alive.size and len(kept) < k:
        i, rest = alive[0], alive[1:]
        kept.append(int(i))
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = area[i] + area[rest] - inter
        ok = (area[i] > 0) & (area[rest] > 0) & (union > 0)
        iou = np.where(ok, inter / np.maximum(union, np.float32(1e-12)), np.float32(0))
        alive = rest[iou <= iou_threshold]
    return kept


@torch.library.custom_op("edgeseg::nms_topk", mutates_args=())
def _nms_topk(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, score_threshold: float,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = scores.shape[0]
    index = torch.zeros(n, k, dtype=torch.long, device=scores.device)
    valid = torch.zeros(n, k, dtype=torch.bool, device=scores.device)
    for b in range(n):
        order = scores[b].argsort(descending=True, stable=True)
        cand = order[scores[b, order] > score_threshold]
        kept = cand[_greedy(boxes[b, cand].float().cpu().numpy(), iou_threshold, k)]
        index[b, : len(kept)] = kept
        valid[b, : len(kept)] = True
    return index, valid


@_nms_topk.register_fake
def _(boxes, scores, iou_threshold, score_threshold, k):
    n = scores.shape[0]
    return scores.new_empty((n, k), dtype=torch.long), scores.new_empty((n, k), dtype=torch.bool)


def nms_topk(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, k: int,
             score_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS with a fixed-size answer: boxes (N, S, 4), scores (N, S) in [0, 1].

    Returns (index (N, k') int64, valid (N, k') bool), k' = min(k, S): the kept boxes best first,
    then padding (valid False, index arbitrary). Boxes scoring at or below `score_threshold` are
    never kept: give a score of -1 to drop a candidate. Class-aware NMS is this op on boxes offset
    per class (`offset_by_group`)."""
    k = min(int(k), scores.shape[1])
    return _nms_topk(boxes.detach(), scores.detach(), float(iou_threshold), float(score_threshold), k)


def offset_by_group(boxes: torch.Tensor, group: torch.Tensor, span: float) -> torch.Tensor:
    """Shift boxes of different groups (classes, pyramid levels) apart by `span` (greater than
    every coordinate), so one NMS never lets boxes of two groups suppress each other."""
    return boxes + (group.to(boxes.dtype) * span)[..., None]


# -- RoIAlign ----------------------------------------------------------------------------------
def _axis_samples(start: torch.Tensor, length: torch.Tensor, bins: int, sampling: int, size: int):
    """For each RoI, the two source indices and weights of every sample along one axis, with ONNX
    Runtime's border rules: a sample beyond one pixel outside the map contributes nothing, one
    between that and the edge reads the edge. Returns (index (R, P, 2) int64, weight (R, P, 2))."""
    bin_size = (length / bins)[:, None, None]
    cell = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    sub = (torch.arange(sampling, dtype=start.dtype, device=start.device)[None, None, :] + 0.5)
    # the very expression ONNX Runtime evaluates, so rounding agrees too
    pos = (start[:, None, None] + cell * bin_size + sub * bin_size / sampling).reshape(start.shape[0], bins * sampling)
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(pos.dtype))
    weight = torch.stack([1 - frac, frac], -1) * inside[..., None].to(pos.dtype)
    return torch.stack([low, high], -1), weight


def _neighbours(shape, rois: torch.Tensor, batch_index: torch.Tensor, spatial_scale: float, out_h: int, out_w: int,
                sampling_ratio: int):
    """Rows of the flattened channels-last map (N * H * W, C) and bilinear weights of the 4
    neighbours of every sample: (R * Py * Px, 4) each, samples in (RoI, y, x) order."""
    n, c, h, w = shape
    box = rois * spatial_scale - 0.5  # half_pixel: pixel centres sit at +0.5
    iy, wy = _axis_samples(box[:, 1], box[:, 3] - box[:, 1], out_h, sampling_ratio, h)
    ix, wx = _axis_samples(box[:, 0], box[:, 2] - box[:, 0], out_w, sampling_ratio, w)
    base = (batch_index.long() * (h * w))[:, None, None, None, None]
    index = base + iy[:, :, None, :, None] * w + ix[:, None, :, None, :]  # (R, Py, Px, 2, 2)
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    return index.reshape(-1, 4), weight.reshape(-1, 4)


def _roi_chunks(r: int, c: int, out_h: int, out_w: int, sampling_ratio: int):
    """RoI ranges whose gathered neighbours (4 per sample, C values each) stay near 16M floats."""
    step = max(1, (1 << 24) // (out_h * out_w * sampling_ratio**2 * 4 * c))
    return [(i, min(r, i + step)) for i in range(0, r, step)]


def _roi_align_impl(features: torch.Tensor, rois: torch.Tensor, batch_index: torch.Tensor, spatial_scale: float,
                    out_h: int, out_w: int, sampling_ratio: int) -> torch.Tensor:
    n, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(n * h * w, c)  # channels last: one gather per neighbour
    out = []
    for i, j in _roi_chunks(rois.shape[0], c, out_h, out_w, sampling_ratio):
        index, weight = _neighbours(features.shape, rois[i:j], batch_index[i:j], spatial_scale, out_h, out_w, sampling_ratio)
        values = flat.index_select(0, index.reshape(-1)).reshape(-1, 4, c)
        samples = torch.bmm(weight[:, None, :], values)  # (R * Py * Px, 1, C)
        out.append(samples.reshape(j - i, out_h, sampling_ratio, out_w, sampling_ratio, c).mean((2, 4)))
    return torch.cat(out).permute(0, 3, 1, 2).contiguous()


def _roi_align_grad(shape, rois, batch_index, grad, spatial_scale, out_h, out_w, sampling_ratio) -> torch.Tensor:
    """The gradient for the features: each output's gradient, shared by its bin's samples, spread
    onto their 4 neighbours by the bilinear weights."""
    n, c, h, w = shape
    acc = grad.new_zeros(n * h * w, c)
    g = grad.permute(0, 2, 3, 1) / sampling_ratio**2  # (R, out_h, out_w, C)
    for i, j in _roi_chunks(rois.shape[0], c, out_h, out_w, sampling_ratio):
        index, weight = _neighbours(shape, rois[i:j], batch_index[i:j], spatial_scale, out_h, out_w, sampling_ratio)
        gs = g[i:j, :, None, :, None, :].expand(-1, -1, sampling_ratio, -1, sampling_ratio, -1).reshape(-1, 1, c)
        acc.index_add_(0, index.reshape(-1), (weight[:, :, None] * gs).reshape(-1, c))
    return acc.reshape(n, h, w, c).permute(0, 3, 1, 2)


@torch.library.custom_op("edgeseg::roi_align", mutates_args=())
def _roi_align(features: torch.Tensor, rois: torch.Tensor, batch_index: torch.Tensor, spatial_scale: float,
               out_h: int, out_w: int, sampling_ratio: int) -> torch.Tensor:
    return _roi_align_impl(features, rois, batch_index, spatial_scale, out_h, out_w, sampling_ratio)


@_roi_align.register_fake
def _(features, rois, batch_index, spatial_scale, out_h, out_w, sampling_ratio):
    return features.new_empty((rois.shape[0], features.shape[1], out_h, out_w))


def _roi_align_setup(ctx, inputs, output):
    features, rois, batch_index, *args = inputs
    ctx.save_for_backward(rois, batch_index)
    ctx.shape, ctx.args = tuple(features.shape), args


def _roi_align_backward(ctx, grad):
    rois, batch_index = ctx.saved_tensors
    return _roi_align_grad(ctx.shape, rois, batch_index, grad.contiguous(), *ctx.args), None, None, None, None, None, None


_roi_align.register_autograd(_roi_align_backward, setup_context=_roi_align_setup)


def roi_align(features: torch.Tensor, boxes: torch.Tensor, output_size: int | tuple[int, int], spatial_scale: float,
              sampling_ratio: int = 2, batch_index: torch.Tensor | None = None) -> torch.Tensor:
    """RoIAlign (He et al., 2017) with half-pixel alignment and average pooling.

    features (N, C, H, W); boxes (N, R, 4) x1 y1 x2 y2 in input pixels, or (R, 4) with the image
    of each in `batch_index` (R,). Returns (N * R or R, C, out_h, out_w). Gradients flow to the
    features only."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if sampling_ratio < 1:
        raise ValueError("roi_align needs a fixed sampling_ratio >= 1 (adaptive sampling is data-dependent)")
    if boxes.dim() == 3:
        n, r = boxes.shape[:2]
        boxes = boxes.reshape(n * r, 4)
        batch_index = torch.arange(n, device=boxes.device).repeat_interleave(r)
    elif batch_index is None:
        raise ValueError("roi_align with (R, 4) boxes needs batch_index")
    return _roi_align(features, boxes.detach().to(features.dtype), batch_index.long(), float(spatial_scale), int(oh),
                      int(ow), int(sampling_ratio))


# -- ONNX --------------------------------------------------------------------------------------
def _register_onnx_symbolics() -> None:
    """How the TorchScript-based ONNX exporter writes the two custom ops."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper as sym

    def roi_align_symbolic(g, features, rois, batch_index, spatial_scale, out_h, out_w, sampling_ratio):
        return g.op("RoiAlign", features, rois, batch_index, spatial_scale_f=sym._maybe_get_const(spatial_scale, "f"),
                    output_height_i=sym._maybe_get_const(out_h, "i"), output_width_i=sym._maybe_get_const(out_w, "i"),
                    sampling_ratio_i=sym._maybe_get_const(sampling_ratio, "i"), mode_s="avg",
                    coordinate_transformation_mode_s="half_pixel")

    def nms_symbolic(g, boxes, scores, iou_threshold, score_threshold, k):
        k = sym._maybe_get_const(k, "i")

        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        per_class = g.op("Unsqueeze", scores, const([1], torch.long))  # (N, 1, S): one class
        selected = g.op("NonMaxSuppression", boxes, per_class, const([k], torch.long),
                        const([sym._maybe_get_const(iou_threshold, "f")], torch.float),
                        const([sym._maybe_get_const(score_threshold, "f")], torch.float))  # (M, 3): batch, class, box
        where = g.op("Gather", selected, const([0, 2], torch.long), axis_i=1)  # (M, 2): batch, box
        # the kept boxes' scores on a field of -1, then the k best: a fixed-size answer again
        field = g.op("Sub", g.op("Mul", scores, const(0.0, torch.float)), const(1.0, torch.float))
        kept = g.op("ScatterND", field, where, g.op("GatherND", scores, where))
        values, index = g.op("TopK", kept, const([k], torch.long), axis_i=1, largest_i=1, sorted_i=1, outputs=2)
        return index, g.op("Greater", values, const(-0.5, torch.float))

    register_custom_op_symbolic("edgeseg::roi_align", roi_align_symbolic, 16)
    register_custom_op_symbolic("edgeseg::nms_topk", nms_symbolic, 16)


_register_onnx_symbolics()
