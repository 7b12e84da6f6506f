"""Real two-host launches (pdsh over a private loopback sshd): tests/multinode/run_two_hosts.sh.

Skipped where sshd or pdsh is missing (Debian: apt-get install -y openssh-server pdsh). About 15 s each.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "multinode" / "run_two_hosts.sh"
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)
MISSING = [name for name, path in (("sshd", SSHD), ("pdsh", shutil.which("pdsh")), ("ssh", shutil.which("ssh")),
                                   ("ssh-keygen", shutil.which("ssh-keygen"))) if not path]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (Debian: apt-get install "
                                "-y openssh-server pdsh); the two-host launch test needs them")


def two_hosts(*args):
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def test_two_hosts_over_pdsh_train_and_checkpoint():
    assert "run_two_hosts: OK: 2 nodes x 1 rank, checkpoint step_6" in two_hosts()


@pytest.mark.parametrize("rank", [0, 1])
def test_killing_one_node_rank_stops_both_nodes(rank):
    assert f"run_two_hosts: OK: rank {rank} killed" in two_hosts("--kill-rank", str(rank))


def test_hostile_values_are_refused_and_quoted_values_arrive_verbatim():
    out = two_hosts("--hostile")
    assert "control: DeepSpeed's runner alone ran $(touch ...) from an exported value" in out
    assert "refused 9 hostile launches, no marker file" in out
    assert "run_two_hosts: OK: hostile values refused (9)" in out
