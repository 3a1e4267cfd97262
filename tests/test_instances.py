"""Instance segmentation foundations: synthetic instance scenes, COCO instances, box/mask AP,
InstanceResult, the post-processing and the tracker."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from edgeseg.data import DatasetError, InstanceAnnotations, SyntheticInstances, open_instances
from edgeseg.data.coco import COCOInstances
from edgeseg.instance_layout import InstanceLayout, LayoutError
from edgeseg.instance_metrics import InstanceEvaluator, MetricsError
from edgeseg.spec import Preprocess
from runtime.instance_postprocess import InstancePostprocessor, pixel_rects, plain_masks
from runtime.instances import InstanceError, InstanceResult, box_iou, mask_iou, match
from runtime.tracking import IoUTracker
from tests.instance_fixtures import yolo_outputs
from tests.test_datasets import coco_fixture

YOLO_PRE = Preprocess(size=(320, 320), resize="letterbox", mean=(0, 0, 0), std=(1, 1, 1), pad_value=114)


# -- synthetic instance scenes ------------------------------------------------------------------
def test_synthetic_instances_are_exact_and_crowded():
    ds = SyntheticInstances(size=(128, 160), length=60, split="test")
    assert ds.labels == ["ball", "box", "triangle", "star"] and len(ds) == 60
    same_class_scenes = touching_pairs = 0
    for i in range(len(ds)):
        img, ann, drawn = ds.scene(i)
        assert img.shape == (128, 160, 3) and img.dtype == np.uint8
        assert ann.masks.shape == (len(ann), 128, 160) and len(ann) >= 1
        # each annotation is exactly the object's visible pixels: together they are the class mask drawn
        np.testing.assert_array_equal(ann.semantic(), drawn)
        assert (ann.masks.sum(0) <= 1).all() and (ann.areas >= 24).all()
        np.testing.assert_array_equal(ann.xyxy, InstanceAnnotations(ann.masks, ann.class_id).xyxy)
        counts = np.bincount(ann.class_id)
        same_class_scenes += int(counts.max() >= 2)
        grown = [cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) for m in ann.masks]
        touching_pairs += sum(1 for a in range(len(ann)) for b in range(a + 1, len(ann))
                              if ann.class_id[a] == ann.class_id[b] and (grown[a] & ann.masks[b]).any())
    assert same_class_scenes >= 20, "scenes should often hold several objects of one class"
    assert touching_pairs >= 20, "objects of one class should often touch or overlap"
    a, b = ds[3], SyntheticInstances(size=(128, 160), length=60, split="test")[3]
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(SyntheticInstances(size=(128, 160), length=5, split="train")[3][0], a[0])
    with pytest.raises(IndexError):
        ds[60]


def test_open_instances_specs_and_errors(tmp_path):
    ds = open_instances("synthetic:val?n=3&size=64")
    assert isinstance(ds, SyntheticInstances) and len(ds) == 3 and ds.size == (64, 64)
    ann, images, _, _ = coco_fixture(tmp_path)
    assert isinstance(open_instances(f"coco:{ann}:{images}"), COCOInstances)
    with pytest.raises(DatasetError, match="no instance annotations.*coco:.*synthetic"):
        open_instances("voc:/data/VOC2012")
    with pytest.raises(DatasetError, match="empty dataset spec"):
        open_instances(" ")


@pytest.mark.parametrize("backend", ["builtin", "pycocotools"])
def test_coco_instances(tmp_path, backend):
    ann, images, _, _ = coco_fixture(tmp_path)
    ds = COCOInstances(ann, images, backend=backend)
    assert ds.labels == ["person", "car", "dog"]
    img, a = ds[0]
    assert img.shape[:2] == (20, 30) and len(a) == 3
    assert a.class_id.tolist() == [0, 2, 1] and a.iscrowd.tolist() == [False, False, True]
    person = np.zeros((20, 30), bool)
    person[2:12, 3:15] = True
    np.testing.assert_array_equal(a.masks[0], person)  # the person keeps its full mask under the dog
    np.testing.assert_array_equal(a.xyxy[0], [3, 2, 15, 12])
    _, b = ds[1]
    assert len(b) == 1 and b.areas.tolist() == [64 + 36]  # one annotation of two polygons


def test_instance_annotations_validate():
    with pytest.raises(DatasetError, match=r"\(N, H, W\)"):
        InstanceAnnotations(np.zeros((4, 4), bool), [0])
    with pytest.raises(DatasetError, match="class_id has 2 rows for 1 masks"):
        InstanceAnnotations(np.zeros((1, 4, 4), bool), [0, 1])
    with pytest.raises(DatasetError, match="image_size"):
        InstanceAnnotations(np.zeros((0, 0, 0), bool), [])
    empty = InstanceAnnotations(np.zeros((0, 0, 0), bool), [], image_size=(5, 7))
    assert empty.masks.shape == (0, 5, 7) and empty.semantic().shape == (5, 7)


# -- box and mask AP ----------------------------------------------------------------------------
class _Pred:
    def __init__(self, xyxy, class_id, confidence, masks):
        self.xyxy, self.class_id, self.confidence, self.masks = xyxy, class_id, confidence, masks

    def __len__(self):
        return len(self.xyxy)


def test_ap_perfect_shifted_and_missing():
    ds = SyntheticInstances(size=(96, 96), length=25, split="test")
    perfect, shifted, half = (InstanceEvaluator(ds.labels) for _ in range(3))
    for i in range(len(ds)):
        _, a = ds[i]
        ones = np.ones(len(a))
        perfect.add(_Pred(a.xyxy, a.class_id, ones, a.masks), a)
        shifted.add(_Pred(a.xyxy, a.class_id, ones, np.roll(a.masks, 3, axis=2)), a)
        keep = np.arange(len(a)) % 2 == 0
        half.add(_Pred(a.xyxy[keep], a.class_id[keep], ones[keep], a.masks[keep]), a)
    p = perfect.summary()
    assert p["box"] == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0} and p["mask"] == p["box"]
    assert p["images"] == 25 and p["objects"] == p["detections"]
    assert set(p["per_class"]) == set(ds.labels)
    s = shifted.summary()
    assert s["box"]["AP"] == 1.0 and s["mask"]["AP"] < 0.9 and s["mask"]["AP50"] > s["mask"]["AP75"]
    h = half.summary()
    assert 0.3 < h["mask"]["AP50"] < 0.8  # about half of the objects found


def test_ap_errors_and_edge_cases(monkeypatch):
    ds = SyntheticInstances(size=(64, 64), length=2, split="test")
    _, a = ds[0]
    ev = InstanceEvaluator(ds.labels)
    with pytest.raises(MetricsError, match="masks have shape"):
        ev.add(_Pred(a.xyxy, a.class_id, np.ones(len(a)), a.masks[:, :32]), a)
    ev = InstanceEvaluator(ds.labels[:1])
    bad = InstanceAnnotations(a.masks, np.full(len(a), 3))
    with pytest.raises(MetricsError, match="class id 3 is outside the model's 1 classes"):
        ev.add(_Pred(a.xyxy, a.class_id, np.ones(len(a)), a.masks), bad)
    ev = InstanceEvaluator(ds.labels)
    ev.add(_Pred(np.zeros((0, 4)), [], [], np.zeros((0, 64, 64), bool)), a)
    assert ev.summary()["mask"]["AP"] == 0.0  # objects, no detections
    with pytest.raises(MetricsError, match="no images"):
        InstanceEvaluator(ds.labels).summary()
    import builtins

    real = builtins.__import__

    def no_coco(name, *args, **kw):
        if name.startswith("pycocotools"):
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_coco)
    with pytest.raises(MetricsError, match="pip install pycocotools"):
        InstanceEvaluator(ds.labels)


# -- InstanceResult -----------------------------------------------------------------------------
def _result(frame_hw=(40, 60)):
    crops = [np.ones((10, 10), bool), np.zeros((5, 20), bool), np.ones((8, 8), bool)]
    crops[1][1:4, 2:18] = True
    return InstanceResult(
        xyxy=[[2, 3, 12, 13], [30, 30, 50, 35], [6, 8, 14, 16]], confidence=[0.9, 0.4, 0.7], class_id=[0, 1, 0],
        mask_rects=[[2, 3, 12, 13], [30, 30, 50, 35], [6, 8, 14, 16]], mask_crops=crops, frame_size=frame_hw,
        labels=["ball", "box"], palette=[[255, 0, 0], [0, 255, 0]], frame=np.zeros((*frame_hw, 3), np.uint8))


def test_instance_result_rows_masks_and_maps():
    r = _result()
    assert len(r) == 3 and r.names == ["ball", "box", "ball"] and r.areas.tolist() == [100, 48, 64]
    confident = r[r.confidence > 0.5]
    assert len(confident) == 2 and confident.class_id.tolist() == [0, 0] and len(r) == 3
    assert len(r[1]) == 1 and r[1].names == ["box"] and len(r[1:]) == 2 and len(r[[2, 0]]) == 2
    m = r.mask(0)
    assert m.shape == (40, 60) and m.sum() == 100 and m[3:13, 2:12].all()
    masks = r.masks()
    assert masks.shape == (3, 40, 60) and masks.sum() == 212
    cm = r.class_map()
    assert cm[3, 2] == 1 and cm[31, 33] == 2 and cm[0, 0] == 0
    # where masks overlap the more confident object wins (both are balls here: class 1)
    assert (cm[8:13, 6:12] == 1).all()
    polys = r.polygons(1)
    assert len(polys) == 1 and polys[0][:, 0].min() == 32 and polys[0][:, 1].min() == 31
    assert len(InstanceResult.empty((4, 4))) == 0 and InstanceResult.empty((4, 4)).masks().shape == (0, 4, 4)
    assert "objects=3" in repr(r)
    with pytest.raises(InstanceError, match="confidence has 2 rows for 3 masks"):
        InstanceResult(r.xyxy, [0.1, 0.2], r.class_id, r.mask_rects, r.mask_crops, r.frame_size)


def test_overlay_one_colour_per_instance_and_captions():
    r = _result((60, 90))
    r.mask_rects[:, 1] += 15
    r.mask_rects[:, 3] += 15
    r.xyxy[:, 1::2] += 15
    img = r.overlay(alpha=1.0, captions=False, outline=0)
    c0, c2 = img[19, 4], img[28, 12]
    assert c0.any() and c2.any() and not np.array_equal(c0, c2), "two balls, two colours"
    tracked = r[[0]]
    tracked.tracker_id = np.array([7])
    again = r[[0]]
    again.tracker_id = np.array([7])
    a, b = tracked.overlay(alpha=1.0, captions=False), again.overlay(alpha=1.0, captions=False)
    np.testing.assert_array_equal(a, b)
    captioned = r.overlay()
    assert (captioned[0:15] != 0).any(), "captions sit above the boxes"
    with pytest.raises(Exception, match="does not match the result's size"):
        r.overlay(np.zeros((10, 10, 3), np.uint8))


# -- post-processing ----------------------------------------------------------------------------
def _post(nm=8, **kw):
    return InstancePostprocessor(SyntheticInstances.labels, SyntheticInstances.palette, YOLO_PRE,
                                 InstanceLayout("yolo", 4, nm, {"predictions": "output0", "protos": "output1"}), **kw)


@pytest.mark.parametrize("frame_hw", [(360, 640), (320, 320), (400, 300)])
def test_postprocess_finds_each_object_once_with_its_mask(frame_hw):
    ds = SyntheticInstances(size=frame_hw, length=6, split="test")
    post = _post(iou=0.7)  # the scenes' same-class neighbours overlap their boxes by up to ~0.6
    for i in range(len(ds)):
        img, ann = ds[i]
        pred, protos = yolo_outputs(ann, YOLO_PRE, frame_hw, num_masks=8)
        r = post({"output0": pred, "output1": protos}, frame_hw, frame=img)
        truth = InstanceResult(ann.xyxy, np.ones(len(ann)), ann.class_id, pixel_rects(ann.xyxy, frame_hw),
                               [m[y0:y1, x0:x1] for m, (x0, y0, x1, y1) in zip(ann.masks, pixel_rects(ann.xyxy, frame_hw))],
                               frame_hw)
        pairs = match(r, truth, iou=0.9)
        assert len(r) == len(ann) and len(pairs) == len(ann), "each object once: the shifted duplicates are suppressed"
        # the masks are those of the plain approach (every mask upsampled to the frame), up to resampling
        dec = post._decode_yolo({"output0": pred, "output1": protos})
        xyxy = post._to_frame(dec[0], frame_hw)[0]
        plain = plain_masks(dec[3][1], dec[3][2], xyxy, YOLO_PRE, frame_hw)
        for k in range(len(r)):
            inter, union = (r.mask(k) & plain[k]).sum(), (r.mask(k) | plain[k]).sum()
            assert inter / union >= 0.985
        assert r.timings["postprocess"] > 0


def test_postprocess_detections_layout_and_filters():
    frame_hw = (360, 640)
    img, ann = SyntheticInstances(size=frame_hw, length=3, split="test")[1]
    pred, protos = yolo_outputs(ann, YOLO_PRE, frame_hw, num_masks=8)
    raw = _post()({"output0": pred, "output1": protos}, frame_hw)
    # the same objects in the in-graph-tail layout: boxes, scores, classes, masks at prototype resolution
    post = _post()
    boxes, scores, classes, (_, coefs, P) = post._decode_yolo({"output0": pred, "output1": protos})
    K = 10
    out = {"boxes": np.zeros((1, K, 4), np.float32), "scores": np.zeros((1, K), np.float32),
           "classes": np.zeros((1, K), np.int64), "masks": np.zeros((1, K, *P.shape[1:]), np.float32)}
    n = len(boxes)
    out["boxes"][0, :n], out["scores"][0, :n], out["classes"][0, :n] = boxes, scores, classes
    out["masks"][0, :n] = 1 / (1 + np.exp(-(coefs @ P.reshape(len(P), -1)).reshape(n, *P.shape[1:])))
    tail = InstancePostprocessor(SyntheticInstances.labels, SyntheticInstances.palette, YOLO_PRE,
                                 InstanceLayout("detections", 4, 8, max_detections=K))(out, frame_hw)
    assert len(tail) == len(raw) and tail.class_id.tolist() == raw.class_id.tolist()
    np.testing.assert_allclose(tail.xyxy, raw.xyxy, atol=1e-3)
    for k in range(len(raw)):
        assert mask_iou(tail, k, raw, k) == 1.0
    assert len(_post(conf=0.99)({"output0": pred, "output1": protos}, frame_hw)) == 0
    assert len(_post(max_det=1)({"output0": pred, "output1": protos}, frame_hw)) == 1


def test_postprocess_errors_name_the_problem():
    frame_hw = (320, 320)
    _, ann = SyntheticInstances(size=frame_hw, length=1, split="test")[0]
    pred, protos = yolo_outputs(ann, YOLO_PRE, frame_hw, num_masks=8)
    post = _post()
    with pytest.raises(InstanceError, match="expects 'output1' \\(protos\\)"):
        post({"output0": pred}, frame_hw)
    with pytest.raises(InstanceError, match=r"\(1, 16, anchors\) = 4 box \+ 4 classes \+ 8 coefficients"):
        post({"output0": pred[:, :10], "output1": protos}, frame_hw)
    with pytest.raises(InstanceError, match="a dict"):
        post(pred, frame_hw)
    with pytest.raises(InstanceError, match="conf must be a number in 0..1"):
        _post(conf=1.5)
    with pytest.raises(InstanceError, match="max_det must be an integer"):
        _post(max_det=0)
    with pytest.raises(InstanceError, match="3 labels but its instance layout 4 classes"):
        InstancePostprocessor(["a", "b", "c"], [[0, 0, 0]] * 3, YOLO_PRE, InstanceLayout("yolo", 4, 8))
    with pytest.raises(InstanceError, match="inside the graph at IoU"):
        InstancePostprocessor(SyntheticInstances.labels, SyntheticInstances.palette, YOLO_PRE,
                              InstanceLayout("detections", 4, 8), iou=0.9)


def test_instance_layout_validates_untrusted_fields():
    assert InstanceLayout.from_dict({"layout": "yolo", "num_classes": 3}).outputs == {"predictions": "predictions", "protos": "protos"}
    for bad, msg in [({"layout": "ssd", "num_classes": 3}, "layout must be one of"),
                     ({"layout": "yolo", "num_classes": -1}, "num_classes must be an integer"),
                     ({"layout": "yolo", "num_classes": True}, "num_classes must be an integer"),
                     ({"layout": "yolo", "num_classes": 2, "iou_threshold": 3}, "iou_threshold must be a number in 0..1"),
                     ({"layout": "yolo", "num_classes": 2, "outputs": {"boxes": "x"}}, "maps \\['predictions', 'protos'\\]"),
                     ({"layout": "yolo", "num_classes": 2, "colour": 1}, "unknown fields \\['colour'\\]"),
                     ({"num_classes": 2}, "needs 'layout'"), ([1], "expected an object")]:
        with pytest.raises(LayoutError, match=msg):
            InstanceLayout.from_dict(bad)


# -- tracking -----------------------------------------------------------------------------------
def _boxes_result(boxes, classes=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    rects = boxes.astype(np.int32)
    crops = [np.ones((y1 - y0, x1 - x0), bool) for x0, y0, x1, y1 in rects]
    return InstanceResult(boxes, np.ones(len(boxes)), np.zeros(len(boxes)) if classes is None else classes,
                          rects, crops, (200, 300))


def test_tracker_keeps_ids_through_motion_and_misses():
    t = IoUTracker(iou_threshold=0.3, max_age=2)
    a, b = np.array([10, 10, 40, 40.0]), np.array([100, 50, 140, 90.0])
    first = t.update(_boxes_result([a, b]))
    assert first.tracker_id.tolist() == [1, 2]
    for step in range(1, 6):  # both move 6 px a frame (20% of their size): rows come in any order
        r = t.update(_boxes_result([b + 6 * step, a + [6 * step, 0, 6 * step, 0]]))
        assert r.tracker_id.tolist() == [2, 1]
    r = t.update(_boxes_result([b + 36]))  # a is missed once ...
    assert r.tracker_id.tolist() == [2]
    r = t.update(_boxes_result([a + [48, 0, 48, 0], b + 42]))  # ... and found where its motion predicts
    assert r.tracker_id.tolist() == [1, 2]
    for _ in range(3):
        t.update(_boxes_result(np.zeros((0, 4))))
    assert t.active == 0
    assert t.update(_boxes_result([a])).tracker_id.tolist() == [3], "after max_age a new id"
    assert t.update(_boxes_result([a], classes=[1])).tracker_id.tolist() == [4], "another class is another object"
    t.reset()
    assert t.update(_boxes_result([a])).tracker_id.tolist() == [1]
    with pytest.raises(InstanceError, match="max_age"):
        IoUTracker(max_age=-1)
    with pytest.raises(InstanceError, match="iou_threshold"):
        IoUTracker(iou_threshold=0)


def test_box_iou_and_match():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    b = np.array([[5, 0, 15, 10]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[1 / 3], [0]])
    assert match(_boxes_result(a), _boxes_result(b), iou=0.3) == [(0, 0)]
    assert match(_boxes_result(a), _boxes_result(b), iou=0.5) == []


def test_runtime_instance_modules_do_not_import_torch():
    code = ("import sys; import runtime.instances, runtime.instance_postprocess, runtime.tracking, runtime.annotators, "
            "edgeseg.instance_metrics, edgeseg.data.instances; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
