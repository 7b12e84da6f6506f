#!/usr/bin/env bash
# Launch ds_face training with DeepSpeed's runner.
#
#   ./launch.sh RUN.yaml DS.json [deepspeed runner options] [--set KEY=VALUE ...]
#
# Runner options (DeepSpeed's spelling: --include/--exclude, --num_nodes, --num_gpus, --master_addr,
# --master_port, ...) go to `deepspeed` on a single node. `--set` overrides, `--resume` and
# `--init-backbone PATH` go to the trainer.
# Single node by default: all local GPUs, or NUM_RANKS (default 2) CPU ranks when there is no GPU.
# With --hostfile/-H: ds_face's own runner (python -m ds_face.launch.multinode: one ssh per host, every value
# quoted, host names/address/ports/variable names allow-listed, a stop ends only this launch; see its
# --help text in ds_face/launch/multinode.py); DS_FACE_*, HF_*, OMP_NUM_THREADS, GLOO_*/TORCH_* variables and
# ~/.deepspeed_env, ./.deepspeed_env reach every node.
# With --elastic MIN:MAX (and a hostfile): one torch elastic agent (torchrun) per host, rendezvous at the first
# host; the run shrinks to MIN nodes when one is lost and grows back to MAX when one joins (python -m
# ds_face.launch.elastic: its options --max-restarts, --rdzv-port, --rdzv-id, --ssh_port, --venv_script;
# docs/elastic.md).
# Before anything starts, python -m ds_face.launch.preflight checks both configs and output.dir; on a single node
# also the master port (a busy --master_port stops the launch; a busy default 29500 is replaced by a free
# port, said on stderr). Without a GPU, DeepSpeed's shm op for CPU ranks is built first if `make setup`
# has not (python -m ds_face.runtime.build_ops --if-missing: milliseconds when built).
set -euo pipefail

usage() { sed -n '2,/^[^#]/{/^#/p;}' "$0"; }  # the comment block above
case ${1:-} in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then
    usage >&2
    exit 2
fi
run_config=$1 ds_config=$2
shift 2

runner=() trainer=() hostfile= elastic=
while [ $# -gt 0 ]; do
    case $1 in
        --set|--init-backbone) trainer+=("$1" "${2?$1 needs a value}"); shift 2 ;;
        --set=*|--init-backbone=*|--resume) trainer+=("$1"); shift ;;
        --hostfile|-H) hostfile=given; runner+=("$1" "${2?$1 needs a file}"); shift 2 ;;
        --hostfile=*) hostfile=given; runner+=("$1"); shift ;;
        --elastic) elastic=given; runner+=("$1" "${2?$1 needs MIN:MAX}"); shift 2 ;;
        --elastic=*) elastic=given; runner+=("$1"); shift ;;
        *) runner+=("$1"); shift ;;
    esac
done

# DeepSpeed's runner reads /job/hostfile when no --hostfile is given: that is a multi-node launch too.
if [ -z "$hostfile" ] && [ -f /job/hostfile ]; then hostfile=given; runner+=(--hostfile /job/hostfile); fi

deepspeed_bin=$(command -v deepspeed) || { echo "launch.sh: error: 'deepspeed' not on PATH (activate the venv)" >&2; exit 2; }
python_bin=$(dirname "$deepspeed_bin")/python
[ -x "$python_bin" ] || python_bin=python3

# Without a GPU and without an explicit placement, start NUM_RANKS CPU ranks (gloo).
placement='--hostfile|-H|--include|-i|--exclude|-e|--num_gpus|--num_nodes'
if ! printf '%s\n' "${runner[@]+"${runner[@]}"}" | grep -Eq "^($placement)(=|$)" \
        && ! command -v nvidia-smi >/dev/null 2>&1; then
    runner+=(--num_gpus "${NUM_RANKS:-2}")
fi

preflight=("$python_bin" -m ds_face.launch.preflight "$run_config" "$ds_config")

if [ -n "$elastic" ]; then
    # Elastic: torch's elastic agent on every host of the hostfile (ds_face/launch/elastic.py), started over the
    # same quoted ssh path as the multi-node runner.
    [ -n "$hostfile" ] || { echo "launch.sh: error: --elastic needs --hostfile: the hosts an elastic run may use" >&2; exit 2; }
    "${preflight[@]}" --hostfile-launch -- "${trainer[@]+"${trainer[@]}"}" || exit 2
    exec "$python_bin" -m ds_face.launch.elastic "${runner[@]}" -- \
        --config "$run_config" --deepspeed_config "$ds_config" "${trainer[@]+"${trainer[@]}"}"
fi

if [ -z "$hostfile" ]; then
    # Single node: configs, output.dir and the master port, in about a second. DeepSpeed starts the ranks
    # here without a shell, except with --force_multi, which sends them through its pdsh runner.
    for arg in "${runner[@]+"${runner[@]}"}"; do
        [ "$arg" != --force_multi ] || { echo "launch.sh: error: --force_multi without --hostfile: name the hosts in a hostfile (ds_face's multi-node runner)" >&2; exit 2; }
    done
    master_port= port_given=
    for ((i = 0; i < ${#runner[@]}; i++)); do
        case ${runner[i]} in
            --master_port) master_port=${runner[i+1]:-}; port_given=1 ;;
            --master_port=*) master_port=${runner[i]#--master_port=}; port_given=1 ;;
        esac
    done
    case $master_port in ''|*[!0-9]*) [ -n "$port_given" ] && { echo "launch.sh: error: --master_port '$master_port' is not a port number" >&2; exit 2; } ;; esac
    port=$("${preflight[@]}" --port "${master_port:-29500}" ${port_given:+--port-given} \
           -- "${trainer[@]+"${trainer[@]}"}") || exit 2
    [ -n "$port_given" ] || [ "$port" = 29500 ] || runner+=(--master_port "$port")
    # No GPU: the CPU ranks load DeepSpeed's shm op. `make setup` built it into the venv; if it is missing (an
    # older venv, a pip install), build it here once, in one line, rather than silently inside the first rank.
    command -v nvidia-smi >/dev/null 2>&1 || "$python_bin" -m ds_face.runtime.build_ops --if-missing || exit 2
    exec "$deepspeed_bin" "${runner[@]}" --module ds_face.train \
        --config "$run_config" --deepspeed_config "$ds_config" "${trainer[@]+"${trainer[@]}"}"
fi

# Multi-node: ds_face's own runner (ds_face/launch/multinode.py), not DeepSpeed's pdsh runner. It quotes every value
# it sends to a node's shell and ties each node's ranks to its own life: a stop ends exactly this launch.
"${preflight[@]}" --hostfile-launch -- "${trainer[@]+"${trainer[@]}"}" || exit 2
exec "$python_bin" -m ds_face.launch.multinode "${runner[@]}" -- \
    --config "$run_config" --deepspeed_config "$ds_config" "${trainer[@]+"${trainer[@]}"}"
