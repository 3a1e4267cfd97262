"""The overlay's legend and the video writer (H.264 through PyAV, OpenCV's mp4v without it)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from runtime.legend import Legend, present_classes
from runtime.postprocess import SegmentationResult

LABELS = ["background", "ball", "box", "triangle"]
PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]


def result_with(shares: dict[int, int], size=(100, 200)) -> SegmentationResult:
    cm = np.zeros(size, np.uint8)
    flat = cm.reshape(-1)
    at = 0
    for c, n in shares.items():
        flat[at:at + n] = c
        at += n
    return SegmentationResult(class_map=cm, labels=LABELS, palette=PALETTE, hidden=frozenset({2}))


def test_present_classes_largest_first_without_background_or_hidden():
    r = result_with({1: 2000, 2: 5000, 3: 6000})
    assert [(label, round(share, 2)) for _, label, _, share in present_classes(r)] == [("triangle", 0.3), ("ball", 0.1)]


def test_legend_draws_in_its_corner_only():
    r = result_with({1: 2000, 3: 6000}, size=(360, 640))
    image = np.full((360, 640, 3), 200, np.uint8)
    out = Legend().annotate(image.copy(), r)
    changed = np.argwhere(np.any(out != 200, axis=2))
    (y0, x0), (y1, x1) = changed.min(0), changed.max(0)
    assert y0 < 20 and x0 < 20 and y1 < 120 and x1 < 260  # a panel at the top left
    assert (out[changed[:, 0], changed[:, 1]] == [0, 0, 255]).all(axis=1).any()  # ball's swatch (RGB red -> BGR)
    assert (out[changed[:, 0], changed[:, 1]] == [255, 0, 0]).all(axis=1).any()  # triangle's (RGB blue)
    right = Legend(corner="bottom-right").annotate(image.copy(), r)
    assert np.argwhere(np.any(right != 200, axis=2)).min(0)[1] > 320
    empty = Legend().annotate(image.copy(), result_with({}))  # only background: nothing drawn
    assert (empty == 200).all()
    with pytest.raises(ValueError, match="corner"):
        Legend(corner="middle")


def test_video_is_h264_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    from runtime.sinks import VideoSink, h264_encoder

    if h264_encoder()[0] is None:
        pytest.skip(h264_encoder()[1])
    sink = VideoSink(tmp_path / "v.mp4", fps=25)
    for i in range(5):
        sink.write(np.full((47, 63, 3), i * 40, np.uint8))  # odd sizes: yuv420p takes even ones
    sink.close()
    assert sink.codec.startswith("H.264")
    with av.open(str(tmp_path / "v.mp4")) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and (s.width, s.height) == (62, 46)
        assert len(list(c.decode(s))) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary left


def test_video_without_pyav_falls_back_and_says_which_codec(tmp_path, monkeypatch, caplog):
    import cv2

    import runtime.sinks as sinks

    monkeypatch.setattr(sinks, "h264_encoder", lambda: (None, "PyAV is not installed (pip install av)"))
    with caplog.at_level(logging.WARNING, logger="edgeseg.runtime"):
        sink = sinks.VideoSink(tmp_path / "v.mp4")
    assert sink.codec == "mp4v, OpenCV"
    assert "MPEG-4 Part 2 (mp4v), which browsers and phones do not play" in caplog.text
    for i in range(3):
        sink.write(np.full((48, 64, 3), 100, np.uint8))
    sink.close()
    cap = cv2.VideoCapture(str(tmp_path / "v.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()


def test_browser_view_stats_carry_the_classes_in_view():
    from runtime.sinks import ServerSink

    class Server:
        url = "http://127.0.0.1:0/"
        published = None

        def publish(self, image):
            pass

        def publish_stats(self, summary):
            self.published = summary

    sink = ServerSink(server=Server())
    sink.write(np.zeros((100, 200, 3), np.uint8), result_with({1: 2000, 3: 6000}))
    sink.publish_stats({"frames_out": 1})
    assert sink.server.published == {"frames_out": 1, "classes": [
        {"label": "triangle", "color": [0, 0, 255], "share": 0.3}, {"label": "ball", "color": [255, 0, 0], "share": 0.1}]}
