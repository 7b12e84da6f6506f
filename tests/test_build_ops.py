"""DeepSpeed's shm op for CPU ranks lives in this venv (ds_face/runtime/op_cache.py) and is not rebuilt by a launch."""
import os
import subprocess
import sys

import pytest

from ds_face.runtime.op_cache import built_library, venv_extensions_dir

IN_A_VENV = venv_extensions_dir() is not None


def python(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=environ)


@pytest.mark.skipif(not IN_A_VENV, reason="the per-venv folder applies inside a writable venv")
def test_import_ds_face_points_torch_at_this_venv_unless_the_user_chose():
    show = "import ds_face, os, shutil; print(os.environ['TORCH_EXTENSIONS_DIR']); print(shutil.which('ninja'))"
    own = python(show, PATH="/usr/bin:/bin").stdout.split()
    assert own == [os.path.join(sys.prefix, "torch_extensions"), os.path.join(sys.prefix, "bin", "ninja")]
    assert python(show, TORCH_EXTENSIONS_DIR="/somewhere/else").stdout.split()[0] == "/somewhere/else"


def test_build_ops_if_missing_is_silent_and_does_not_import_torch_when_built(tmp_path):
    op = tmp_path / "deepspeed_shm_comm"
    op.mkdir()
    (op / "deepspeed_shm_comm.so").write_bytes(b"")
    code = "import sys; from ds_face.runtime.build_ops import build; r = build(if_missing=True); print(r, 'torch' in sys.modules)"
    done = python(code, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert (done.returncode, done.stdout, done.stderr) == (0, "0 False\n", "")


def test_build_ops_finds_the_built_op_up_to_date_and_leaves_it():
    """After `make setup` (which runs it) a second run checks, loads and rebuilds nothing."""
    before = built_library()
    if before is None:
        pytest.skip("the op is not built here (not set up by `make setup`, or not a CPU machine)")
    stamp = os.stat(before).st_mtime_ns
    done = subprocess.run([sys.executable, "-m", "ds_face.runtime.build_ops"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith(" ... up to date\n") and done.stdout.count("\n") == 1, done.stdout
    assert os.stat(before).st_mtime_ns == stamp
