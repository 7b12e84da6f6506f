"""Face alignment as InsightFace aligns IJB crops: the least-squares similarity transform (Umeyama) from 5
landmarks to the ArcFace template, warped with OpenCV's cv2.warpAffine (bilinear, black border), as arcface_torch's
eval_ijbc.py does: the crops are arcface_torch's, byte for byte, given the same decoded image."""
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
    """``cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)``, as arcface_torch's eval_ijbc.py warps:
    ``matrix`` maps input pixel coordinates (pixel centres at integers) to output ones; bilinear in OpenCV's
    fixed point (coordinates to 1/32 px, rounded to the nearest grey level); outside the image: black.

    OpenCV itself rather than an emulation: a numpy restatement of its fixed-point arithmetic gave the same
    bytes on 500 random crops but took 15x as long (2.7 vs 0.17 ms per 112x112 crop, docs/evaluation.md "IJB-B / IJB-C").
    """
    import cv2
    return cv2.warpAffine(np.ascontiguousarray(image), np.asarray(matrix, np.float64), (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def align(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """uint8 [112, 112, 3]: ``image`` warped so that its 5 landmarks land on ARCFACE_TEMPLATE (least squares)."""
    return warp_affine(image, umeyama(landmarks, ARCFACE_TEMPLATE))
