"""From an instance network's outputs to an `InstanceResult` at frame size, at a cost that follows
the objects' area rather than the frame's.

    post = InstancePostprocessor.from_manifest(manifest, conf=0.25)
    result = post(engine.infer(x), frame.shape[:2], frame=frame)

The output layouts are described in `edgeseg.instance_layout`. For `yolo` (dense predictions):
1. decode: the best class per anchor, the anchors scoring above `conf` (no per-anchor Python);
2. class-aware NMS (OpenCV's `NMSBoxesBatched`), then the `max_det` best;
3. each object's mask: its coefficients times the prototypes *inside its box only*, sigmoid,
   then one bilinear warp from prototype pixels to the frame pixels of its rect, thresholded.
The `detections` layout (NMS and mask assembly in the graph) starts at step 3 with the graph's
prototype-resolution masks. Boxes map back through the letterbox of the bundle's `Preprocess`.

The plain way - every prototype mask upsampled to the input, then to the frame, then cropped and
thresholded - costs objects x frame pixels; here the frame-sized work is only what objects
cover (benchmarks/instance_postprocess.py measures both).
"""
from __future__ import annotations

import time

import cv2
import numpy as np

from edgeseg.instance_layout import InstanceLayout, LayoutError
from edgeseg.spec import Preprocess
from runtime.instances import InstanceError, InstanceResult

MAX_NMS_CANDIDATES = 30_000  # as Ultralytics: a model that scores everything high stays bounded


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise InstanceError(f"{name} must be a number in 0..1, got {value!r}")
    return float(value)


def pixel_rects(xyxy: np.ndarray, frame_hw) -> np.ndarray:
    """Integer rects (x0, y0, x1, y1) of the frame pixels whose centres lie inside each box."""
    H, W = frame_hw
    r = np.ceil(np.asarray(xyxy, np.float64) - 0.5).astype(np.int64)
    r[:, 0::2] = np.clip(r[:, 0::2], 0, W)
    r[:, 1::2] = np.clip(r[:, 1::2], 0, H)
    return r.astype(np.int32)


