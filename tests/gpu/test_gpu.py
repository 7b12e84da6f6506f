"""The GPU checks as pytest tests (marker ``gpu``): ``pytest -m gpu tests/gpu`` on a machine with NVIDIA GPUs.
Elsewhere every test here is skipped with the reason "no CUDA device". ``make gpu-check`` runs the same checks
and writes the report; the CPU suite checks that runner's code (tests/test_gpu_check.py)."""
import subprocess
import sys

import pytest
import torch

from tests.gpu.checks import BY_NAME, ROOT, Context

pytestmark = [pytest.mark.gpu,  # device_count: NVML, no CUDA context in the pytest process
              pytest.mark.skipif(torch.cuda.device_count() == 0, reason="no CUDA device")]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return Context(world_size=torch.cuda.device_count(), workdir=tmp_path_factory.mktemp("gpu"))


# "parent" is left out here: other tests of a session may use the GPU in pytest's own process; the runner's
# parent is checked end to end below
@pytest.mark.parametrize("name", [name for name in BY_NAME if name != "parent"])
def test_gpu_check(ctx, name):
    print(BY_NAME[name].run(ctx))


def test_the_runner_writes_one_report_and_its_parent_opens_no_cuda_context(tmp_path):
    out = tmp_path / "gpu-check.md"
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.check", "--only", "nccl,head,parent", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.count(": passed") == 3 and "FAILED" not in text
