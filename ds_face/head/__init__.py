"""The Partial FC head: margins, the class-sharded layer, and its optimizer (all outside DeepSpeed)."""
import os

from ds_face.head.margins import Margin
from ds_face.head.optim import HeadOptimizer
from ds_face.head.partial_fc import PartialFC, class_shard, cosine, distributed_cross_entropy

__all__ = ["Margin", "PartialFC", "HeadOptimizer", "build_head", "class_shard", "cosine", "distributed_cross_entropy"]


def build_head(cfg, device) -> tuple[PartialFC, HeadOptimizer]:
    """The head and its optimizer from a run config (``ds_face.config.RunConfig``): the one place they are
    built, for training and for benchmarks."""
    h, o = cfg.head, cfg.optimizer
    margin = Margin(s=h.scale, m1=h.margin[0], m2=h.margin[1], m3=h.margin[2])
    head = PartialFC(cfg.model.embedding_size, h.num_classes, h.sample_rate, margin, device=device, seed=cfg.seed,
                     storage=h.storage, storage_dtype=h.storage_dtype, storage_dir=storage_dir(cfg))
    return head, HeadOptimizer(head, o.name, momentum=o.momentum, weight_decay=o.weight_decay)


def storage_dir(cfg) -> str:
    """Where ``disk`` storage keeps its scratch files: ``head.storage_dir``, or ``<output.dir>/head_storage``."""
    return cfg.head.storage_dir or os.path.join(cfg.output.dir, "head_storage")
