"""ROS image messages -> numpy, checked against hand-built byte layouts."""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from d2s_nerf_ros.image_conversion import (
    ImageConversionError,
    UnsupportedEncoding,
    compressed_msg_to_numpy,
    converter_backend,
    image_msg_to_numpy,
    numpy_to_image_fields,
    to_uint8,
)


def make_image(data: bytes, height: int, width: int, step: int, encoding: str, bigendian: int = 0) -> Image:
    return Image(height=height, width=width, step=step, encoding=encoding, is_bigendian=bigendian, data=data)


def test_mono8_with_row_padding_drops_the_padding():
    # 2 rows of 3 pixels, each row padded by 2 bytes of 0xEE that must not appear in the output.
    data = bytes([1, 2, 3, 0xEE, 0xEE, 4, 5, 6, 0xEE, 0xEE])
    out = image_msg_to_numpy(make_image(data, 2, 3, 5, "mono8"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[1, 2, 3], [4, 5, 6]])


def test_rgb8_and_bgr8_give_rgb():
    # One row of two pixels; in memory: (10, 20, 30), (40, 50, 60).
    data = bytes([10, 20, 30, 40, 50, 60])
    rgb = image_msg_to_numpy(make_image(data, 1, 2, 6, "rgb8"))
    np.testing.assert_array_equal(rgb, [[[10, 20, 30], [40, 50, 60]]])
    # Same bytes read as BGR: first pixel is blue=10, green=20, red=30 -> RGB (30, 20, 10).
    bgr = image_msg_to_numpy(make_image(data, 1, 2, 6, "bgr8"))
    np.testing.assert_array_equal(bgr, [[[30, 20, 10], [60, 50, 40]]])
    assert bgr.flags["C_CONTIGUOUS"]


def test_bgra8_drops_alpha_and_reorders():
    data = bytes([1, 2, 3, 255])
    np.testing.assert_array_equal(image_msg_to_numpy(make_image(data, 1, 1, 4, "bgra8")), [[[3, 2, 1]]])


@pytest.mark.parametrize("bigendian", [0, 1])
def test_mono16_byte_order_and_padding(bigendian: int):
    values = [0x1234, 0xBEEF, 0x0001]
    pack = (lambda v: [v >> 8, v & 0xFF]) if bigendian else (lambda v: [v & 0xFF, v >> 8])
    row = sum((pack(v) for v in values), [])
    data = bytes(row + [0x77, 0x77] + row + [0x77, 0x77])  # 2 rows, step 8 = 6 + 2 padding
    out = image_msg_to_numpy(make_image(data, 2, 3, 8, "mono16", bigendian))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [values, values])


def test_output_does_not_alias_the_message_buffer():
    msg = make_image(bytes([7] * 6), 2, 3, 3, "mono8")
    out = image_msg_to_numpy(msg)
    msg.data[0] = 99
    assert out[0, 0] == 7


def test_size_mismatch_is_a_clear_error():
    with pytest.raises(ImageConversionError, match=r"expected height\*step = 480\*1920"):
        image_msg_to_numpy(make_image(bytes(1000), 480, 640, 1920, "rgb8"))


def test_step_smaller_than_a_row_is_an_error():
    with pytest.raises(ImageConversionError, match="step 5 is smaller than one row"):
        image_msg_to_numpy(make_image(bytes(20), 2, 3, 5, "mono16"))


def test_empty_image_is_an_error():
    with pytest.raises(ImageConversionError, match="no pixels"):
        image_msg_to_numpy(make_image(b"", 0, 0, 0, "mono8"))


@pytest.mark.parametrize("encoding", ["32FC1", "yuv422", "bayer_rggb8", ""])
def test_unsupported_encoding_names_the_supported_ones(encoding: str):
    with pytest.raises(UnsupportedEncoding, match="mono8, mono16, rgb8, bgr8"):
        image_msg_to_numpy(make_image(bytes(16), 2, 2, 8, encoding))


def test_round_trip_through_message_fields():
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(image_msg_to_numpy(Image(**numpy_to_image_fields(rgb, "rgb8"))), rgb)
    # A bgr8 message holds the BGR array; the converter hands back RGB.
    msg = Image(**numpy_to_image_fields(np.ascontiguousarray(rgb[:, :, ::-1]), "bgr8"))
    np.testing.assert_array_equal(image_msg_to_numpy(msg), rgb)
    depth = rng.integers(0, 65536, (4, 6), dtype=np.uint16)
    np.testing.assert_array_equal(image_msg_to_numpy(Image(**numpy_to_image_fields(depth, "mono16"))), depth)
    with pytest.raises(ImageConversionError, match="must be a uint8 array with 3 channel"):
        numpy_to_image_fields(depth, "rgb8")


def test_png_compressed_decodes_exactly_to_rgb():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    out = compressed_msg_to_numpy(CompressedImage(format="rgb8; png compressed bgr8", data=png.tobytes()))
    np.testing.assert_array_equal(out, rgb)


def test_grey_jpeg_decodes_to_grey():
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    ok, jpg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    out = compressed_msg_to_numpy(CompressedImage(format="jpeg", data=jpg.tobytes()))
    assert out.shape == (48, 64) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - grey).max() <= 6  # JPEG at q95 on a smooth ramp


@pytest.mark.parametrize("payload", [b"this is not an image at all", bytes(range(256)) * 4])
def test_compressed_garbage_is_a_clear_error(payload: bytes):
    with pytest.raises(ImageConversionError, match="could not be decoded as an image"):
        compressed_msg_to_numpy(CompressedImage(format="jpeg", data=payload))


def test_compressed_empty_and_compressed_depth_are_errors():
    with pytest.raises(ImageConversionError, match="no data"):
        compressed_msg_to_numpy(CompressedImage(format="jpeg", data=b""))
    with pytest.raises(UnsupportedEncoding, match="compressedDepth"):
        compressed_msg_to_numpy(CompressedImage(format="16UC1; compressedDepth", data=b"\x00" * 40))


def test_to_uint8_stretches_16_bit_by_its_maximum():
    img = np.array([[0, 2048, 4095]], dtype=np.uint16)  # a 12-bit sensor
    np.testing.assert_array_equal(to_uint8(img), [[0, 128, 255]])  # 2048*255/4095 = 127.56 -> 128
    np.testing.assert_array_equal(to_uint8(np.zeros((2, 2), np.uint16)), np.zeros((2, 2), np.uint8))
    u8 = np.ones((2, 2), np.uint8)
    assert to_uint8(u8) is u8
    with pytest.raises(ImageConversionError):
        to_uint8(np.zeros((2, 2), np.float32))


def test_backend_choice_matches_what_is_installed():
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    msg = Image(**numpy_to_image_fields(rgb, "rgb8"))
    if importlib.util.find_spec("cv_bridge") is None:
        assert converter_backend() == "numpy"
        with pytest.raises(ImageConversionError, match="cv_bridge was requested but is not usable"):
            image_msg_to_numpy(msg, backend="cv_bridge")
    elif converter_backend() == "cv_bridge":
        np.testing.assert_array_equal(image_msg_to_numpy(msg, backend="cv_bridge"), rgb)
    np.testing.assert_array_equal(image_msg_to_numpy(msg, backend="numpy"), rgb)
    with pytest.raises(ValueError, match="backend must be"):
        image_msg_to_numpy(msg, backend="pil")