class InstancePostprocessor:
    """Network outputs -> InstanceResult. conf: minimum score; iou: NMS overlap above which the
    lower-scored of two same-class boxes goes; max_det: most objects per frame; mask_threshold:
    mask probability at which a pixel belongs to the object."""

    def __init__(self, labels, palette, preprocess: Preprocess, layout: InstanceLayout | dict,
                 conf: float | None = None, iou: float | None = None, max_det: int | None = None,
                 mask_threshold: float = 0.5):
        self.labels = list(labels)
        self.palette = [list(map(int, c)) for c in palette]
        self.preprocess = preprocess
        try:
            self.layout = InstanceLayout.from_dict(layout)
        except LayoutError as e:
            raise InstanceError(str(e)) from None
        L = self.layout
        if len(self.labels) != L.num_classes:
            raise InstanceError(f"the bundle has {len(self.labels)} labels but its instance layout {L.num_classes} classes; "
                                "re-create the bundle with `edgeseg convert`")
        self.conf = _check_unit("conf", L.score_threshold if conf is None else conf)
        self.iou = _check_unit("iou", L.iou_threshold if iou is None else iou)
        if L.layout == "detections":
            if iou is not None and self.iou != L.iou_threshold:
                raise InstanceError(f"this bundle's NMS runs inside the graph at IoU {L.iou_threshold}; it cannot change at "
                                    "run time (convert without --instance-tail to choose it here)")
            self.conf = max(self.conf, L.score_threshold)  # the graph already dropped what scored lower
        limit = L.max_detections if L.layout == "detections" else 10_000
        if max_det is None:
            max_det = L.max_detections
        if isinstance(max_det, bool) or not isinstance(max_det, (int, np.integer)) or not 1 <= max_det <= limit:
            raise InstanceError(f"max_det must be an integer in 1..{limit}, got {max_det!r}")
        self.max_det = int(max_det)
        self.mask_threshold = _check_unit("mask_threshold", mask_threshold)

    @classmethod
    def from_manifest(cls, manifest, **options) -> "InstancePostprocessor":
        return cls(manifest.labels, manifest.palette, manifest.preprocess, manifest.instances, **options)

    def reset(self) -> None:
        """Nothing carries over between frames (tracking is its own stage: runtime.tracking)."""

    # -- decoding ---------------------------------------------------------------------------
    def _output(self, outputs: dict, role: str) -> np.ndarray:
        name = self.layout.outputs[role]
        if name not in outputs:
            raise InstanceError(f"the engine returned {sorted(outputs)} but the bundle's instance layout expects "
                                f"{name!r} ({role}); the manifest does not match the model")
        return np.asarray(outputs[name])

    def _decode_yolo(self, outputs: dict):
        L = self.layout
        pred, protos = self._output(outputs, "predictions"), self._output(outputs, "protos")
        if pred.ndim != 3 or pred.shape[0] != 1 or L.channels not in pred.shape[1:]:
            raise InstanceError(f"predictions of shape {pred.shape}; the layout expects (1, {L.channels}, anchors) "
                                f"= 4 box + {L.num_classes} classes + {L.num_masks} coefficients")
        pred = pred[0] if pred.shape[1] == L.channels else pred[0].T  # (C, A)
        if protos.ndim != 4 or protos.shape[:2] != (1, L.num_masks):
            raise InstanceError(f"protos of shape {protos.shape}; the layout expects (1, {L.num_masks}, h, w)")
        nc = L.num_classes
        scores = pred[4 : 4 + nc]
        best = scores.max(0) if nc > 1 else scores[0]
        idx = np.flatnonzero(best > self.conf)
        if idx.size > MAX_NMS_CANDIDATES:
            idx = idx[np.argsort(-best[idx], kind="stable")[:MAX_NMS_CANDIDATES]]
        if not idx.size:
            return None
        cand = pred[:, idx].astype(np.float32)
        score = best[idx].astype(np.float32)
        cls = scores[:, idx].argmax(0) if nc > 1 else np.zeros(idx.size, np.int64)
        cx, cy, w, h = cand[0], cand[1], cand[2], cand[3]
        xywh = np.stack([cx - w / 2, cy - h / 2, w, h], 1)
        keep = cv2.dnn.NMSBoxesBatched(xywh.tolist(), score.tolist(), cls.astype(np.int32).tolist(),
                                       self.conf, self.iou)
        keep = np.asarray(keep, np.int64).reshape(-1)
        keep = keep[np.argsort(-score[keep], kind="stable")][: self.max_det]
        boxes = np.concatenate([xywh[keep, :2], xywh[keep, :2] + xywh[keep, 2:]], 1)
        coefs = np.ascontiguousarray(cand[4 + nc :, keep].T)  # (K, nm)
        return boxes, score[keep], cls[keep].astype(np.int64), ("coefficients", coefs, np.asarray(protos[0], np.float32))

    def _decode_detections(self, outputs: dict):
        L = self.layout
        boxes, scores = self._output(outputs, "boxes"), self._output(outputs, "scores")
        classes, masks = self._output(outputs, "classes"), self._output(outputs, "masks")
        K = L.max_detections
        if boxes.shape != (1, K, 4) or scores.shape != (1, K) or classes.shape != (1, K) or masks.ndim != 4 or masks.shape[:2] != (1, K):
            raise InstanceError(f"outputs boxes {boxes.shape}, scores {scores.shape}, classes {classes.shape}, masks {masks.shape}; "
                                f"the layout expects (1, {K}, 4), (1, {K}), (1, {K}), (1, {K}, h, w)")
        s = scores[0].astype(np.float32)
        keep = np.flatnonzero(s > self.conf)
        keep = keep[np.argsort(-s[keep], kind="stable")][: self.max_det]
        if not keep.size:
            return None
        cls = np.rint(classes[0, keep]).astype(np.int64)
        if cls.min() < 0 or cls.max() >= L.num_classes:
            raise InstanceError(f"the graph returned class ids up to {cls.max()} for {L.num_classes} classes")
        picked, data = boxes[0, keep].astype(np.float32), np.asarray(masks[0, keep], np.float32)
        if L.mask_space == "box":  # each mask spans its own box: the box (input pixels) places it
            return picked, s[keep], cls, ("box_masks", data, picked.copy())
        return picked, s[keep], cls, ("masks", data, None)

    # -- masks --------------------------------------------------------------------------------
    def _to_frame(self, boxes: np.ndarray, frame_hw):
        """Input-pixel boxes -> frame-pixel boxes, and the affine from frame pixel to input pixel."""
        H, W = frame_hw
        lb = self.preprocess.letterbox(frame_hw)
        sx, sy = lb.width / W, lb.height / H  # input pixels per frame pixel
        out = np.empty_like(boxes)
        out[:, 0::2] = np.clip((boxes[:, 0::2] - lb.left) / sx, 0, W)
        out[:, 1::2] = np.clip((boxes[:, 1::2] - lb.top) / sy, 0, H)
        return out, (sx, lb.left), (sy, lb.top)

    def _assemble(self, source, rects: np.ndarray, ax, ay, proto_hw):
        """Each object's mask over its rect: prototype-resolution probabilities inside the box,
        warped (bilinear) to the rect's frame pixels, thresholded."""
        kind, data, protos = source
        if kind == "box_masks":
            return self._assemble_box_masks(data, protos, rects, ax, ay)
        ph, pw = proto_hw
        Hin, Win = self.preprocess.size
        # frame pixel x (its centre x + 0.5) -> input (x + 0.5) * s + pad -> prototype pixel coordinate
        a_x, a_y = ax[0] * pw / Win, ay[0] * ph / Hin
        b_x = (0.5 * ax[0] + ax[1]) * pw / Win - 0.5
        b_y = (0.5 * ay[0] + ay[1]) * ph / Hin - 0.5
        crops = []
        for k, (x0, y0, x1, y1) in enumerate(rects.tolist()):
            if x1 <= x0 or y1 <= y0:
                crops.append(np.zeros((max(0, y1 - y0), max(0, x1 - x0)), bool))
                continue
            i0 = int(np.clip(np.floor(a_x * x0 + b_x), 0, pw - 1))
            i1 = int(np.clip(np.floor(a_x * (x1 - 1) + b_x) + 2, i0 + 1, pw))
            j0 = int(np.clip(np.floor(a_y * y0 + b_y), 0, ph - 1))
            j1 = int(np.clip(np.floor(a_y * (y1 - 1) + b_y) + 2, j0 + 1, ph))
            if kind == "coefficients":
                logits = data[k] @ protos[:, j0:j1, i0:i1].reshape(len(data[k]), -1)
                patch = (1.0 / (1.0 + np.exp(-logits))).reshape(j1 - j0, i1 - i0).astype(np.float32)
            else:
                patch = np.ascontiguousarray(data[k, j0:j1, i0:i1])
            M = np.array([[a_x, 0.0, a_x * x0 + b_x - i0], [0.0, a_y, a_y * y0 + b_y - j0]])
            warped = cv2.warpAffine(patch, M, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REPLICATE)
            crops.append(warped > self.mask_threshold)
        return crops

    def _assemble_box_masks(self, masks: np.ndarray, boxes: np.ndarray, rects: np.ndarray, ax, ay):
        """Masks (K, M, M) over their own input-pixel boxes, each warped (bilinear) to its rect's
        frame pixels: a frame pixel's centre maps to input pixels, then into its box's M x M grid."""
        crops = []
        m_h, m_w = masks.shape[1:]
        for k, (x0, y0, x1, y1) in enumerate(rects.tolist()):
            if x1 <= x0 or y1 <= y0:
                crops.append(np.zeros((max(0, y1 - y0), max(0, x1 - x0)), bool))
                continue
            bx0, by0, bx1, by1 = (float(v) for v in boxes[k])
            a_x, a_y = ax[0] * m_w / max(bx1 - bx0, 1e-6), ay[0] * m_h / max(by1 - by0, 1e-6)
            b_x = (0.5 * ax[0] + ax[1] - bx0) * m_w / max(bx1 - bx0, 1e-6) - 0.5
            b_y = (0.5 * ay[0] + ay[1] - by0) * m_h / max(by1 - by0, 1e-6) - 0.5
            M = np.array([[a_x, 0.0, a_x * x0 + b_x], [0.0, a_y, a_y * y0 + b_y]])
            warped = cv2.warpAffine(np.ascontiguousarray(masks[k]), M, (x1 - x0, y1 - y0),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
            crops.append(warped > self.mask_threshold)
        return crops

    # -- the whole step ---------------------------------------------------------------------
    def __call__(self, outputs: dict, frame_hw, frame: np.ndarray | None = None, frame_index: int = 0,
                 timestamp: float | None = None) -> InstanceResult:
        t0 = time.perf_counter()
        frame_hw = (int(frame_hw[0]), int(frame_hw[1]))
        if not isinstance(outputs, dict):
            raise InstanceError("instance post-processing takes the engine's outputs by name (a dict)")
        common = dict(labels=self.labels, palette=self.palette, frame=frame, frame_index=frame_index, timestamp=timestamp)
        decoded = self._decode_yolo(outputs) if self.layout.layout == "yolo" else self._decode_detections(outputs)
        if decoded is None:
            result = InstanceResult.empty(frame_hw, **common)
        else:
            boxes, scores, classes, source = decoded
            xyxy, ax, ay = self._to_frame(boxes, frame_hw)
            rects = pixel_rects(xyxy, frame_hw)
            ok = (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])  # boxes that cover no pixel centre go
            if not ok.all():
                xyxy, scores, classes, rects = xyxy[ok], scores[ok], classes[ok], rects[ok]
                source = (source[0], source[1][ok], source[2][ok] if source[0] == "box_masks" else source[2])
            proto_hw = source[2].shape[1:] if source[0] == "coefficients" else source[1].shape[1:]
            crops = self._assemble(source, rects, ax, ay, proto_hw)
            result = InstanceResult(xyxy, scores, classes, rects, crops, frame_hw, **common)
        result.timings["postprocess"] = (time.perf_counter() - t0) * 1e3
        return result


