"""The Partial FC head: margins, the class-sharded layer, and its optimizer (all outside DeepSpeed)."""
from ds_face.head.margins import Margin
from ds_face.head.optim import HeadOptimizer
from ds_face.head.partial_fc import PartialFC, class_shard, cosine, distributed_cross_entropy

__all__ = ["Margin", "PartialFC", "HeadOptimizer", "class_shard", "cosine", "distributed_cross_entropy"]
