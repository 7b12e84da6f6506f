"""IJB-B / IJB-C 1:1 template verification, as InsightFace releases the sets and arcface_torch's
``eval_ijbc.py`` scores them.

    python -m ds_face.eval ijb --root /data/IJB_release/IJBC --target IJBC --model model.pt [--backbone r100]
        [--batch-size 256] [--device cuda] [--workers 8] [--features feats.npz] [--json out.json] [--plot roc.png]

**Layout** (``<t>`` = the target in lower case, ``ijbc`` or ``ijbb``, as in the release):
``<root>/loose_crop/<image>``; ``<root>/meta/<t>_name_5pts_score.txt`` (image, 5 landmarks x y, detector score),
``<root>/meta/<t>_face_tid_mid.txt`` (image, template id, media id; the same images in the same order),
``<root>/meta/<t>_template_pair_label.txt`` (template 1, template 2, label 1 = same person).

**Protocol** (arcface_torch's default test mode: flip-sum F2, norm kept N1, detector score D1):

* each image is warped to 112x112 by the least-squares similarity transform (Umeyama) from its 5 landmarks
  to the standard ArcFace template, bilinear, black border (cv2.warpAffine's pixel convention: pixel centres
  at integer coordinates), RGB;
* embedded with and without a horizontal flip (input ``(pixel/255 - 0.5)/0.5``), the two embeddings summed,
  *not* normalised, multiplied by the detector score;
* within a template, the images of one media are averaged; the media features are summed into the template
  feature, which is L2-normalised; a pair's score is the cosine of its two templates (float32);
* the ROC is sklearn's ``roc_curve(label, score)`` (intermediate collinear points dropped, as its default);
  TAR at FAR f is the TPR of **the ROC point whose FPR is nearest f** (ties: the larger FPR, then the larger
  TPR), exactly arcface_torch's rule; the FPR of that point is reported beside it. AUC: trapezoids.

Scoring is vectorised and memory-bounded: pairs are put in (lower, higher) template order and scored by
blocks of rows of the template Gram matrix (``FEATURES[a:b] @ FEATURES[a:].T``, at most ``GRAM_BYTES``),
seconds for IJB-C's 15.7M pairs. Decoding and alignment run in ``--workers`` processes with a bounded
number of images in flight.

**Bad input** stops with ``IJBError`` naming the file and line: a missing meta file, directory or image, a
line with the wrong number of fields or a non-number, the two image lists disagreeing, a template in the pair
list that no image has, a label other than 0/1, an image that does not decode or is larger than
``max_pixels`` (read from its header before decoding), an image name that leaves ``loose_crop``.

The package, one module per concern (imports run down this list, never up):

    ds_face.ijb.meta      the meta files, parsed and cross-checked (IJBMeta, read_meta, IJBError)
    ds_face.ijb.align     Umeyama + warp to the ArcFace 112x112 template
    ds_face.ijb.features  decode + align (worker processes) + embed; saved features
    ds_face.ijb.scoring   templates, pair scores, ROC, TAR@FAR, AUC; table and plot
    ds_face.ijb.cli       the command
"""
from ds_face.ijb.align import ALIGNED_SIZE, ARCFACE_TEMPLATE, align, umeyama, warp_affine
from ds_face.ijb.cli import check_args, main
from ds_face.ijb.features import (
    CHUNK, FEATURES_VERSION, MAX_PIXELS, aligned_chunks, image_features, load_aligned, load_features, save_features,
)
from ds_face.ijb.meta import (
    IJBError, IJBMeta, check_images_exist, read_landmarks, read_meta, read_pairs, read_template_media,
)
from ds_face.ijb.scoring import (
    FARS, GRAM_BYTES, RULE, auc, evaluate_features, format_table, pair_scores, plot_roc, roc_curve, tar_at_far,
    template_features, template_index,
)
from ds_face.config.ijb_layout import check_layout, meta_files

__all__ = [
    "ALIGNED_SIZE", "ARCFACE_TEMPLATE", "align", "umeyama", "warp_affine",
    "check_args", "main",
    "CHUNK", "FEATURES_VERSION", "MAX_PIXELS", "aligned_chunks", "image_features", "load_aligned", "load_features",
    "save_features",
    "IJBError", "IJBMeta", "check_images_exist", "read_landmarks", "read_meta", "read_pairs", "read_template_media",
    "FARS", "GRAM_BYTES", "RULE", "auc", "evaluate_features", "format_table", "pair_scores", "plot_roc", "roc_curve",
    "tar_at_far", "template_features", "template_index",
    "check_layout", "meta_files",
]
