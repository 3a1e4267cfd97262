"""edgeseg.progress and the CLI's console setup: bars where someone watches, nothing elsewhere,
our warnings on one line, other libraries' output only with --verbose."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings

import pytest

from edgeseg import cli, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def restore():
    yield
    progress.configure()


def test_bars_show_on_a_terminal():
    term = Terminal()
    progress.configure(stream=term)
    with progress.bar("ranges", total=4, unit="frames") as b:
        for _ in range(4):
            b.update()
    with progress.bar("run", unit="frames", rate_label="FPS") as b:
        b.update(3)
        b.note("dropped 0")
    with progress.phase("export"):
        pass
    out = term.getvalue()
    assert "ranges: 100%" in out and "4/4 frames" in out
    assert "run: 3 frames" in out and "FPS" in out
    assert "export  done in" in out


@pytest.mark.parametrize("how", ["pipe", "off"])
def test_no_bars_when_not_watched(how):
    stream = io.StringIO() if how == "pipe" else Terminal()
    progress.configure(enabled=None if how == "pipe" else False, stream=stream)
    assert not progress.enabled()
    with progress.bar("ranges", total=3) as b:
        b.update(3)
    with progress.phase("export"):
        pass
    assert list(progress.iterate([1, 2], "sizes")) == [1, 2]
    assert stream.getvalue() == ""


def test_quiet_third_party_hides_others_but_not_ours(capsys):
    term = Terminal()
    progress.configure(stream=term)
    with progress.quiet_third_party() as captured:
        print("a library's notice")
        print("a library's bar", file=sys.stderr)
        with progress.bar("ours", total=1) as b:
            b.update()
    assert "a library's notice" in captured.getvalue() and "a library's bar" in captured.getvalue()
    assert "ours: 100%" in term.getvalue()
    assert capsys.readouterr() == ("", "")


def test_quiet_third_party_lets_through_with_verbose(capsys):
    progress.configure(third_party=True)
    with progress.quiet_third_party():
        print("a library's notice")
    assert "a library's notice" in capsys.readouterr().out


def test_warnings_and_logs_as_one_line(capsys):
    old_show, root = warnings.showwarning, logging.getLogger()
    old_handlers, old_level = list(root.handlers), root.level
    try:
        cli.setup_console(verbose=False)
        warnings.warn_explicit("INT8 accuracy is not measured; pass --eval-data", UserWarning,
                               cli.__file__, 10)
        warnings.warn_explicit("some library deprecation", DeprecationWarning, "/site-packages/lib/x.py", 3)
        logging.getLogger("edgeseg.runtime").warning("stream dropped, reconnecting")
        logging.getLogger("somelib").warning("chatter")
        err = capsys.readouterr().err
        assert err.splitlines() == ["warning: INT8 accuracy is not measured; pass --eval-data",
                                    "warning: stream dropped, reconnecting"]
        cli.setup_console(verbose=True)
        warnings.warn_explicit("some library deprecation", DeprecationWarning, "/site-packages/lib/x.py", 3)
        logging.getLogger("somelib").warning("chatter")
        err = capsys.readouterr().err
        assert "some library deprecation" in err and "warning (somelib): chatter" in err
    finally:
        warnings.showwarning = old_show
        root.handlers[:] = old_handlers
        root.setLevel(old_level)
        logging.getLogger("torch").setLevel(logging.NOTSET)


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "edgeseg", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: edgeseg" in r.stdout and "convert" in r.stdout


def test_pipe_closed_early_ends_quietly(tmp_path):
    """`edgeseg inspect BUNDLE --json | head`: the reader leaves first; no BrokenPipeError."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    p = subprocess.Popen([sys.executable, "-m", "edgeseg", "inspect", str(path), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before it writes anything
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_tensorrt_build_phases_become_bars():
    """converters.tensorrt's IProgressMonitor, driven as TensorRT drives it (no TensorRT needed)."""
    import types

    from converters.tensorrt.builder import _make_progress

    class IProgressMonitor:
        def __init__(self):
            pass

    term = Terminal()
    progress.configure(stream=term)
    monitor = _make_progress(types.SimpleNamespace(IProgressMonitor=IProgressMonitor))
    with progress.phase("TensorRT fp16 engine build"):
        monitor.phase_start("Building engine", None, 3)
        monitor.phase_start("Tactic selection", "Building engine", 2)
        assert monitor.step_complete("Tactic selection", 0) and monitor.step_complete("Tactic selection", 1)
        monitor.phase_finish("Tactic selection")
        for step in range(3):
            monitor.step_complete("Building engine", step)
        monitor.phase_finish("Building engine")
    out = term.getvalue()
    assert "TensorRT: Building engine:   0%|" in out and "TensorRT: Tactic selection:   0%|" in out and "/2 steps" in out
    assert "TensorRT fp16 engine build  done in" in out
    assert progress._State.open_bars == 0
    assert _make_progress(types.SimpleNamespace()) is None  # TensorRT < 10: no monitor
