# make demo   set up (first time) and train the embedded default: 2 CPU ranks, ZeRO-2, Partial FC 0.1
# make test   set up (first time), lint and run the test suite (what CI runs)
# make test-fast   lint and the unit tests only (pytest -m "not slow": no ranks, launches or subprocesses), < 2 min
# make lint   ruff check . (the rules: pyproject.toml [tool.ruff])
# make test-multinode   real 2-host launches over ssh on this machine (needs sshd; pdsh for one control run)
# make gpu-check   on NVIDIA GPUs: the GPU path in one run (< 10 min on one GPU), reports/gpu-check-<hostname>.md
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo lint test test-fast multinode-tools test-multinode gpu-check bench-head bench-engine bench-data bench-memory bench-report clean

setup: $(VENV)/.installed

# torch first, pinned (on a GPU machine install the CUDA build of the same version first, then `make setup`);
# then ds_face itself, editable (the ds-face-* commands run this checkout), with the ONNX export and test extras;
# last, on a CPU machine, DeepSpeed's shared-memory op, compiled into $(VENV)/torch_extensions (ds_face/runtime/op_cache.py)
# so that no rank compiles it at its first launch (on a GPU machine it says there is nothing to build).
$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[onnx,test]"
	$(PY) -m ds_face.runtime.build_ops
	touch $@

demo: setup
	rm -rf work_dirs/cpu_demo  # the demo starts over; a real run refuses to overwrite its checkpoints
	./launch.sh configs/cpu_demo.yaml ds_configs/cpu_zero2_fp32.json

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint multinode-tools
	$(PY) -m pytest -q

# the lint and the unit tests: `slow` is set by tests/conftest.py on every test that starts processes (ranks,
# launches, subprocesses), docs/testing.md; the rest run in the pytest process
test-fast: setup lint
	$(PY) -m pytest -q -m "not slow"

# The two-host launch tests (tests/test_multinode.py) need sshd (pdsh: a control run of DeepSpeed's runner). Under CI (CI=true, as root, Debian
# packages reachable) they are installed here (2.3 MB, seconds); elsewhere, or if apt fails, those tests
# skip themselves and say why. Nothing is installed on a developer's machine.
multinode-tools:
	@if [ "$${CI:-}" = true ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	    && ! { command -v pdsh >/dev/null 2>&1 && { command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; }; }; then \
	    { timeout 120 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 120 \
	        apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null; } \
	    || echo "make: could not install openssh-server/pdsh; the two-host tests will be skipped" >&2; \
	fi

# the two-host launch tests: real launches over ssh to a private loopback sshd (train + checkpoint, a killed rank,
# hostile values arriving verbatim, a stop that ends one launch and not another) and the refusals (no sshd needed);
# needs: apt-get install -y openssh-server openssh-client (pdsh: only for the control run of DeepSpeed's own runner)
test-multinode: setup multinode-tools
	$(PY) -m pytest -q tests/test_multinode.py

# every check of tests/gpu on every visible GPU (NCCL, ZeRO 0/2/3 fp16/bf16, head, resume, export + ONNX, a launch,
# speed vs a plain PyTorch loop, bench report/memory), one report: reports/gpu-check-<hostname>.md; exit 1 if a
# check failed. Without a CUDA device it says so, lists the checks and exits 0. Options: GPU_CHECK_ARGS="--quick"
gpu-check: setup
	$(PY) -m tests.gpu.check $(GPU_CHECK_ARGS)

bench-head: setup
	deepspeed --num_gpus 2 --module ds_face.bench.head --classes 1000000 --embedding 512 --batch 64 --steps 5

bench-engine: setup
	deepspeed --num_gpus 2 --module ds_face.bench.engine_overhead --backbone r_tiny --classes 20000 --batch 32 --steps 20

# measured memory per rank (and samples/s): FC inside ZeRO 0-3 vs model parallel vs Partial FC; ~15 min on 2 cores.
# The figures go to the .json too: `python -m ds_face.bench.plots reports/memory-cpu-2ranks.json OUT.png` re-draws.
bench-memory: setup
	$(PY) -m ds_face.bench memory --backbone r_tiny --world-size 2 --micro-batch 32 --precision fp32 \
	    --classes 200000,500000,1000000 --device-memory 3GB --overhead-mb 0 --measure \
	    --plot reports/memory-cpu-2ranks.png --json reports/memory-cpu-2ranks.json

# a training-speed report for this machine (markdown + PNG) under reports/; ~3 min on 2 cores
bench-report: setup
	$(PY) -m ds_face.bench report --out reports/$$(hostname).md --overwrite

# conversion vs a plain read of the same 1 GB .rec, cold (page cache dropped: needs root, else it says so) and
# warm, 3 repetitions, plus the shard-count and thread-count sweeps; then the loader. ~2 min + the loader
bench-data: setup
	$(PY) -m data_prep.bench_convert --size-gb 1.0 --cold --repeat 3 --shard-sweep 4,16,64,960 --worker-sweep 1,2
	rm -rf /tmp/ds_face_bench_loader
	$(PY) -m data_prep.rec2arrow /tmp/ds_face_bench_convert/rec-1gb /tmp/ds_face_bench_loader
	$(PY) -m data_prep.bench_loader --rec-dir /tmp/ds_face_bench_convert/rec-1gb --arrow-dir /tmp/ds_face_bench_loader

clean:
	rm -rf work_dirs .pytest_cache
