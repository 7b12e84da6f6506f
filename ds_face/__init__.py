"""ds_face: face recognition training with DeepSpeed and a sharded Partial FC head."""
__version__ = "0.1.0"
