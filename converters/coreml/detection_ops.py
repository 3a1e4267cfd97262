"""Core ML lowerings of the zoo's detection ops (`edgeseg.models.detection`), so instance models
that pool regions or suppress boxes in the graph (Mask R-CNN) convert whole.

* `edgeseg::roi_align` -> MIL `crop_resize` at `sampling_ratio` samples per bin, then an average
  pool over each bin's samples. `crop_resize` with ALIGN_CORNERS samples from its box's first to
  its last coordinate inclusive, so the box handed to it spans RoIAlign's first and last sample
  centres. RoIAlign reads the edge pixel for samples up to one pixel outside the map; a 1-pixel
  replicated border does the same for `crop_resize`. Needs iOS17 (per-box image indices).
* `edgeseg::nms_topk` -> MIL `non_maximum_suppression` (fixed `max_boxes`, -1 padding). iOS17's
  version has no score threshold; greedy NMS takes boxes best first, so boxes at or below the
  threshold come after every box above it and are marked invalid afterwards.

Registered with coremltools before every conversion (`register`). Core ML runs only on macOS: on Linux
these lowerings are checked by converting, not by predicting.
"""
from __future__ import annotations

from converters.coreml.schemes import import_ct

ROI_ALIGN_TARGET = "iOS17"
_registered = False


def register() -> None:
    """Make coremltools lower the two ops (idempotent)."""
    global _registered
    if _registered:
        return
    import_ct()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil._deployment_compatibility import AvailableTarget as target
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op
    from coremltools.converters.mil.mil.block import is_current_opset_version_compatible_with as at_least

    @register_torch_op(torch_alias=["edgeseg::roi_align"])
    def edgeseg_roi_align(context, node):
        x, rois, index, scale, oh, ow, sr = _get_inputs(context, node, expected=7)
        if not at_least(target.iOS17):
            raise ValueError(f"RoIAlign needs Core ML's crop_resize with per-box image indices: convert with "
                             f"minimum_deployment_target='{ROI_ALIGN_TARGET}' or newer")
        scale, sr = float(scale.val), int(sr.val)
        th, tw = int(oh.val) * sr, int(ow.val) * sr
        x = mb.pad(x=x, pad=[1, 1, 1, 1], mode="replicate")  # RoIAlign's border rule
        x1, y1, x2, y2 = mb.split(x=rois, num_splits=4, axis=1)
        # feature coordinates (pixel centres at integers) of the first and last sample, +1 for the border
        sx, sy = mb.add(x=mb.mul(x=x1, y=scale), y=0.5), mb.add(x=mb.mul(x=y1, y=scale), y=0.5)
        step_x, step_y = mb.mul(x=mb.sub(x=x2, y=x1), y=scale / tw), mb.mul(x=mb.sub(x=y2, y=y1), y=scale / th)
        box = mb.concat(values=[mb.add(x=sx, y=mb.mul(x=step_x, y=0.5)), mb.add(x=sy, y=mb.mul(x=step_y, y=0.5)),
                                mb.add(x=sx, y=mb.mul(x=step_x, y=tw - 0.5)), mb.add(x=sy, y=mb.mul(x=step_y, y=th - 0.5))],
                        axis=1)
        crops = mb.crop_resize(x=x, boxes=box, box_indices=mb.cast(x=index, dtype="int32"), target_height=th,
                               target_width=tw, normalized_coordinates=False, spatial_scale=1.0,
                               box_coordinate_mode="CORNERS_WIDTH_FIRST", sampling_mode="ALIGN_CORNERS")
        context.add(mb.avg_pool(x=crops, kernel_sizes=[sr, sr], strides=[sr, sr], pad_type="valid", name=node.name),
                    torch_name=node.name)

    @register_torch_op(torch_alias=["edgeseg::nms_topk"])
    def edgeseg_nms_topk(context, node):
        boxes, scores, iou, score_threshold, k = _get_inputs(context, node, expected=5)
        k, iou, thr = int(k.val), float(iou.val), float(score_threshold.val)
        x1, y1, x2, y2 = mb.split(x=boxes, num_splits=4, axis=-1)
        w, h = mb.sub(x=x2, y=x1), mb.sub(x=y2, y=y1)
        centre_size = mb.concat(values=[mb.add(x=x1, y=mb.mul(x=w, y=0.5)), mb.add(x=y1, y=mb.mul(x=h, y=0.5)), w, h], axis=-1)
        per_class = mb.expand_dims(x=scores, axes=[-1])  # one class
        if at_least(target.iOS17):  # boxes last: (N, 4, S), (N, 1, S)
            _, _, indices = mb.non_maximum_suppression(boxes=mb.transpose(x=centre_size, perm=[0, 2, 1]),
                                                       scores=mb.transpose(x=per_class, perm=[0, 2, 1]),
                                                       max_boxes=k, iou_threshold=iou)
        else:
            _, _, indices, _ = mb.non_maximum_suppression(boxes=centre_size, scores=per_class, max_boxes=k,
                                                          iou_threshold=iou, score_threshold=thr)
        index = mb.maximum(x=indices, y=0)
        kept = mb.gather_along_axis(x=scores, indices=index, axis=1)
        valid = mb.logical_and(x=mb.greater_equal(x=indices, y=0), y=mb.greater(x=kept, y=thr))
        context.add((index, valid), torch_name=node.name)

    _registered = True
