"""A newcomer's first hour, scripted: the CLI driven in subprocesses as a new user would.

Progress shows on a terminal (stderr on a pty) and not with --quiet or in a pipe, and never in
stdout; the README's browser-view command is still serving after 20 s; the demo's video is H.264;
mistakes get messages that say what to type instead.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BAR = re.compile(r"\d+%\|")  # a tqdm bar with a total: " 40%|████"


def edgeseg(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with stdout and stderr piped (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "edgeseg", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def edgeseg_on_terminal(*args, timeout=600, cwd=None) -> tuple[int, str, str]:
    """The CLI with stderr on a pseudo-terminal (100x30) and stdout piped: (status, stdout, stderr)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "edgeseg", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, cwd=cwd)
    os.close(slave)
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        reader.join(10)
        os.close(master)
    return proc.returncode, out.decode(errors="replace"), b"".join(chunks).decode(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """`edgeseg convert default` on a terminal: the phases and the parity bar show, stdout has the result only."""
    out = tmp_path_factory.mktemp("newcomer") / "bundle"
    status, stdout, stderr = edgeseg_on_terminal("convert", "default", "--out", out)
    assert status == 0, stderr[-3000:]
    assert "export (torchscript exporter)  done in" in stderr and "simplify (onnxsim)  done in" in stderr
    assert BAR.search(stderr) and "parity check" in stderr
    assert stdout.startswith(f"wrote {out}") and not BAR.search(stdout) and "done in" not in stdout
    return out


def test_convert_shows_progress_on_a_terminal_only(bundle, tmp_path):
    """(the terminal case is the `bundle` fixture) --quiet on a terminal, and a pipe, show no bars."""
    status, _, stderr = edgeseg_on_terminal("convert", "default", "--out", tmp_path / "quiet", "--quiet")
    assert status == 0, stderr[-3000:]
    assert not BAR.search(stderr) and "done in" not in stderr, stderr
    r = edgeseg("convert", "default", "--out", tmp_path / "piped")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not BAR.search(r.stderr) and "done in" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def calibrated(bundle, tmp_path_factory) -> tuple[Path, str]:
    """`edgeseg calibrate` on a terminal, small and fast: both targets, minmax ranges."""
    work = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(bundle, work)
    status, stdout, stderr = edgeseg_on_terminal("calibrate", work, "--data", "synthetic:train", "--method", "minmax",
                                                 "--max-images", "8", "--eval-max-images", "8", "--no-sensitivity")
    assert status == 0, stderr[-3000:]
    return work, stderr


def test_calibrate_shows_progress(calibrated):
    _, stderr = calibrated
    for bar in ("reading calibration frames: 100%|", "minmax ranges: 100%|", "parity check: 100%|"):
        assert bar in stderr, stderr[-3000:]
    assert "minmax thresholds  done in" in stderr


def test_calibrate_quiet(bundle, tmp_path):
    work = tmp_path / "bundle"
    shutil.copytree(bundle, work)
    status, _, stderr = edgeseg_on_terminal("calibrate", work, "--data", "synthetic:train", "--method", "minmax",
                                            "--target", "cpu", "--max-images", "4", "--eval-max-images", "4",
                                            "--no-sensitivity", "--quiet")
    assert status == 0, stderr[-3000:]
    assert not BAR.search(stderr) and "done in" not in stderr, stderr


def test_eval_shows_progress_and_keeps_json_clean(bundle, tmp_path):
    figures = tmp_path / "eval.json"
    status, stdout, stderr = edgeseg_on_terminal("eval", bundle, "--data", "synthetic:test?n=8", "--json", figures)
    assert status == 0, stderr[-3000:]
    assert "reading evaluation frames: 100%|" in stderr and "model.onnx: 100%|" in stderr
    assert not BAR.search(stdout)
    assert json.loads(figures.read_text())["results"][0]["path"] == "model.onnx"
    status, _, stderr = edgeseg_on_terminal("eval", bundle, "--data", "synthetic:test?n=4", "-q")
    assert status == 0 and not BAR.search(stderr), stderr


def test_inspect_json_stays_parseable_on_a_terminal(bundle):
    status, stdout, stderr = edgeseg_on_terminal("inspect", bundle, "--json")
    assert status == 0, stderr
    assert json.loads(stdout)["labels"][0] == "background"


def test_run_shows_frames_fps_and_eta(bundle):
    status, stdout, stderr = edgeseg_on_terminal("run", bundle, "--source", "synthetic://?frames=40&width=320&height=180")
    assert status == 0, stderr[-3000:]
    assert "frames: 100%|" in stderr and "40/40 frames" in stderr and "FPS" in stderr
    assert stdout.startswith("40 frames in")
    status, _, stderr = edgeseg_on_terminal("run", bundle, "--source", "synthetic://?frames=10&width=320&height=180", "--quiet")
    assert status == 0 and not BAR.search(stderr), stderr


def test_run_int8_says_which_target_graph_and_why(calibrated):
    work, _ = calibrated
    r = edgeseg("run", work, "--source", "synthetic://?frames=4&width=128&height=96", "--precision", "int8")
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("int8:"))
    assert "model.int8.cpu.onnx" in line and "the graph quantized for onnxruntime" in line
    assert "not model.int8.tensorrt.onnx (for tensorrt)" in line


