"""Instance bundles end to end on the embedded default instance model: conversion with and without
the in-graph tail (parity with torch on what users see), the Segmenter's instance path with stable
track ids, and YOLO-seg-layout ONNX files (Ultralytics' export layout) imported from their metadata."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeseg.train_default_instance import DEFAULT_INSTANCE_CHECKPOINT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from converters.onnx import convert

    root = tmp_path_factory.mktemp("instance-bundles")
    return {tail: convert(str(DEFAULT_INSTANCE_CHECKPOINT), root / f"tail{int(tail)}", instance_tail=tail, parity_frames=4)
            for tail in (False, True)}


@pytest.mark.parametrize("tail", [False, True])
def test_default_instance_model_converts_with_parity(bundles, tail):
    b = bundles[tail]
    m = b.manifest
    assert m.task == "instance-segmentation" and m.output_kind == "instances"
    assert m.instances["layout"] == ("detections" if tail else "yolo")
    assert m.labels == ["ball", "box", "triangle", "star"]
    p = m.artifacts[0].parity
    # same detections: every object of torch found by ONNX and none more, masks at IoU >= 0.99
    assert p["ok"] and p["matched"] == p["detections_reference"] == p["detections"] > 0, p
    assert p["min_mask_iou"] >= 0.99
    onnx_ops = set(m.model["export"]["ops"])
    assert ("NonMaxSuppression" in onnx_ops) == tail


def test_instance_segmenter_results_and_tracks(bundles, tmp_path):
    from edgeseg.data.synthetic import SyntheticInstances
    from runtime.instances import InstanceResult
    from runtime.segmenter import Segmenter

    img, ann = SyntheticInstances(size=(360, 640), length=1, split="test")[0]
    results = {}
    for tail, b in bundles.items():
        with Segmenter(b.path) as seg:
            r = seg.segment(img)
            assert isinstance(r, InstanceResult) and r.size == (360, 640) and len(r) >= 1
            assert r.tracker_id is not None
            results[tail] = r
            # a stream: ids stay with their objects from frame to frame, the overlay video is written
            ids = [s.tracker_id.tolist() for s in seg.stream("synthetic://?frames=12&width=640&height=360&seed=7",
                                                              save=str(tmp_path / f"o{int(tail)}.mp4"), legend=True)]
            assert len(ids) == 12 and ids[0] and set(ids[1]) & set(ids[0]) == set(ids[0]) & set(ids[1])
            stable = sum(len(set(a) & set(b)) for a, b in zip(ids, ids[1:])) / max(1, sum(len(a) for a in ids[:-1]))
            assert stable > 0.8, ids
            assert (tmp_path / f"o{int(tail)}.mp4").stat().st_size > 0
    a, b = results[False], results[True]
    assert sorted(a.class_id.tolist()) == sorted(b.class_id.tolist())
    # semantic options are refused on instance bundles, naming the instance ones
    with pytest.raises(Exception, match="conf="):
        Segmenter(bundles[False].path, threshold=0.5)


def test_eval_reports_box_and_mask_ap_per_artifact(bundles, capsys):
    from edgeseg.cli import main

    assert main(["eval", str(bundles[True].path), "--data", "synthetic:test?n=12&size=360x640", "--max-images", "12"]) == 0
    out = capsys.readouterr().out
    assert "box AP" in out and "mask AP" in out and "model.onnx" in out
    from calibration.instance_accuracy import evaluate_instance_bundle

    r = evaluate_instance_bundle(bundles[False].path, "synthetic:test?n=12&size=360x640")
    assert r["images"] == 12 and r["results"][0]["mask"]["AP50"] > 0.5  # a trained model on its own kind of scenes


def test_demo_task_instance_writes_overlay_and_stats(tmp_path):
    from edgeseg.cli import main

    assert main(["demo", "--task", "instance", "--frames", "8", "--out", str(tmp_path)]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert (tmp_path / "overlay.mp4").stat().st_size > 0 and stats


def test_int8_instance_bundle_reports_mask_ap_before_and_after(bundles, tmp_path):
    import shutil

    from edgeseg.bundle import Bundle
    from edgeseg.cli import main

    b = tmp_path / "q"
    shutil.copytree(bundles[False].path, b)
    code = main(["calibrate", str(b), "--data", "synthetic:train?n=8&size=360x640", "--target", "cpu",
                 "--eval-data", "synthetic:test?n=8&size=360x640", "--eval-max-images", "8", "--max-ap-drop", "100"])
    assert code == 0
    art = Bundle.load(b).select("onnxruntime", "int8")
    m = art.metrics
    assert art.target == "cpu" and m["within_budget"] and 0 <= m["mask_AP_int8"] <= 1 and m["mask_AP_fp32"] > 0.3
    assert m["rounds"][0]["float_nodes"] == 0
