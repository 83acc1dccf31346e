"""Decode image bytes into 8-bit RGB, whatever the file holds, or say clearly why not.

The bytes are read once by the caller (who also hashes them), so decoding never touches the disk.
On a GPU, plain JPEG fields can instead be decoded in batches by nvJPEG (`device_decodable`,
`decode_on_device`); everything else, and anything nvJPEG refuses, goes through `decode_bytes`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 640x480 field is 0.3 MP; whole-slide tiles stay well under this. Larger files are treated as
# decompression bombs rather than allowed to exhaust memory in a nightly run.
MAX_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class DecodeError(Exception):
    """The file cannot be turned into an image; the message is the reason recorded for it."""


def decode_bytes(data: bytes) -> np.ndarray:
    """Return an HxWx3 uint8 array with EXIF orientation applied."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DecodeError(f"image too large ({im.width}x{im.height} > {MAX_PIXELS} pixels)")
                if im.width < 2 or im.height < 2:
                    raise DecodeError(f"image too small ({im.width}x{im.height})")
                im.load()
                # In place: otherwise it copies every field that needs no turning (a quarter of
                # decoding a BCCD field on this repo's 2-core machine: 3.8 -> 2.9 ms).
                ImageOps.exif_transpose(im, in_place=True)
                return to_rgb8(im)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        # PIL reports truncation and corrupt streams as OSError/SyntaxError/ValueError.
        raise DecodeError(f"corrupt or truncated image: {e}") from None


# The JPEG end-of-image marker: nvJPEG decodes a truncated file without complaint (grey where data is
# missing, seen on an H100) where Pillow rightly refuses it, so only complete files go to the GPU.
_EOI = b"\xff\xd9"
_ORIENTATION = 0x0112
# torchvision 0.29 deprecates its image decoders for TorchCodec (not installed here) and warns on
# every call; the README says what replaces this path when they go.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")


def device_decodable(data: bytes) -> bool:
    """Whether nvJPEG decodes `data` as `decode_bytes` would: a complete baseline JPEG in three
    colour channels, no EXIF turn, within the size limits. Anything else goes to `decode_bytes`,
    which also gives the reason when a file is bad. Reads only the headers (38 us per BCCD field on
    an H100 host, against 2.6 ms for a full decode)."""
    if not data.endswith(_EOI):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode != "RGB" or "progressive" in im.info or "progression" in im.info:
                return False
            if "exif" in im.info and im.getexif().get(_ORIENTATION, 1) != 1:
                return False
            w, h = im.size
    except Exception:       # whatever Pillow makes of it, decode_bytes will say it properly
        return False
    return 2 <= w and 2 <= h and w * h <= MAX_PIXELS


def decode_on_device(datas: list[bytes], device) -> list:
    """nvJPEG batch decode of `device_decodable` files into [3, H, W] uint8 tensors on `device`;
    raises RuntimeError if any of them fails (nothing is returned for the others). The caller
    keeps the tensors until its work on them has finished: torchvision decodes on a stream of
    its own into memory allocated on the current one, so memory freed early could be written by
    the next batch's decode before the current stream has read it."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def device_decoder_problem(device) -> str | None:
    """Why `decode_on_device` cannot be used on `device` (None: it can), found by decoding a small
    JPEG made here both ways: torchvision may be built without nvJPEG, or drop its decoders."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 160)).save(buf, "JPEG", quality=95)
    try:
        field = decode_on_device([buf.getvalue()], device)[0]
        expected = decode_bytes(buf.getvalue())
        got = field.permute(1, 2, 0).cpu().numpy()
    except Exception as e:      # ImportError, RuntimeError, ...: any of them means "not here"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if got.shape != expected.shape or np.abs(got.astype(int) - expected).max() > 8:
        return "its test field decoded differently from Pillow's"
    return None


def to_rgb8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif a.max() > 255:
            a = a * (255.0 / a.max())
        g = np.nan_to_num(a).clip(0, 255).round().astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        # Transparent regions become white, as a slide's background looks under the microscope.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(bg, rgba).convert("RGB"))
    if mode != "RGB":
        im = im.convert("RGB")
    return np.array(im)  # writable: torch.from_numpy refuses read-only memory silently


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image file as `decode_file` would turn it (EXIF orientation applied),
    from its headers alone; DecodeError when it is no image."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if "exif" in im.info and im.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
    except UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"corrupt or truncated image: {e}") from None
    return w, h


def decode_file(path) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_bytes(f.read())
