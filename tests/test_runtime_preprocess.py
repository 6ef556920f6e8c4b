"""Pre-processing from the manifest: decode, colour, resize, scale, mean/std, layout, dtype; tensor checks."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

from edge_agent.bundle.manifest import Preprocessing, TensorDecl
from edge_agent.errors import InputError
from edge_agent.runtime.preprocess import Preprocessor, decode_image, image_size, read_npy

cv2 = pytest.importorskip("cv2")


def _decl(shape, dtype="float32"):
    return TensorDecl(name="image", dtype=dtype, shape=[-1, *shape])


def _encode(img, ext=".png") -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def test_rgb_nchw_with_mean_std_matches_a_hand_computation():
    bgr = np.zeros((4, 6, 3), np.uint8)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 10, 20, 30  # B, G, R
    pre = Preprocessor(
        Preprocessing(color="rgb", scale="0.1", mean=["1", "2", "3"], std=["2", "2", "2"], layout="nchw"),
        _decl([3, 4, 6]),
    )
    x, hw = pre.from_image_bytes(_encode(bgr))
    assert hw == (4, 6) and x.shape == (3, 4, 6) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0], [(3 - 1) / 2, (2 - 2) / 2, (1 - 3) / 2])  # R, G, B order


def test_bgr_nhwc_uint8_resize():
    img = np.full((40, 20, 3), 200, np.uint8)
    pre = Preprocessor(Preprocessing(color="bgr", layout="nhwc", dtype="uint8", scale="1"), _decl([8, 16, 3], "uint8"))
    x = pre.from_decoded(img)
    assert x.shape == (8, 16, 3) and x.dtype == np.uint8 and int(x[0, 0, 0]) == 200


def test_gray_model_from_colour_jpeg_and_explicit_resize():
    img = np.full((64, 64, 3), 128, np.uint8)
    pre = Preprocessor(Preprocessing(color="gray", resize=[8, 8], scale="0.0625"), _decl([1, 8, 8]))
    x, hw = pre.from_image_bytes(_encode(img, ".jpg"))
    assert x.shape == (1, 8, 8) and hw == (64, 64)
    assert float(x.mean()) == pytest.approx(8.0, abs=0.2)


def test_png_with_alpha_and_16_bit_decode():
    rgba = np.zeros((5, 5, 4), np.uint8)
    rgba[..., 2] = 255
    assert decode_image(_encode(rgba)).shape == (5, 5, 3)
    deep = np.full((5, 5), 65535, np.uint16)
    img = decode_image(_encode(deep))
    assert img.dtype == np.uint8 and int(img.max()) == 255


def test_undecodable_and_empty_bodies_are_input_errors():
    with pytest.raises(InputError, match="empty"):
        decode_image(b"")
    with pytest.raises(InputError, match="not a decodable"):
        decode_image(b"GIF89a....")
    with pytest.raises(InputError, match="not a decodable"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing valid


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def test_decompression_bomb_is_refused_from_the_header():
    assert image_size(_png_header(100000, 90000)) == (90000, 100000)
    with pytest.raises(InputError, match="larger than"):
        decode_image(_png_header(100000, 90000) + b"\x00" * 100)


def test_image_into_a_non_image_model_is_refused():
    pre = Preprocessor(Preprocessing(), _decl([10]))
    with pytest.raises(InputError, match="not an image"):
        pre.from_decoded(np.zeros((4, 4, 3), np.uint8))


def test_channel_mismatch_is_refused():
    pre = Preprocessor(Preprocessing(color="gray"), _decl([3, 8, 8]))
    with pytest.raises(InputError, match="1 channels"):
        pre.from_decoded(np.zeros((8, 8, 3), np.uint8))


def test_tensor_shape_dtype_and_batch_axis():
    pre = Preprocessor(Preprocessing(), _decl([1, 8, 8]))
    assert pre.from_tensor(np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 8, 8)
    assert pre.from_tensor(np.zeros((1, 8, 8), np.float64)).dtype == np.float32
    assert pre.from_tensor(np.zeros((1, 8, 8), np.uint8)).dtype == np.float32
    with pytest.raises(InputError, match="shape \\(8, 8\\)"):
        pre.from_tensor(np.zeros((8, 8), np.float32))
    with pytest.raises(InputError, match="shape \\(2, 1, 8, 8\\)"):
        pre.from_tensor(np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        pre.from_tensor(np.full((1, 8, 8), np.nan))
    with pytest.raises(InputError, match="dtype"):
        pre.from_tensor(np.zeros((1, 8, 8), dtype="U1"))


def test_read_npy_refuses_pickles_and_junk():
    buf = io.BytesIO()
    np.save(buf, np.arange(4))
    assert read_npy(buf.getvalue(), max_bytes=1 << 20).tolist() == [0, 1, 2, 3]
    with pytest.raises(InputError, match=r"not a \.npy"):
        read_npy(b"junk", max_bytes=1 << 20)
    with pytest.raises(InputError, match="over the"):
        read_npy(buf.getvalue(), max_bytes=10)
