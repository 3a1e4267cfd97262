"""Writers of one bundle at the same time, and writers killed half-way: real `edgeseg` processes.

- two `edgeseg calibrate` at once (targets cpu and tensorrt) both land in the manifest;
- `kill -9` during `calibrate` and during `convert --precision int8` leaves a temporary behind,
  which the next write to the bundle removes, and the bundle still loads;
- SIGTERM ends `edgeseg run` like Ctrl-C: a playable video, stats written, exit status 143.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest

from edgeseg.bundle import Bundle
from edgeseg.files import TMP_PREFIX

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# as small as calibration gets: few frames, no per-layer analysis, a budget that needs no search
QUICK = ["--data", "synthetic:train", "--max-images", "8", "--eval-max-images", "4", "--no-sensitivity",
         "--max-miou-drop", "100"]


def edgeseg(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeseg.cli", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def temporaries(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders if f.exists() for p in f.iterdir() if p.name.startswith(TMP_PREFIX))


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(every)
    return False


@pytest.fixture
def bundle(tmp_path, default_bundle) -> Path:
    b = tmp_path / "bundle"
    shutil.copytree(default_bundle.path, b)
    return b


def test_two_calibrations_at_once_both_land(bundle):
    procs = [edgeseg("calibrate", bundle, "--target", t, *QUICK) for t in ("cpu", "tensorrt")]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    arts = {(a.path, a.target) for a in Bundle.load(bundle).manifest.artifacts}
    assert {("model.onnx", None), ("model.int8.cpu.onnx", "cpu"), ("model.int8.tensorrt.onnx", "tensorrt")} <= arts
    targets = Bundle.load(bundle).manifest.metrics["quantization"]["targets"]
    assert set(targets) == {"cpu", "tensorrt"}
    b = Bundle.load(bundle)
    for a in b.manifest.artifacts:
        b.artifact_path(a)  # every checksum matches the file that is there
    assert temporaries(bundle, bundle.parent) == []


def _kill_when(proc: subprocess.Popen, folder: Path, timeout: float = 600) -> list[str]:
    """SIGKILL `proc` once a temporary of it shows in `folder`; return the temporaries left."""
    seen = wait_for(lambda: temporaries(folder), timeout, proc)
    if not seen:
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"no temporary appeared before the command ended (status {proc.returncode}): {err[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return temporaries(folder)


def test_kill_9_during_calibrate_then_the_next_write_cleans_up(bundle):
    before = (bundle / "manifest.json").read_text()
    left = _kill_when(edgeseg("calibrate", bundle, "--target", "cpu", *QUICK), bundle)
    assert left and all(n.startswith(TMP_PREFIX) for n in left)  # the killed writer's staging folder
    assert (bundle / "manifest.json").read_text() == before  # the manifest was not touched
    Bundle.load(bundle)
    p = edgeseg("build", bundle, "--prepare-only", "--precision", "fp16")  # another command writing the bundle
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert temporaries(bundle, bundle.parent) == []
    b = Bundle.load(bundle)
    assert {a.path for a in b.manifest.artifacts} == {"model.onnx", "model.fp16.onnx"}


def test_kill_9_during_convert_int8_then_the_next_write_cleans_up(tmp_path):
    out_dir = tmp_path / "b"
    p = edgeseg("convert", "default", "--out", out_dir, "--precision", "int8", "--calib", "synthetic:train",
                "--target", "cpu", "--max-miou-drop", "100")
    # wait for the INT8 step: the FP32 bundle is in place and calibration stages inside it
    left = _kill_when(p, out_dir, timeout=900)
    assert left
    Bundle.load(out_dir)  # the FP32 bundle written before the kill is whole
    again = edgeseg("build", out_dir, "--prepare-only", "--precision", "fp16")  # the next write to the same bundle
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert temporaries(out_dir, tmp_path) == []
    assert {a.path for a in Bundle.load(out_dir).manifest.artifacts} == {"model.onnx", "model.fp16.onnx"}


def test_sigterm_ends_run_like_ctrl_c(tmp_path, default_bundle):
    video, stats = tmp_path / "overlay.mp4", tmp_path / "stats.json"
    p = edgeseg("run", default_bundle.path, "--source", "synthetic://?frames=0&width=320&height=180", "--out", video,
                "--stats-json", stats)
    assert wait_for(stats.exists, 300, p), p.communicate(timeout=30)[1]  # written every 2 s while running
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    summary = json.loads(stats.read_text())
    cap = cv2.VideoCapture(str(video))
    frames = 0
    while cap.read()[0]:
        frames += 1
    cap.release()
    assert frames > 0 and summary["frames_out"] >= frames - 2  # the video holds what was delivered
    assert temporaries(tmp_path) == []


def test_sigterm_during_calibrate_removes_its_staging(bundle):
    p = edgeseg("calibrate", bundle, "--target", "cpu", *QUICK)
    assert wait_for(lambda: temporaries(bundle), 600, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert temporaries(bundle, bundle.parent) == []
    assert [a.path for a in Bundle.load(bundle).manifest.artifacts] == ["model.onnx"]


def test_no_absolute_path_of_this_machine_in_any_bundle_file(tmp_path):
    """Converted from a checkpoint and calibrated from a folder, both under tmp_path: no file of the
    bundle (manifest, graphs and their metadata, reports, cache) names tmp_path or this checkout."""
    from edgeseg.train import DEFAULT_CHECKPOINT

    ckpt = tmp_path / "models" / "mine.pt"
    ckpt.parent.mkdir()
    shutil.copyfile(DEFAULT_CHECKPOINT, ckpt)
    frames = tmp_path / "frames"
    frames.mkdir()
    from runtime.sources import open_source

    with open_source("synthetic://?frames=40&width=160&height=96") as src:
        for f in src:
            cv2.imwrite(str(frames / f"{f.index:03d}.jpg"), f.image)
    b = tmp_path / "bundle"
    for args in (["convert", ckpt, "--out", b],
                 ["calibrate", b, "--data", frames, "--target", "both", "--max-images", "8", "--eval-max-images", "4",
                  "--no-sensitivity", "--max-miou-drop", "100"],
                 ["build", b, "--prepare-only", "--precision", "fp16"]):
        p = edgeseg(*args)
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
    files = [f for f in b.rglob("*") if f.is_file()]
    assert {"manifest.json", "model.onnx", "model.int8.cpu.onnx", "model.int8.tensorrt.onnx", "model.fp16.onnx",
            "quant_report.json", "quant_report.png", "calibration.cache"} <= {f.name for f in files}
    machine = {str(tmp_path).encode(), str(tmp_path.resolve()).encode(), str(ROOT).encode()}
    leaks = [(f.name, m.decode()) for f in files for m in machine if m in f.read_bytes()]
    assert leaks == []
    m = Bundle.load(b).manifest
    assert m.model["checkpoint"] == "mine.pt"
    assert m.artifacts[1].info["calibration_data"].startswith("frames (40 images)")
