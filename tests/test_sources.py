"""Frame sources: URIs, files, folders, synthetic clips, streams with reconnection, clear errors."""
from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest

from edgeseg.errors import SourceError
from runtime.sources import (
    Frame, ImageSource, StreamSource, SyntheticSource, VideoFileSource, has_gstreamer, open_source, write_synthetic_clip,
)


def _image(i, h=48, w=64):
    img = np.full((h, w, 3), (i * 40) % 256, np.uint8)
    cv2.putText(img, str(i), (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 255), 2)
    return img


# -- synthetic ----------------------------------------------------------------------------------
def test_synthetic_uri_options():
    with open_source("synthetic://?frames=5&width=96&height=64&seed=3&noise=0") as src:
        assert isinstance(src, SyntheticSource) and not src.live and src.fps == 30.0
        frames = list(src)
    assert len(frames) == 5
    assert all(isinstance(f, Frame) and f.image.shape == (64, 96, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.index for f in frames] == list(range(5))
    assert frames[1].timestamp == pytest.approx(1 / 30)
    assert src.mask is not None and src.mask.shape == (64, 96)


def test_synthetic_is_deterministic_and_static_scene_only_changes_by_noise():
    a = [f.image for f in open_source("synthetic://?frames=3&width=64&height=48&seed=5")]
    b = [f.image for f in open_source("synthetic://", frames=3, width=64, height=48, seed=5)]  # options as kwargs
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    s = [f.image.astype(int) for f in open_source("synthetic://?frames=2&width=64&height=48&static=1&noise=0")]
    assert np.array_equal(s[0], s[1])


def test_synthetic_endless_and_live_pacing():
    src = open_source("synthetic://?frames=0&width=32&height=32&live=1&fps=50")
    assert src.live
    t0 = time.perf_counter()
    frames = [f for _, f in zip(range(6), src)]
    elapsed = time.perf_counter() - t0
    src.close()
    assert len(frames) == 6 and all(f.live for f in frames)
    assert elapsed >= 5 / 50 * 0.8  # paced like a camera, not as fast as possible
    assert src.read() is None  # closed


def test_synthetic_unknown_option():
    with pytest.raises(SourceError, match="unknown options"):
        open_source("synthetic://?frame=3")


# -- images -------------------------------------------------------------------------------------
def test_image_folder_in_natural_order_and_corrupt_files_are_skipped_and_counted(tmp_path):
    for i in (1, 2, 10):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), _image(i))
    (tmp_path / "img3.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    src = open_source(str(tmp_path))
    assert isinstance(src, ImageSource) and not src.live
    frames = list(src)
    assert len(frames) == 3 and src.corrupt == 1
    assert [f.image[0, 0, 0] for f in frames] == [40, 80, 144]  # img1, img2, img10 (not img10 before img2)
    assert [f.index for f in frames] == [0, 1, 2]


def test_image_glob_and_single_image(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"a{i}.png"), _image(i))
    cv2.imwrite(str(tmp_path / "b.png"), _image(9))
    assert len(list(open_source(str(tmp_path / "a*.png")))) == 3
    single = list(open_source(str(tmp_path / "b.png")))
    assert len(single) == 1 and single[0].image.shape == (48, 64, 3)
    looped = open_source(str(tmp_path / "b.png"), loop=True)
    assert len([f for _, f in zip(range(4), looped)]) == 4


def test_empty_folder_and_unmatched_glob(tmp_path):
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path))
    with pytest.raises(SourceError, match="matches no files"):
        open_source(str(tmp_path / "*.png"))


def test_missing_path_names_uri_and_fix(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(SourceError) as e:
        open_source(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "no such file" in msg and "synthetic://" in msg


# -- video files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_synthetic_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=12, size=(64, 96), fps=24)


def test_video_file_every_frame_in_order(clip):
    with open_source(str(clip)) as src:
        assert isinstance(src, VideoFileSource) and not src.live
        assert src.fps == pytest.approx(24) and src.size == (64, 96)
        frames = list(src)
    assert len(frames) == 12 and src.corrupt == 0
    assert [f.index for f in frames] == list(range(12))
    assert frames[2].timestamp == pytest.approx(2 / 24)


def test_file_uri_and_loop(clip):
    assert len(list(open_source(f"file://{clip}"))) == 12
    looped = open_source(str(clip), loop=True)
    assert len([f for _, f in zip(range(20), looped)]) == 20
    looped.close()


def test_undecodable_video_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(SourceError, match="cannot open video .*FFmpeg cannot decode"):
        open_source(str(bad))


# -- cameras and schemes ------------------------------------------------------------------------
def test_missing_camera_device():
    for uri in ("/dev/video97", "v4l2:///dev/video97"):
        with pytest.raises(SourceError) as e:
            open_source(uri)
        assert "/dev/video97" in str(e.value) and "does not exist" in str(e.value)


@pytest.mark.skipif(bool(__import__("glob").glob("/dev/video*")), reason="a camera is attached")
def test_camera_index_without_a_camera():
    for uri in (0, "0"):
        with pytest.raises(SourceError, match="cannot open camera"):
            open_source(uri)


@pytest.mark.skipif(has_gstreamer(), reason="this OpenCV has GStreamer; the error path is for builds without it")
def test_csi_without_gstreamer_says_so():
    with pytest.raises(SourceError, match="GStreamer"):
        open_source("csi://0")


def test_unknown_scheme():
    with pytest.raises(SourceError, match="unknown source scheme"):
        open_source("ftp://example.com/clip.mp4")
    with pytest.raises(SourceError):
        open_source("")


def test_unreachable_stream_is_a_clear_error_without_credentials():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(SourceError) as e:
        open_source(f"rtsp://user:secret@127.0.0.1:{port}/live", timeout=2)
    assert "secret" not in str(e.value) and "cannot open stream" in str(e.value)


# -- a stream that drops and comes back (a loopback MJPEG server) -------------------------------
class _Publisher:
    def __init__(self, port=0):
        from runtime.server import FrameServer

        self.server = FrameServer("127.0.0.1", port).start()
        self.port = self.server.port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            self.server.publish(_image(i, 60, 80))
            i += 1
            time.sleep(0.02)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def test_http_stream_reconnects_with_backoff():
    pub = _Publisher()
    url = f"http://127.0.0.1:{pub.port}/stream.mjpg"
    src = open_source(url, timeout=3, reconnect=20, backoff=0.1, max_backoff=0.5)
    restarted = []
    try:
        assert isinstance(src, StreamSource) and src.live
        first = [f for _, f in zip(range(3), src)]
        assert len(first) == 3 and first[0].image.shape == (60, 80, 3)
        port = pub.port
        pub.close()  # the stream drops

        def restart():
            time.sleep(0.6)
            restarted.append(_Publisher(port))

        t = threading.Thread(target=restart)
        t.start()
        more = [f for _, f in zip(range(3), src)]
        t.join()
        assert len(more) == 3 and src.reconnects >= 1
        assert more[0].index == 3
    finally:
        src.close()
        for p in restarted:
            p.close()


def test_stream_that_never_comes_back_raises():
    pub = _Publisher()
    src = open_source(f"http://127.0.0.1:{pub.port}/stream.mjpg", timeout=2, reconnect=2, backoff=0.05)
    try:
        assert src.read() is not None
        pub.close()
        with pytest.raises(SourceError, match="did not come back after 2 attempts"):
            for _ in range(1000):
                src.read()
    finally:
        src.close()
