#!/usr/bin/env bash
# Launch ds_face training with DeepSpeed's runner.
#
#   ./launch.sh RUN.yaml DS.json [deepspeed runner options] [--set KEY=VALUE ...]
#
# Runner options pass straight to `deepspeed` (--hostfile, --include/--exclude, --num_nodes,
# --num_gpus, --master_addr, --master_port, --launcher, ...). `--set` overrides, `--resume` and
# `--init-backbone PATH` go to the trainer.
# Single node by default: all local GPUs, or NUM_RANKS (default 2) CPU ranks when there is no GPU.
# With --hostfile/-H: the hostfile is checked first (python -m ds_face.hostfile), and DS_FACE_*,
# HF_*, OMP_NUM_THREADS, GLOO_*/TORCH_* variables reach the other nodes through a merged .deepspeed_env.
# Before DeepSpeed starts anything, python -m ds_face.preflight checks both configs and output.dir; on a
# single node the master port (a busy --master_port stops the launch; a busy default 29500 is replaced
# by a free port, said on stderr); with a hostfile every value that DeepSpeed's pdsh runner would pass
# through the nodes' shell (refused unless it arrives verbatim). Without a GPU, DeepSpeed's shm op for CPU ranks
# is built first if `make setup` has not (python -m ds_face.build_ops --if-missing: milliseconds when built).
set -euo pipefail

usage() { sed -n '2,/^[^#]/{/^#/p;}' "$0"; }  # the comment block above
case ${1:-} in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then
    usage >&2
    exit 2
fi
run_config=$1 ds_config=$2
shift 2

runner=() trainer=() hostfile=
while [ $# -gt 0 ]; do
    case $1 in
        --set|--init-backbone) trainer+=("$1" "${2?$1 needs a value}"); shift 2 ;;
        --set=*|--init-backbone=*|--resume) trainer+=("$1"); shift ;;
        --hostfile|-H) hostfile=${2?$1 needs a file}; runner+=("$1" "$2"); shift 2 ;;
        --hostfile=*) hostfile=${1#--hostfile=}; runner+=("$1"); shift ;;
        *) runner+=("$1"); shift ;;
    esac
done

deepspeed_bin=$(command -v deepspeed) || { echo "launch.sh: error: 'deepspeed' not on PATH (activate the venv)" >&2; exit 2; }
python_bin=$(dirname "$deepspeed_bin")/python
[ -x "$python_bin" ] || python_bin=python3

# Without a GPU and without an explicit placement, start NUM_RANKS CPU ranks (gloo).
placement='--hostfile|-H|--include|-i|--exclude|-e|--num_gpus|--num_nodes'
if ! printf '%s\n' "${runner[@]+"${runner[@]}"}" | grep -Eq "^($placement)(=|$)" \
        && ! command -v nvidia-smi >/dev/null 2>&1; then
    runner+=(--num_gpus "${NUM_RANKS:-2}")
fi

preflight=("$python_bin" -m ds_face.preflight "$run_config" "$ds_config")

if [ -z "$hostfile" ]; then
    # Single node: configs, output.dir and the master port, in about a second.
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
    command -v nvidia-smi >/dev/null 2>&1 || "$python_bin" -m ds_face.build_ops --if-missing || exit 2
    exec "$deepspeed_bin" "${runner[@]}" --module ds_face.train \
        --config "$run_config" --deepspeed_config "$ds_config" "${trainer[@]+"${trainer[@]}"}"
fi

cmd=("$deepspeed_bin" "${runner[@]}" --module ds_face.train
     --config "$run_config" --deepspeed_config "$ds_config" "${trainer[@]+"${trainer[@]}"}")

# Multi-node: a bad hostfile fails here, before ssh/pdsh start anything.
"$python_bin" -m ds_face.hostfile "$hostfile" >/dev/null

# The runner exports to other nodes only NCCL*/PYTHON*/MV2*/UCX*/MLFLOW* variables and the lines of
# ~/.deepspeed_env then ./.deepspeed_env (file name: $DS_ENV_FILE). Merge those files (user's lines
# first, kept as they are) with what ds_face needs from this shell into one temporary file and
# point DS_ENV_FILE at it (an absolute name: the runner's os.path.join(dir, name) then reads only it).
forward=()
while IFS= read -r name; do
    value=${!name}
    case $value in *$'\n'*) echo "launch.sh: warning: not forwarding $name (multi-line value)" >&2; continue ;; esac
    forward+=("$name=$value")
done < <(compgen -e | grep -E '^(DS_FACE_[A-Z0-9_]*|HF_[A-Z0-9_]*|OMP_NUM_THREADS|GLOO_[A-Z0-9_]*|TORCH_NCCL_[A-Z0-9_]*|TORCH_DISTRIBUTED_DEBUG|TORCH_CPP_LOG_LEVEL)$' || true)

env_name=${DS_ENV_FILE:-.deepspeed_env}
case $env_name in /*) user_files=("$env_name") ;; *) user_files=("$HOME/$env_name" "$PWD/$env_name") ;; esac
# Every value DeepSpeed's runner will export, and every trainer argument, reaches every node's shell:
# refuse those that would not arrive verbatim (ds_face.preflight), before anything starts.
checks=(--remote)
for user_file in "${user_files[@]}"; do [ -f "$user_file" ] && checks+=(--env-file "$user_file"); done
for pair in "${forward[@]+"${forward[@]}"}"; do checks+=(--forward "${pair%%=*}"); done
"${preflight[@]}" "${checks[@]}" -- "${trainer[@]+"${trainer[@]}"}" || exit 2

if [ ${#forward[@]} -eq 0 ]; then
    exec "${cmd[@]}"
fi

env_file=$(mktemp "${TMPDIR:-/tmp}/ds_face_env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
{
    seen=
    for user_file in "${user_files[@]}"; do
        [ -f "$user_file" ] || continue
        real=$(realpath "$user_file")
        case " $seen " in *" $real "*) continue ;; esac
        seen="$seen $real"
        grep -Ev '^[[:space:]]*(#|$)' "$user_file" || true  # the runner's parser fails on blank lines
    done
    printf '%s\n' "${forward[@]}"
} > "$env_file"
export DS_ENV_FILE=$env_file

# Not exec: the trap removes the file afterwards; TERM/INT reach the runner (it stops the remote ranks).
"${cmd[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
set +e
wait "$child"; status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
exit $status
