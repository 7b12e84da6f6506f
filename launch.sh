#!/usr/bin/env bash
# Launch ds_face training with DeepSpeed's runner.
#
#   ./launch.sh RUN.yaml DS.json [deepspeed runner options] [--set KEY=VALUE ...]
#
# Runner options pass straight to `deepspeed` (--hostfile, --include/--exclude, --num_nodes,
# --num_gpus, --master_addr, --master_port, --launcher, ...). `--set` overrides, `--resume` and
# `--init-backbone PATH` go to the trainer.
# Single node by default: all local GPUs, or NUM_RANKS (default 2) CPU ranks when there is no GPU.
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,9p' "$0" >&2
    exit 2
fi
run_config=$1 ds_config=$2
shift 2

runner=() trainer=()
while [ $# -gt 0 ]; do
    case $1 in
        --set|--init-backbone) trainer+=("$1" "$2"); shift 2 ;;
        --set=*|--init-backbone=*|--resume) trainer+=("$1"); shift ;;
        *) runner+=("$1"); shift ;;
    esac
done

# Without a GPU and without an explicit placement, start NUM_RANKS CPU ranks (gloo).
placement='--hostfile|-H|--include|-i|--exclude|-e|--num_gpus|--num_nodes'
if ! printf '%s\n' "${runner[@]+"${runner[@]}"}" | grep -Eq "^($placement)(=|$)" \
        && ! command -v nvidia-smi >/dev/null 2>&1; then
    runner+=(--num_gpus "${NUM_RANKS:-2}")
fi

exec deepspeed "${runner[@]}" --module ds_face.train \
    --config "$run_config" --deepspeed_config "$ds_config" "${trainer[@]+"${trainer[@]}"}"
