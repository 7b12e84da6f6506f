"""The DeepSpeed config and the run config a benchmark trains with: one builder each, shared by the measured
cells (``cells``) and the engine-overhead comparison (``engine_overhead``)."""
from __future__ import annotations

from ds_face.config import DataConfig, HeadConfig, ModelConfig, OptimizerConfig, RunConfig, ScheduleConfig


def ds_config(micro_batch: int, stage: int, *, precision: str = "fp32", clipping: float = 0.0,
              overlap_comm: bool = False) -> dict:
    """One micro-batch per optimizer step, ZeRO ``stage``; the optimizer comes from the run config.

    ``precision``: fp32 and tf32 (fp32 weights) add nothing; ``overlap_comm``: contiguous gradients and
    overlapped reduction, as ds_configs/zero2_*.json.
    """
    zero = {"stage": stage}
    if overlap_comm:
        zero.update(contiguous_gradients=True, overlap_comm=True)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "gradient_clipping": clipping, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if precision == "fp16":
        # a low first scale: ArcFace's s=64 logits overflow 2^16 at once, and a few steps must not all be skipped
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def run_config(backbone: str, embedding: int, classes: int, sample_rate: float, num_samples: int, seed: int,
               optimizer: str = "sgd") -> RunConfig:
    """One epoch of ``num_samples`` synthetic samples; margin, LR and schedule shape: the run-config defaults.
    ``optimizer``: "sgd", or any Adam ("adam", "adamw") as AdamW."""
    return RunConfig(model=ModelConfig(backbone=backbone, embedding_size=embedding),
                     head=HeadConfig(num_classes=classes, sample_rate=sample_rate),
                     optimizer=OptimizerConfig(name="sgd" if optimizer == "sgd" else "adamw"),
                     schedule=ScheduleConfig(epochs=1), data=DataConfig(num_samples=num_samples), seed=seed)