def plain_masks(coefs: np.ndarray, protos: np.ndarray, boxes_frame: np.ndarray, pre: Preprocess, frame_hw,
                threshold: float = 0.5) -> np.ndarray:
    """The common way, for comparison (benchmarks, tests): every object's prototype mask upsampled
    to the input size, the letterbox cut away, resized to the frame, thresholded and cropped to
    its box. (K, H, W) bool; costs K x frame pixels."""
    H, W = frame_hw
    Hin, Win = pre.size
    lb = pre.letterbox(frame_hw)
    nm, ph, pw = protos.shape
    probs = 1.0 / (1.0 + np.exp(-(coefs @ protos.reshape(nm, -1)).reshape(-1, ph, pw)))
    out = np.zeros((len(coefs), H, W), bool)
    ys, xs = np.arange(H)[:, None] + 0.5, np.arange(W)[None, :] + 0.5
    for k, p in enumerate(probs):
        up = cv2.resize(p.astype(np.float32), (Win, Hin), interpolation=cv2.INTER_LINEAR)
        up = up[lb.top : lb.top + lb.height, lb.left : lb.left + lb.width]
        m = cv2.resize(up, (W, H), interpolation=cv2.INTER_LINEAR) > threshold
        x0, y0, x1, y1 = boxes_frame[k]
        out[k] = m & (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return out


__all__ = ["InstancePostprocessor", "plain_masks", "pixel_rects"]
