"""InsightFace verification ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30, ...), read safely and decoded.

**Safety of .bin files.** A ``.bin`` is a pickle of ``(bins, issame_list)``: encoded JPEG/PNG images (``bytes``,
pickled by Python 2 as ``str``, hence ``encoding="bytes"``) and one bool per pair. Unpickling can run arbitrary
code, so the files are read with a restricted unpickler that resolves no global at all except numpy's array
and scalar reconstructors (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``: they build arrays from bytes and
call nothing else) and ``_codecs.encode`` (protocol-2 pickles of Python 3 bytes), for third-party files that
store images as uint8 arrays or flags as numpy bools. Anything else (``os.system``, ``builtins.eval``, ...) is
refused before it is called, with an error naming the file and the global. The InsightFace files need no global. Every image's width and height are read from its header
before it is decoded; an image over ``MAX_PIXELS`` (16x 112x112) is refused, naming it, so a 10000x10000
JPEG costs nothing.
"""
from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = (112, 112)
# The largest image a .bin may hold, in pixels: 16x the 112x112 the sets are made of (e.g. 448x448, or the
# 250x250 LFW originals), read from the header and refused before decoding (ds_face.images).
MAX_PIXELS = 16 * IMAGE_SIZE[0] * IMAGE_SIZE[1]

# (module, name) globals a .bin may reference: numpy's array/scalar reconstruction, nothing that runs code.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how pickle protocol < 3 stores Python 3 bytes (str -> bytes via latin-1)
})


class BinError(ValueError):
    """A verification ``.bin`` that cannot be used; the message names the file (and the image index)."""


class _Forbidden(pickle.UnpicklingError):
    pass


def _plain_dtype(*args):
    """numpy.dtype for a .bin: numbers and bools only. An object dtype would let numpy allocate whatever shape
    the pickle declares and fill it from a short list (a 1 KB file asking for 8 GB); other arrays must bring
    exactly their bytes."""
    dtype = np.dtype(*args)
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise _Forbidden(f"asks for a numpy array of dtype {dtype.name} (numbers and bools only: an object array "
                         f"is allocated at whatever size the pickle declares)")
    return dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _Forbidden(f"references the forbidden global {module}.{name}")

    def persistent_load(self, pid):
        raise _Forbidden(f"uses a persistent id ({pid!r})")


_PICKLE_STARTS = (b"\x80", b"(", b"]", b")", b"}")  # PROTO (protocol 2+), or a protocol 0/1 container opcode


def _unpickle(path: Path, data: bytes):
    if data[:1] not in _PICKLE_STARTS:
        raise BinError(f"{path}: not a pickle (starts with {data[:8]!r}); expected an InsightFace verification .bin")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Forbidden as err:
        raise BinError(f"{path}: refused to unpickle: it {err} (a .bin holds "
                       f"only image bytes and bools; this file may be malicious)") from None
    except EOFError:
        raise BinError(f"{path}: truncated (the pickle ends before its STOP opcode)") from None
    except RecursionError:
        raise BinError(f"{path}: not a verification .bin (pickle nested too deeply)") from None
    except Exception as err:  # UnpicklingError, ValueError, struct.error, ... from a damaged or foreign file
        what = "truncated or damaged pickle" if data[:1] == b"\x80" else "not a pickle"
        raise BinError(f"{path}: {what} ({type(err).__name__}: {err})") from None


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, issame[bool] of len(images) // 2) from an InsightFace ``.bin``, checked for shape."""
    path = Path(path)
    if not path.is_file():
        raise BinError(f"{path}: no such file")
    obj = _unpickle(path, path.read_bytes())
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        what = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        raise BinError(f"{path}: expected a pickled tuple (bins, issame_list), found {what}")
    bins, flags = obj
    if not isinstance(bins, (list, tuple)):
        raise BinError(f"{path}: bins must be a list of encoded images, found a {type(bins).__name__}")
    if not isinstance(flags, (list, tuple, np.ndarray)):
        raise BinError(f"{path}: issame_list must be a list of bools, found a {type(flags).__name__}")
    size, total = path.stat().st_size, 0
    for i, item in enumerate(bins):  # sizes first: nothing is copied before the images are known to fit the file
        if isinstance(item, (bytes, bytearray)) or (isinstance(item, np.ndarray) and item.dtype == np.uint8
                                                    and item.ndim == 1):
            length = len(item)
        else:
            raise BinError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")
        total += length
        if total > size:  # the pickle referenced the same bytes again and again: each copy would cost memory
            raise BinError(f"{path}: images 0..{i} total {total} bytes, more than the file's {size} (the same "
                           f"image bytes referenced repeatedly?); refused before copying them")
    images = [item.tobytes() if isinstance(item, np.ndarray) else bytes(item) for item in bins]
    if not images:
        raise BinError(f"{path}: holds no images")
    if len(images) % 2:
        raise BinError(f"{path}: {len(images)} images, an odd number (pairs are consecutive images)")
    issame = []
    for i, flag in enumerate(list(flags)):
        if isinstance(flag, (bool, np.bool_)) or (isinstance(flag, (int, np.integer)) and flag in (0, 1)):
            issame.append(bool(flag))
        else:
            raise BinError(f"{path}: issame_list[{i}] is {flag!r}, expected a bool")
    if len(issame) * 2 != len(images):
        raise BinError(f"{path}: {len(issame)} issame flags for {len(images)} images; expected "
                       f"{len(images) // 2} (one per pair)")
    return images, np.asarray(issame, dtype=bool)


def decode_images(images: list[bytes], where: str = "", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [N, 112, 112, 3] RGB; an image of another size is resized to 112x112 (arcface_torch resizes too).

    Every image's size is read from its header first; one larger than ``max_pixels`` is refused, naming it,
    before any of its pixels are decoded."""
    from PIL import Image

    from ds_face.images import ImageTooLarge, decode_bounded, header_size
    for i, data in enumerate(images):  # every header first: the output is allocated for real images only
        try:
            header_size(data)
        except Exception as err:
            raise BinError(f"{where}: image {i} cannot be decoded ({type(err).__name__}: {err})") from None
    out = np.empty((len(images), *IMAGE_SIZE, 3), np.uint8)
    for i, data in enumerate(images):
        try:
            pixels = decode_bounded(data, max_pixels)
            if pixels.shape[:2] != IMAGE_SIZE:
                pixels = np.asarray(Image.fromarray(pixels).resize(IMAGE_SIZE[::-1], Image.BILINEAR))
        except ImageTooLarge as err:
            raise BinError(f"{where}: image {i} {err} (16x {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}); refused without "
                           f"decoding it") from None
        except Image.DecompressionBombError as err:  # over twice PIL's limit: PIL refuses to open it at all
            raise BinError(f"{where}: image {i}: {err}; refused without decoding it") from None
        except Exception as err:
            raise BinError(f"{where}: image {i} cannot be decoded ({type(err).__name__}: {err})") from None
        out[i] = pixels
    return out


@dataclass
class VerificationSet:
    """A decoded pair set: images [2P, 112, 112, 3] uint8 (pair p = images 2p, 2p+1), issame [P] bool."""
    name: str
    path: str
    images: np.ndarray
    issame: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "VerificationSet":
        encoded, issame = load_bin(path)
        return cls(name or Path(path).stem, str(path), decode_images(encoded, str(path)), issame)

    @property
    def pairs(self) -> int:
        return len(self.issame)
