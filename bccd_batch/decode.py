"""Decode image bytes into 8-bit RGB, whatever the file holds, or say clearly why not.

The bytes are read once by the caller (who also hashes them), so decoding never touches the disk.
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


def decode_file(path) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_bytes(f.read())
