import io

import numpy as np
import pytest
import torch
from PIL import Image

from bccd_batch.decode import DecodeError, decode_bytes, decode_on_device, device_decodable, device_decoder_problem
from conftest import FIGURES, bccd_image


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


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_only_complete_plain_jpegs_are_left_for_nvjpeg():
    """nvJPEG ignores EXIF turns, refuses CMYK and decodes a truncated file without complaint (all
    seen on an H100), so anything but a complete baseline colour JPEG goes to decode_bytes."""
    jpg = bccd_image("BloodImage_00000").read_bytes()
    rgb = Image.open(io.BytesIO(jpg))
    assert device_decodable(jpg)
    assert device_decodable(encode(rgb, "JPEG", exif=_exif(1)))
    huge = bytearray(jpg)
    i = huge.index(b"\xff\xc0")        # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    huge[i + 5:i + 9] = (30000).to_bytes(2, "big") * 2
    for data in (jpg[:20000], jpg + b"garbage", encode(rgb, "JPEG", progressive=True), encode(rgb, "JPEG", exif=_exif(6)),
                 encode(rgb.convert("L"), "JPEG"), encode(rgb.convert("CMYK"), "JPEG"), encode(rgb, "PNG"),
                 bytes(huge), b"", b"\xff\xd9"):
        assert not device_decodable(data)


def test_batch_decode_gives_the_fields_decode_bytes_gives():
    # torchvision's decoder on the CPU: the same call and layout as nvJPEG's (GPU tests compare those).
    datas = [bccd_image(n).read_bytes() for n in ("BloodImage_00000", "BloodImage_00001")]
    for data, field in zip(datas, decode_on_device(datas, "cpu")):
        a = decode_bytes(data)
        assert field.shape == (3, 480, 640) and field.dtype == torch.uint8
        assert np.abs(field.permute(1, 2, 0).numpy().astype(int) - a).mean() < 1.0
    assert device_decoder_problem("cpu") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where there is no GPU")
def test_no_gpu_means_no_device_decoder_and_says_why():
    assert device_decoder_problem("cuda")


@pytest.mark.gpu
def test_nvjpeg_fields_are_close_to_pillows(bccd):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert device_decoder_problem("cuda") is None
    datas = [p.read_bytes() for p in sorted((bccd / "JPEGImages").glob("*.jpg"))]
    diffs = []
    for k in range(0, len(datas), 32):
        for data, field in zip(datas[k:k + 32], decode_on_device(datas[k:k + 32], "cuda")):
            diffs.append(np.abs(field.permute(1, 2, 0).cpu().numpy().astype(int) - decode_bytes(data)).mean())
    FIGURES.append(f"decode: nvJPEG vs Pillow over {len(diffs)} BCCD fields, mean |difference| {np.mean(diffs):.3f} (worst field {max(diffs):.3f}) grey levels")
    assert max(diffs) < 1.0
