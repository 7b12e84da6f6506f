"""Encoded images decoded, the one decoder of ds_face: libjpeg-turbo (simplejpeg) for JPEG, about twice PIL's
speed (BENCHMARKS.md), and PIL for the rest (PNG from image folders) and for JPEGs simplejpeg cannot convert.

Images from outside the training data (.bin pair sets, IJB crops) are decoded with a bound on their size
(``decode_bounded``): the width and height are read from the header first and an image over the bound is
refused before any of its pixels are decoded: a 10000x10000 JPEG would otherwise take ~300 MB to decode
(65535x65535: ~13 GB). The training loader checks an exact size the same way (``ds_face.data.arrow.decode_rgb``).
Imports no torch: IJB's decode workers use it.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg

JPEG_SOI = b"\xff\xd8\xff"


class ImageTooLarge(ValueError):
    """The header's size is over the bound; the message reads "is WxH, more than the N pixels allowed"."""

    def __init__(self, width: int, height: int, max_pixels: int):
        super().__init__(f"is {width}x{height}, more than the {max_pixels} pixels allowed")
        self.width, self.height, self.max_pixels = width, height, max_pixels


def is_jpeg(data) -> bool:
    """JPEG's start-of-image marker; ``data`` is bytes or a memoryview of unsigned bytes."""
    return bytes(data[:3]) == JPEG_SOI


def header_size(data: bytes) -> tuple[int, int]:
    """(height, width) from an encoded image's header alone (JPEG: simplejpeg; PNG and others: PIL's lazy open)."""
    if is_jpeg(data):
        return tuple(simplejpeg.decode_jpeg_header(data)[:2])
    import warnings

    from PIL import Image
    with warnings.catch_warnings():  # PIL's own bomb warning: the caller's bound, far lower, decides here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:  # reads the header; pixels are decoded only on access
            return image.height, image.width


def decode(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB, written into ``out`` when given (a preallocated batch slot)."""
    if is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
        except ValueError:
            pass  # e.g. CMYK: PIL converts it
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    if out is None:
        return pixels
    out[...] = pixels
    return out


def decode_bounded(data: bytes, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 RGB, or ImageTooLarge when the header says more than ``max_pixels`` (nothing decoded then).

    Any other failure is the decoder's own exception (PIL's DecompressionBombError, UnidentifiedImageError,
    simplejpeg's ValueError, ...): callers name the image in their own words."""
    height, width = header_size(data)
    if height * width > max_pixels:
        raise ImageTooLarge(width, height, max_pixels)
    return decode(data)
