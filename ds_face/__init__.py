"""ds_face: face recognition training with DeepSpeed and a sharded Partial FC head."""
__version__ = "0.1.0"

from ds_face.runtime.op_cache import use_venv_extensions_dir as _use_venv_extensions_dir
from ds_face.runtime.quiet import quiet as _quiet

_quiet()  # drop the warnings nobody can act on (ds_face/runtime/quiet.py lists them), in every process that uses ds_face
_use_venv_extensions_dir()  # DeepSpeed's JIT-built op lives in this venv, not ~/.cache (ds_face/runtime/op_cache.py says why)
