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
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,11p' "$0" >&2
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

cmd=("$deepspeed_bin" "${runner[@]}" --module ds_face.train
     --config "$run_config" --deepspeed_config "$ds_config" "${trainer[@]+"${trainer[@]}"}")

if [ -z "$hostfile" ]; then
    exec "${cmd[@]}"
fi

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

if [ ${#forward[@]} -eq 0 ]; then
    exec "${cmd[@]}"
fi

env_name=${DS_ENV_FILE:-.deepspeed_env}
env_file=$(mktemp "${TMPDIR:-/tmp}/ds_face_env.XXXXXX")
trap 'rm -f "$env_file"' EXIT
{
    seen=
    case $env_name in /*) user_files=("$env_name") ;; *) user_files=("$HOME/$env_name" "$PWD/$env_name") ;; esac
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
