"""The command line as a user meets it: the demo end to end, and bad input with clear errors."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edgeseg.cli import main
from tests.conftest import ROOT


def test_demo_writes_overlay_and_stats(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--frames", "24", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FPS" in printed or "fps" in printed
    cap = cv2.VideoCapture(str(out / "overlay.mp4"))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (360, 640, 3) and n == 24
    stats = json.loads((out / "stats.json").read_text())
    text = json.dumps(stats)
    for stage in ("preprocess", "infer", "postprocess"):
        assert stage in text, f"stats.json lacks the {stage} stage"
    # a second run reuses the converted bundle
    assert main(["demo", "--frames", "4", "--out", str(out)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_masks_follow_moving_objects(default_bundle):
    """The runtime's class maps on a moving synthetic clip match the exact masks."""
    from edgeseg.data.synthetic import SyntheticClip
    from edgeseg.metrics import ConfusionMatrix
    from runtime.segmenter import Segmenter

    seg = Segmenter(default_bundle, backend="onnxruntime")
    cm = ConfusionMatrix(len(default_bundle.manifest.labels))
    first_last = []
    for i, (frame, mask) in enumerate(SyntheticClip(size=(360, 640), frames=12, seed=3)):
        r = seg.segment(frame)
        cm.update(r.class_map, mask)
        if i in (0, 11):
            first_last.append(r.class_map)
    assert cm.miou() > 0.8, cm.summary(default_bundle.manifest.labels)
    assert np.mean(first_last[0] != first_last[1]) > 0.005  # the objects moved and the masks with them


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgeseg.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_missing_and_corrupt_model_file(tmp_path):
    r = run_cli("convert", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "model file not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    r = run_cli("convert", str(bad), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr
    assert not (tmp_path / "b").exists()


def test_broken_bundle_manifest(tmp_path, default_bundle):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(default_bundle.path, b)
    (b / "manifest.json").write_text('{"schema_version": 1, "labels": ')
    for cmd in (["inspect", str(b)], ["run", str(b), "--source", "synthetic://?frames=2"]):
        r = run_cli(*cmd)
        assert r.returncode == 2, r.stderr
        assert "not valid JSON" in r.stderr and "edgeseg convert" in r.stderr


def test_source_that_cannot_be_opened(tmp_path, default_bundle):
    r = run_cli("run", str(default_bundle.path), "--source", str(tmp_path / "nope.mp4"))
    assert r.returncode == 2 and "nope.mp4" in r.stderr and "Traceback" not in r.stderr


def test_wrong_frame_type(default_bundle):
    from edgeseg.spec import FrameError
    from runtime.segmenter import Segmenter

    seg = Segmenter(default_bundle, backend="onnxruntime")
    with pytest.raises(FrameError, match="single-channel"):
        seg.segment(np.zeros((64, 64), np.uint8))
    with pytest.raises(FrameError, match="uint8"):
        seg.segment(np.zeros((64, 64, 3), np.float64))


def test_inspect_bundle_and_onnx(default_bundle, capsys):
    assert main(["inspect", str(default_bundle.path)]) == 0
    out = capsys.readouterr().out
    assert "background, ball, box, triangle, star" in out and "TensorRT preflight: ok" in out
    assert main(["inspect", str(default_bundle.path / "model.onnx"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["inputs"][0]["shape"] == [1, 3, 256, 256] and "Conv" in facts["ops"]
