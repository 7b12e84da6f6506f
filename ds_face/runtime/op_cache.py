"""Where DeepSpeed's JIT-compiled op for CPU ranks is built: a folder of this venv, not the user's shared cache.

On a machine whose DeepSpeed accelerator is the CPU, every rank's ``deepspeed.init_distributed`` loads the
shared-memory communication op ``deepspeed_shm_comm`` (``deepspeed/comm/torch.py: build_shm_op`` ->
``ShareMemCommBuilder.load()``). The pip wheel ships it as C++ source, so the first rank that starts compiles it
with ``torch.utils.cpp_extension.load`` (ninja + g++, printing nothing) into ``TORCH_EXTENSIONS_DIR``. Left
unset, that is ``~/.cache/torch_extensions/py311_cpu``, shared by every venv of the user; its ``build.ninja``
names the sources inside one venv's DeepSpeed, so two checkouts with their own venvs rebuild the op in turn,
each launch invalidating the other's build.

So ``import ds_face`` (every ds_face process: launch.sh's ranks, ``ds_face.runtime.spawn``'s, the tests, ``make setup``'s
``python -m ds_face.runtime.build_ops``) calls ``use_venv_extensions_dir()``: ``TORCH_EXTENSIONS_DIR`` becomes
``<venv>/torch_extensions`` when the user has not set it and Python runs in a venv (``sys.prefix``) this user
can write in; child processes inherit it. And torch runs the ``ninja`` it finds first on PATH: a system ninja
(1.11 here) and the venv's (pip's ``ninja``, a DeepSpeed dependency: 1.13) read each other's ``.ninja_log`` as
stale and rebuild everything, so a process started without the venv's ``bin`` on PATH (``.venv/bin/python``
run directly) gets it put first, as ``activate`` does. Nothing here imports torch.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME (deepspeed/ops/op_builder/cpu/comm.py)


def venv_extensions_dir() -> str | None:
    """``<venv>/torch_extensions`` when Python runs in a venv this user can write in, else None (torch's default)."""
    if sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return None
    return os.path.join(sys.prefix, "torch_extensions")


def use_venv_extensions_dir() -> None:
    """Point TORCH_EXTENSIONS_DIR at this venv's folder unless the user chose one, and let the venv's ninja build
    there (``import ds_face`` calls it)."""
    folder = venv_extensions_dir()
    if folder is None:
        return
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = folder
    bin_dir = os.path.join(sys.prefix, "bin")
    ninja = os.path.join(bin_dir, "ninja")
    if os.access(ninja, os.X_OK) and shutil.which("ninja") != ninja:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def built_library() -> str | None:
    """The built ``deepspeed_shm_comm`` library torch would load, found without importing torch, or None.

    torch.utils.cpp_extension builds an op NAME in ``$TORCH_EXTENSIONS_DIR/NAME`` when that is set, else in
    ``~/.cache/torch_extensions/py<major><minor>_<cpu|cuXY|rocmXY>/NAME`` (its ``_get_build_directory``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        pattern = os.path.join(root, SHM_OP, f"{SHM_OP}.so")
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        pattern = os.path.join(cache, "torch_extensions", f"{python}_*", SHM_OP, f"{SHM_OP}.so")
    found = sorted(glob.glob(pattern))
    return found[0] if found else None