def test_readme_serve_command_keeps_serving(bundle):
    """The browser view exactly as the README shows it, on a free port: still serving after 20 s."""
    readme = (ROOT / "README.md").read_text()
    line = next(ln.strip() for ln in readme.splitlines()
                if ln.strip().startswith("edgeseg run") and "--serve" in ln and "synthetic://" in ln)
    args = shlex.split(line.split("#")[0])
    assert args[:2] == ["edgeseg", "run"]
    port = free_port()
    args = [str(bundle)] + [a.replace("8080", str(port)) for a in args[3:]]  # our bundle in place of the README's
    proc = subprocess.Popen([sys.executable, "-m", "edgeseg", "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 22:
            time.sleep(2)
            assert proc.poll() is None, f"stopped serving after {time.monotonic() - t0:.0f} s: {proc.stderr.read().decode()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats.json", timeout=5) as resp:
                    seen.append(json.loads(resp.read())["frames_out"])
            except OSError:
                continue  # still starting
        assert time.monotonic() - t0 >= 20 and proc.poll() is None
        assert len(seen) >= 5 and seen[-1] > seen[len(seen) // 2] > 0, seen  # frames keep coming, also late on
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/frame.jpg", timeout=5) as resp:
            frame = cv2.imdecode(np.frombuffer(resp.read(), np.uint8), cv2.IMREAD_COLOR)
        assert frame is not None and frame.shape[2] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 130, proc.stderr.read().decode()[-2000:]


def test_demo_overlay_is_h264(tmp_path):
    av = pytest.importorskip("av")
    from runtime.sinks import h264_encoder

    if h264_encoder()[0] is None:
        pytest.skip(f"no H.264 encoder: {h264_encoder()[1]}")
    r = edgeseg("demo", "--frames", "24", "--out", tmp_path / "demo")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(H.264, " in r.stdout
    with av.open(str(tmp_path / "demo" / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="bgr24") for f in container.decode(stream)]
    assert len(frames) == 24 and frames[0].shape == (360, 640, 3)


def test_a_typo_gets_did_you_mean(tmp_path):
    r = edgeseg("convert", "unte", "--out", tmp_path / "b")
    assert r.returncode == 2 and "did you mean 'unet'?" in r.stderr and "Traceback" not in r.stderr
    r = edgeseg("train", "--model", "lraspp_mobilnetv3", "--data", "synthetic", "--out", tmp_path / "m.pt")
    assert r.returncode == 2 and "did you mean 'lraspp_mobilenetv3'" in r.stderr
    # both commands list the same names
    listed = [re.search(r"available: (.*)", r.stderr).group(1).split("; ")[0].strip()
              for r in (edgeseg("convert", "nope", "--out", tmp_path / "c"),
                        edgeseg("train", "--model", "nope", "--data", "synthetic", "--out", tmp_path / "n.pt"))]
    assert listed[0] == listed[1] and listed[0].startswith("default, ")


def test_python_dash_m_edgeseg_help():
    r = edgeseg("--help")
    assert r.returncode == 0 and "usage: edgeseg" in r.stdout


def test_every_option_has_help_text():
    import argparse
    import importlib

    from edgeseg import cli

    parser = cli.build_parser()
    missing = []
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        importlib.import_module(f"edgeseg.commands.{name}").add_arguments(sub)
        missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help and a.help != argparse.SUPPRESS)]
    assert not missing, missing


FACTORY = '''
import torch

def build():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1))
'''


def test_factory_from_the_current_folder(tmp_path):
    pkg = tmp_path / "project" / "my_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(FACTORY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)  # edgeseg itself, not the project
    r = edgeseg("convert", "my_pkg.nets:build", "--out", tmp_path / "b", "--input-size", "64", "64", "--labels", "a,b,c",
                cwd=tmp_path / "project", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = edgeseg("convert", "my_pkg.nets:buidl", "--out", tmp_path / "c", cwd=tmp_path / "project", env=env)
    assert r.returncode == 2 and "did you mean my_pkg.nets:build?" in r.stderr
    r = edgeseg("convert", "my_pkg.nets:build", "--out", tmp_path / "d", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "run from the folder that holds my_pkg/" in r.stderr, r.stderr


def test_messages_name_flags_not_python_keywords(bundle, tmp_path):
    r = edgeseg("convert", "default", "--precision", "int8", "--out", tmp_path / "a")
    assert r.returncode == 2 and "pass --calib " in r.stderr and "calib=" not in r.stderr
    r = edgeseg("convert", "default", "--eval-data", "synthetic:test", "--out", tmp_path / "b")
    assert r.returncode == 2 and "--eval-data measures INT8 accuracy; it needs --precision int8" in r.stderr
    r = edgeseg("calibrate", bundle, "--data", "synthetic:train", "--max-miou-drop", "-1")
    assert r.returncode == 2 and "--max-miou-drop must be >= 0" in r.stderr and "max_miou_drop" not in r.stderr
    r = edgeseg("run", bundle, "--source", "synthetic://?frames=2", "--stage-nice", "30")
    assert r.returncode == 2 and "--stage-nice must be 0..19" in r.stderr and "stage_nice" not in r.stderr


def test_convert_int8_passes_eval_data_on(monkeypatch, tmp_path):
    """--eval-data reaches calibration (its warning tells users to pass it)."""
    import edgeseg.api as api
    from edgeseg.cli import main

    seen = {}
    monkeypatch.setattr(api, "calibrate", lambda bundle, data, **kw: seen.update(data=data, **kw))
    assert main(["convert", "default", "--precision", "int8", "--calib", "synthetic:train",
                 "--eval-data", "synthetic:test", "--out", str(tmp_path / "b"), "-q"]) == 0
    assert seen["data"] == "synthetic:train" and seen["eval_data"] == "synthetic:test"


def test_unresolvable_rtsp_host_says_so(bundle):
    r = edgeseg("run", bundle, "--source", "rtsp://no-such-camera.invalid/stream")
    assert r.returncode == 2
    assert "the host 'no-such-camera.invalid' does not resolve" in r.stderr and "no video within" not in r.stderr


def test_opencv_chatter_hidden_unless_verbose(bundle):
    # (a CLI run in this process sets these for its own children)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENCV_LOG_LEVEL", "OPENCV_FFMPEG_LOGLEVEL", "TORCH_LOGS")}
    r = edgeseg("run", bundle, "--source", "7", env=env)  # a camera index with no camera: OpenCV warns while trying
    assert r.returncode == 2 and "cannot open camera 7" in r.stderr
    assert "[ WARN" not in r.stderr and "[ERROR" not in r.stderr, r.stderr
    r = edgeseg("run", bundle, "--source", "7", "--verbose", env=env)
    assert "[ WARN" in r.stderr


def test_folder_outputs_keep_names_and_one_image_gives_one(bundle, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in (7, 42):
        cv2.imwrite(str(frames / f"frame_{i:04d}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    r = edgeseg("run", bundle, "--source", frames, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["frame_0007.png", "frame_0042.png"]
    r = edgeseg("run", bundle, "--source", frames / "frame_0042.png", "--out", tmp_path / "single")
    assert r.returncode == 0 and [p.name for p in (tmp_path / "single").iterdir()] == ["frame_0042.png"]
    r = edgeseg("run", bundle, "--source", frames / "frame_0042.png", "--out", tmp_path / "one.png")
    assert r.returncode == 0 and cv2.imread(str(tmp_path / "one.png")).shape == (48, 64, 3)
    r = edgeseg("run", bundle, "--source", frames / "frame_0042.png", "--out", tmp_path / "one.mp4")
    assert r.returncode == 2 and "the source is one image" in r.stderr and not (tmp_path / "one.mp4").exists()
    r = edgeseg("run", bundle, "--source", frames, "--out", tmp_path / "last.png")
    assert r.returncode == 2 and "would keep only the last" in r.stderr


def test_loop_replays_a_synthetic_clip(bundle):
    r = edgeseg("run", bundle, "--source", "synthetic://?frames=5&width=64&height=48", "--loop", "--frames", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("12 frames in")
