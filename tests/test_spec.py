import cv2
import numpy as np
import pytest

from edgeseg.spec import FrameError, Preprocess, check_frame, unletterbox


def test_apply_matches_hand_computation(rng):
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    pre = Preprocess(size=(24, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x = pre.apply(frame)
    assert x.shape == (1, 3, 24, 32) and x.dtype == np.float32
    # exact 2x downscale with half-pixel centres = mean of each 2x2 block
    rgb = frame[..., ::-1].astype(np.float64)
    block = rgb.reshape(24, 2, 32, 2, 3).mean((1, 3))
    want = (block / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(x[0].transpose(1, 2, 0), want, atol=1e-4)


def test_bgr_nhwc_uint8_and_fp16_variants(rng):
    frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = Preprocess(size=(32, 32), color="bgr", layout="nhwc", dtype="uint8").apply(frame)
    assert x.dtype == np.uint8 and x.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(x[0], frame)  # identity resize keeps pixels
    h = Preprocess(size=(16, 16), dtype="float16").apply(frame)
    assert h.dtype == np.float16


def test_letterbox_places_frame_and_unletterbox_inverts():
    pre = Preprocess(size=(64, 64), resize="letterbox", pad_value=0)
    box = pre.letterbox((32, 64))
    assert (box.top, box.left, box.height, box.width) == (16, 0, 32, 64)
    frame = np.full((32, 64, 3), 200, np.uint8)
    img = pre.resize_image(frame)
    assert img[:16].max() == 0 and img[48:].max() == 0 and img[16:48].min() == 200
    cls = np.zeros((64, 64), np.uint8)
    cls[16:48] = 3
    back = unletterbox(cls, pre, (32, 64))
    assert back.shape == (32, 64) and (back == 3).all()


def test_roundtrip_dict_and_validation():
    pre = Preprocess(size=(120, 160), resize="letterbox", color="bgr")
    assert Preprocess.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocess(resize="crop")
    with pytest.raises(ValueError, match="unknown preprocess fields"):
        Preprocess.from_dict({"size": [8, 8], "colour": "rgb"})


@pytest.mark.parametrize(
    "bad, message",
    [
        ([[1, 2, 3]], "numpy array"),
        (np.zeros((8, 8), np.uint8), "single-channel"),
        (np.zeros((8, 8, 4), np.uint8), "BGRA2BGR"),
        (np.zeros((8, 8, 3), np.float32), "uint8"),
    ],
)
def test_bad_frames_are_named(bad, message):
    with pytest.raises(FrameError, match=message):
        check_frame(bad)


def test_reference_is_float_bilinear_not_fixed_point(rng):
    """The reference resizes in float32; a CUDA kernel can match it to 1e-3 (OpenCV's uint8 path rounds)."""
    frame = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pre = Preprocess(size=(19, 29), mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255), color="bgr")
    got = pre.apply(frame)[0].transpose(1, 2, 0)
    want = cv2.resize(frame.astype(np.float32), (29, 19), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
@pytest.mark.parametrize("color", ["rgb", "bgr"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_planar_apply_is_resize_then_normalize_bit_for_bit(rng, resize, color, dtype):
    """The NCHW float path writes plane by plane; it must stay the same float32 operations as
    resize_image -> transpose -> normalize, to the last bit (calibration and training use those)."""
    pre = Preprocess(size=(40, 56), resize=resize, color=color, dtype=dtype, pad_value=114, mean=(0.1, 0.5, 0.9), std=(0.3, 0.2, 0.1))
    for hw in ((72, 128), (37, 53), (90, 40)):
        frame = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        want = pre.normalize(pre.resize_image(frame).transpose(2, 0, 1), channel_axis=0)[None].astype(dtype)
        got = pre.apply(frame)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
