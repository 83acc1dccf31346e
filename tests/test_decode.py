import io

import numpy as np
import pytest
from PIL import Image

from bccd_batch.decode import DecodeError, decode_bytes
from conftest import bccd_image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_real_bccd_jpeg():
    a = decode_bytes(bccd_image("BloodImage_00000").read_bytes())
    assert a.shape == (480, 640, 3) and a.dtype == np.uint8 and a.flags.writeable


def test_sixteen_bit_png_scales_to_eight_bits():
    g = np.full((8, 10), 65535, np.uint16)
    g[:, :5] = 257 * 100
    a = decode_bytes(encode(Image.fromarray(g), "PNG"))
    assert a.shape == (8, 10, 3) and a[0, 0].tolist() == [100] * 3 and a[0, 9].tolist() == [255] * 3


def test_cmyk_jpeg_becomes_rgb():
    a = decode_bytes(encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG"))
    assert a.shape == (12, 16, 3)
    r, g, b = a[6, 8].tolist()
    assert r > 200 and g < 60 and b < 60   # pure magenta+yellow ink is red


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    a = decode_bytes(encode(im, "JPEG", exif=exif))
    assert a.shape == (40, 20, 3)


def test_rgba_and_palette_and_gray():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_bytes(encode(rgba, "PNG"))[0, 0].tolist() == [255, 255, 255]   # transparent -> white
    pal = Image.new("P", (4, 4), 3)
    pal.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert decode_bytes(encode(pal, "PNG"))[0, 0].tolist() == [10, 20, 30]
    assert decode_bytes(encode(Image.new("L", (4, 4), 77), "PNG"))[1, 1].tolist() == [77, 77, 77]


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"this is a text file, not a JPEG\n", "not a recognised image"),
    (bccd_image("BloodImage_00000").read_bytes()[:5000], "truncated"),
])
def test_bad_bytes_raise_with_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_bytes(data)


def test_decompression_bomb_is_refused():
    # A 1-bit PNG that declares 10000x10000 pixels compresses to a few kB.
    data = encode(Image.new("1", (10000, 10000)), "PNG")
    assert len(data) < 100_000
    with pytest.raises(DecodeError, match="too large|bomb"):
        decode_bytes(data)
