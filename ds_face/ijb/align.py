"""Face alignment as InsightFace aligns IJB crops: the least-squares similarity transform (Umeyama) from 5
landmarks to the ArcFace template, applied with cv2.warpAffine's pixel convention (here with PIL), bilinear,
black border."""
from __future__ import annotations

import numpy as np

# The ArcFace 112x112 five-point template (left eye, right eye, nose tip, left and right mouth corners):
# InsightFace's 96x112 template shifted 8 px right.
ARCFACE_TEMPLATE = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                             [33.5493, 92.3655], [62.7299, 92.2041]]) + np.array([8.0, 0.0])
ALIGNED_SIZE = 112


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity transform (scale, rotation, translation; no reflection) minimising
    sum ||dst_i - (s R src_i + t)||^2: Umeyama (1991), "Least-squares estimation of transformation parameters
    between two point patterns", eqs. 34-43. Raises ValueError for degenerate points (all equal)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc ** 2).sum() / len(src)
    if not var_s > 1e-12:
        raise ValueError("the landmarks are all the same point")
    cov = dc.T @ sc / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map is a reflection: take the best rotation
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sing * d).sum() / var_s)
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """cv2.warpAffine(image, matrix, (size, size)) semantics with PIL: ``matrix`` maps input pixel coordinates
    (pixel centres at integers) to output ones; bilinear; outside the image: black."""
    from PIL import Image
    a, b = matrix[:, :2], matrix[:, 2]
    ai = np.linalg.inv(a)
    # PIL samples output pixel (x, y) at (x + 0.5, y + 0.5) and puts input pixel centres at +0.5 too:
    # input_pil = ai @ (q - 0.5) - ai @ b + 0.5 for an output point q in PIL coordinates.
    c = -ai @ b + 0.5 - ai @ np.array([0.5, 0.5])
    data = (ai[0, 0], ai[0, 1], c[0], ai[1, 0], ai[1, 1], c[1])
    out = Image.fromarray(image).transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR,
                                           fillcolor=(0, 0, 0))
    return np.asarray(out)


def align(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """uint8 [112, 112, 3]: ``image`` warped so that its 5 landmarks land on ARCFACE_TEMPLATE (least squares)."""
    return warp_affine(image, umeyama(landmarks, ARCFACE_TEMPLATE))
