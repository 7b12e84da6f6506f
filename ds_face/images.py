"""Encoded images decoded, the one decoder of ds_face: libjpeg-turbo (simplejpeg) for JPEG, about twice PIL's
speed (BENCHMARKS.md), and PIL for PNG (image folders) and for JPEGs simplejpeg cannot convert (CMYK).

Default deny: an image is identified by its magic bytes, and only the two formats ds_face's converters write
(JPEG, PNG; ``data_prep.source.image_problem``) are decoded; anything else (GIF, BMP, WebP, TIFF, garbage) is
refused with ``ImageFormatError`` before any decoder sees it, and PIL is told which one format to expect, so
none of its other parsers ever runs.

Images from outside the training data (.bin pair sets, IJB crops) are decoded with a bound on their size
(``decode_bounded``): the width and height are read from the header first and an image over the bound is
refused before any of its pixels are decoded: a 10000x10000 JPEG would otherwise take ~300 MB to decode
(65535x65535: ~13 GB). The training loader checks an exact size the same way (``ds_face.data.arrow.decode_rgb``).
Imports no torch: IJB's decode workers use it.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import simplejpeg

JPEG_SOI = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FORMATS = {"JPEG": JPEG_SOI, "PNG": PNG_SIGNATURE}  # the allow-list: format name -> magic bytes


class ImageFormatError(ValueError):
    """Not one of FORMATS by its magic bytes; the message reads "not a JPEG or PNG image (starts with ...)"."""


class ImageTooLarge(ValueError):
    """The header's size is over the bound; the message reads "is WxH, more than the N pixels allowed"."""

    def __init__(self, width: int, height: int, max_pixels: int):
        super().__init__(f"is {width}x{height}, more than the {max_pixels} pixels allowed")
        self.width, self.height, self.max_pixels = width, height, max_pixels


def image_format(data) -> str:
    """'JPEG' or 'PNG' from the magic bytes of ``data`` (bytes or a memoryview of unsigned bytes), else
    ImageFormatError naming the first bytes."""
    head = bytes(data[:8])
    for name, magic in FORMATS.items():
        if head.startswith(magic):
            return name
    what = "empty" if not head else f"starts with {head.hex(' ')}"
    raise ImageFormatError(f"not a JPEG or PNG image ({what})")


def is_jpeg(data) -> bool:
    """JPEG's start-of-image marker; ``data`` is bytes or a memoryview of unsigned bytes."""
    return bytes(data[:3]) == JPEG_SOI


def header_size(data) -> tuple[int, int]:
    """(height, width) from an encoded image's header alone (JPEG: simplejpeg; PNG: its IHDR chunk, which the
    PNG standard puts first); ImageFormatError for any other format."""
    if image_format(data) == "JPEG":
        return tuple(simplejpeg.decode_jpeg_header(data)[:2])
    # PNG: signature (8), then the IHDR chunk: length (4), b"IHDR", width (4), height (4), big-endian
    ihdr = bytes(data[8:24])
    if len(ihdr) < 16 or ihdr[4:8] != b"IHDR":
        raise ValueError("PNG without its IHDR header (truncated or not a PNG)")
    width, height = struct.unpack(">II", ihdr[8:16])
    return height, width


def decode(data, out: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB, written into ``out`` when given (a preallocated batch slot); JPEG or PNG only."""
    kind = image_format(data)
    if kind == "JPEG":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
        except ValueError:
            pass  # e.g. CMYK: PIL converts it
    import warnings

    from PIL import Image
    with warnings.catch_warnings():  # PIL's bomb warning: the size check below (and the callers') decide
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=[kind])  # PIL's parser of this one format, no other
    with image:
        if (image.height, image.width) != header_size(data):  # e.g. a second IHDR: callers checked the first
            raise ValueError(f"the header says {header_size(data)[1]}x{header_size(data)[0]}, the decoder "
                             f"{image.width}x{image.height}")
        pixels = np.asarray(image.convert("RGB"))
    if out is None:
        return pixels
    out[...] = pixels
    return out


def decode_bounded(data, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 RGB, or ImageTooLarge when the header says more than ``max_pixels`` (nothing decoded then).

    ImageFormatError for a format other than JPEG and PNG; any other failure is the decoder's own exception
    (PIL's DecompressionBombError, simplejpeg's ValueError, ...): callers name the image in their own words."""
    height, width = header_size(data)
    if height * width > max_pixels:
        raise ImageTooLarge(width, height, max_pixels)
    return decode(data)
