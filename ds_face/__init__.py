"""ds_face: face recognition training with DeepSpeed and a sharded Partial FC head."""
__version__ = "0.1.0"

from ds_face.quiet import quiet as _quiet

_quiet()  # drop the warnings nobody can act on (ds_face/quiet.py lists them), in every process that uses ds_face
