"""launch.sh's pre-flight (ds_face.launch.preflight): bad settings and a busy port stop a launch before DeepSpeed starts
any rank, with one message; the allow-lists for the values of a multi-node launch (environment variable names,
ports, the master address). Real launch.sh, real sockets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ds_face.launch.preflight import address_problem, choose_port, enabled_precisions, env_name_problem, port_problem, \
    PreflightError
from ds_face.runtime.spawn import run_command

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def launch(*args, env=None, timeout=120):
    environ = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], **(env or {})}
    return run_command([str(ROOT / "launch.sh"), "configs/cpu_demo.yaml", "ds_configs/cpu_zero2_fp32.json",
                        *map(str, args)], cwd=ROOT, timeout=timeout, env=environ)


def listening():
    s = socket.socket()
    s.bind(("", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_a_busy_master_port_stops_the_launch_naming_it(tmp_path):
    sock, port = listening()
    with sock:
        proc = launch("--master_port", port, "--set", f"output.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"launch.sh: error: --master_port {port} is already in use on this machine "
                                   f"(another training run?); choose another, or leave --master_port out to have "
                                   f"a free one picked")
    assert not (tmp_path / "run").exists()  # no rank started


def test_a_busy_default_port_is_replaced_and_said(capsys):
    sock, port = listening()
    with sock:
        chosen = choose_port(port, given=False)
        assert chosen != port and 0 < chosen < 65536
        assert f"port {port} (DeepSpeed's default master port) is in use; using --master_port {chosen}" in \
            capsys.readouterr().err
        with pytest.raises(PreflightError, match=f"--master_port {port} is already in use"):
            choose_port(port, given=True)
    assert choose_port(port, given=True) == port  # free again


@pytest.mark.parametrize("args,expect", [
    (["--set", "optimizer.lr=.nan"], "'optimizer.lr' must be a finite number, got nan"),
    (["--set", "model.backbone.foo=1"], "--set model.backbone.foo: 'model.backbone' is 'r_tiny', not a mapping"),
    (["--set", "optimizer.momentum=-5"], "'optimizer.momentum' must be in [0, 1), got -5.0"),
])
def test_bad_settings_stop_launch_sh_before_any_rank(tmp_path, args, expect):
    proc = launch(*args, "--set", f"output.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("launch.sh: error: configs/cpu_demo.yaml: invalid run config:")
    assert expect in proc.stderr
    assert "deepspeed" not in proc.stdout.lower()  # the runner never started
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_stops_launch_sh(tmp_path):
    (tmp_path / "taken").write_text("x")
    proc = launch("--set", f"output.dir={tmp_path / 'taken'}")
    assert proc.returncode == 2
    assert f"'output.dir' {tmp_path / 'taken'} is a file, not a directory" in proc.stderr


def test_a_bad_deepspeed_json_stops_launch_sh(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 4, "fp_16": {"enabled": true}, "gradient_clipping": "abc"}')
    environ = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run([str(ROOT / "launch.sh"), "configs/cpu_demo.yaml", str(ds), "--set",
                           f"output.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=environ)
    assert proc.returncode == 2
    assert f"launch.sh: error: {ds}: invalid DeepSpeed config:" in proc.stderr
    assert "unknown key 'fp_16' (did you mean 'fp16'?)" in proc.stderr
    assert "'gradient_clipping' must be a finite number >= 0 (0: off), got 'abc'" in proc.stderr


# -- the allow-lists of a multi-node launch, kind by kind ----------------------------------------------------

@pytest.mark.parametrize("name", ["DS_FACE_TIMEOUT_MIN", "_x", "NCCL_IB_HCA", "a1", "A" * 255])
def test_environment_variable_names_that_pass(name):
    assert env_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A;id", "$(id)", "A=B", "A\nB", "Ä", "A" * 256, "-A",
                                  "A*", "A\x00"])
def test_environment_variable_names_refused(name):
    assert "is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 255 characters)" in \
        env_name_problem(name)


@pytest.mark.parametrize("port, ok", [("1", True), ("29500", True), ("65535", True), ("0", False), ("65536", False),
                                      ("-1", False), ("1e3", False), (" 80", False), ("80;id", False),
                                      ("\u0668\u0660", False), ("0x50", False), ("9" * 30, False)])
def test_ports(port, ok):
    assert (port_problem(port) is None) == ok
    if not ok:
        assert port_problem(port).endswith("is not a TCP port (an integer from 1 to 65535)")


@pytest.mark.parametrize("address, ok", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("::1", True), ("node-1", True), ("node-1.cluster.local", True),
    ("127.0.0.1;id", False), ("$(id)", False), ("`id`", False), ("a b", False), ("a\nb", False), ("-oX=y", False),
    ("nöde", False), ("", False), ("a" * 64, False), ("a..b", False), ("node_1", False), ("[::1]", False),
    ("127.0.0.1:29500", False), ("*", False), ("%h", False)])
def test_master_addresses(address, ok):
    assert (address_problem(address) is None) == ok
    if not ok:
        assert address_problem(address).endswith("is neither an IP address nor a host name")


# -- the precision against this machine (DeepSpeed's own accelerator probe) -------------------------------------
# ONEDNN_MAX_CPU_ISA=AVX512_CORE caps oneDNN at a Skylake-class ISA, without AVX512-FP16: DeepSpeed's CPU
# accelerator then reports is_fp16_supported() falsy, as it does on such a CPU (its bf16 answer is always True).
NO_FP16_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}


def test_enabled_precisions():
    assert enabled_precisions({"fp16": {"enabled": True}}) == ["fp16"]
    assert enabled_precisions({"bf16": {"enabled": True}}) == ["bf16"]
    assert enabled_precisions({"bfloat16": {"enabled": True}}) == ["bf16"]
    assert enabled_precisions({"fp16": {"enabled": False}, "bf16": {}}) == []
    assert enabled_precisions({}) == []


def test_fp16_on_a_machine_without_fp16_stops_launch_sh(tmp_path):
    environ = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], **NO_FP16_CPU}
    proc = subprocess.run([str(ROOT / "launch.sh"), "configs/cpu_demo.yaml", "ds_configs/zero2_fp16.json",
                           "--set", f"output.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=environ)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "launch.sh: error: ds_configs/zero2_fp16.json: 'fp16.enabled' is true, but this machine's DeepSpeed "
        "accelerator (cpu) cannot run fp16 (get_accelerator().is_fp16_supported() is None; every rank would stop "
        "in deepspeed.initialize); use a bf16 or fp32 config, e.g. ds_configs/zero2_bf16.json")
    assert proc.stdout == ""  # the runner never started
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("ds", ["ds_configs/zero2_bf16.json", "ds_configs/zero1_bf16_gas2.json"])
def test_bf16_passes_where_the_accelerator_has_it(tmp_path, ds):
    """The probe's log lines stay off stdout, which launch.sh reads as the master port."""
    proc = subprocess.run([sys.executable, "-m", "ds_face.launch.preflight", "configs/cpu_demo.yaml", ds,
                           "--port", "29500", "--", "--set", f"output.dir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **NO_FP16_CPU})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().isdigit()
