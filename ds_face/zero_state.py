"""The backbone's optimizer state in a form that fits any world size: gathered at a save, re-partitioned at a
resume on another number of ranks.

DeepSpeed's own files hold each rank's *partition* of the flat fp32 master weights and optimizer state (ZeRO
1-3, and the bf16 optimizer at stage 0), which only a run of the same world size can load. Its converter to
a world-size-free "universal" checkpoint (``ds_to_universal``, 0.19.8) re-partitions Adam states only and
fails on SGD momentum. So at every save we gather, per named parameter, the full fp32 master weight and every
optimizer state tensor (SGD ``momentum_buffer``, AdamW ``exp_avg``/``exp_avg_sq``) with DeepSpeed's public
``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, plus the optimizer's step
count and the fp16 loss scaler; on a resize we write them back with ``safe_set_full_*``.

The unpartitioned engines (stage 0 in fp32 or fp16) need none of this: DeepSpeed's files are already the same
for every world size, and ``full_state`` returns None for them.
"""
from __future__ import annotations

import torch

LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def is_partitioned(engine) -> bool:
    """Whether the engine's fp32 master weights and optimizer state are split over the ranks."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in engine.module.parameters())


def owned_values(param) -> torch.Tensor:
    """The weights of ``param`` this rank holds. At ZeRO 3 that is its partition without the padding that
    makes the last rank's partition as long as the others (DeepSpeed allocates it with ``torch.empty`` and
    never writes it: it may hold any bits, NaN included)."""
    if not hasattr(param, "ds_tensor"):
        return param
    partition = param.ds_tensor.view(-1)
    rank = torch.distributed.get_rank(group=getattr(param, "ds_process_group", None))
    return partition.narrow(0, 0, _unpadded(partition.numel(), param.ds_numel, rank))


def _unpadded(partition_numel: int, full_numel: int, rank: int) -> int:
    """How many of rank ``rank``'s ZeRO-3 partition elements are real: the last partitions are padded so that
    every rank's is as long, when the world size does not divide the parameter's size."""
    return max(0, min(partition_numel, full_numel - partition_numel * rank))


def _flat_partitions(optimizer) -> list[torch.Tensor]:
    """The flat fp32 tensors whose torch-optimizer state holds this rank's partition (one per param group).
    ZeRO 1-2, ZeRO 3 and the bf16 optimizer name them differently."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if hasattr(optimizer, name):
            return list(getattr(optimizer, name))
    raise TypeError(f"{type(optimizer).__name__}: unknown DeepSpeed optimizer; cannot find its fp32 partitions")


def _state_keys(optimizer) -> tuple[list[str], torch.Tensor | None]:
    """Names of the per-element optimizer states (same shape as the partition) and the step count."""
    keys, step = set(), None
    for flat in _flat_partitions(optimizer):
        state = optimizer.optimizer.state.get(flat, {})
        keys |= {k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape}
        if "step" in state:
            step = torch.as_tensor(state["step"]).detach().clone().cpu()
    return sorted(keys), step


def _link_loaded_state(optimizer) -> None:
    """ZeRO 1-2 link each parameter to its slice of the optimizer state only at the first step; a state that
    DeepSpeed loaded from its own files is unlinked until then, and ``safe_get_full_optimizer_state`` fails on it.
    Link it now, but only when there is state to link: linking an empty one would stop the first step's."""
    if getattr(optimizer, "_hp_optimizer_states_linked", True):
        return
    if all(optimizer.optimizer.state.get(flat) for flat in _flat_partitions(optimizer)):
        optimizer._lazy_init_hp_params_optimizer_state()


def full_state(engine, keep: bool) -> dict | None:
    """Collective (every rank, same order). The gathered state, kept on ranks where ``keep`` (e.g. rank 0);
    None where not kept or the engine is not partitioned."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    if not is_partitioned(engine):
        return None
    optimizer = engine.optimizer
    _link_loaded_state(optimizer)
    keys, step = _state_keys(optimizer)
    params = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        entry = {"fp32": safe_get_full_fp32_param(param)}
        for key in keys:
            entry[key] = safe_get_full_optimizer_state(param, key)
        if keep:
            params[name] = {k: v.detach().cpu().clone() for k, v in entry.items()}
    if not keep:
        return None
    scaler = getattr(optimizer, "loss_scaler", None)
    return {"params": params, "state_keys": keys, "step": step,
            "loss_scaler": {f: getattr(scaler, f) for f in LOSS_SCALER_FIELDS if hasattr(scaler, f)},
            "zero_stage": engine.zero_optimization_stage()}


def load_full_state(engine, state: dict) -> None:
    """Collective. Put a ``full_state`` (saved on any world size) into this engine: fp32 master weights, the
    16-/32-bit module weights the ranks compute with, optimizer states, step count and loss scaler."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    optimizer = engine.optimizer
    named = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    missing = sorted(set(named) - set(state["params"]))
    if missing:
        raise KeyError(f"no saved optimizer state for parameter(s) {', '.join(missing[:3])}")
    # torch optimizers create their state at the first step; create it now so there is somewhere to write
    for flat in _flat_partitions(optimizer):
        slot = optimizer.optimizer.state[flat]
        for key in state["state_keys"]:
            slot.setdefault(key, torch.zeros_like(flat))
        if state["step"] is not None:
            slot["step"] = state["step"].clone().to(torch.as_tensor(slot.get("step", 0.0)).device)
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1-2, bf16: link the new tensors
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    _set_module_weights(engine, {name: state["params"][name]["fp32"] for name in named})
    for name, param in named.items():
        saved = state["params"][name]
        for key in [None, *state["state_keys"]]:
            value = saved["fp32" if key is None else key].to(engine.device)
            if hasattr(param, "ds_id") and param.ds_numel % torch.distributed.get_world_size():
                _set_zero3_partition(optimizer, param, value, key)
            elif key is None:
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, key)
    scaler = getattr(optimizer, "loss_scaler", None)
    for field, value in state["loss_scaler"].items():
        if scaler is not None and hasattr(scaler, field):
            setattr(scaler, field, value)


def _set_zero3_partition(optimizer, param, value: torch.Tensor, key: str | None) -> None:
    """What ``safe_set_full_*`` does at ZeRO 3, for a parameter whose size the world size does not divide:
    DeepSpeed 0.19.8 narrows the unpadded value past its end there (e.g. 8 elements over 3 ranks of 3)."""
    partition, _ = optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    rank = optimizer._get_param_partition_rank(param)
    count = _unpadded(partition.numel(), value.numel(), rank)
    with torch.no_grad():
        partition.zero_()
        partition.narrow(0, 0, count).copy_(value.flatten().narrow(0, partition.numel() * rank, count))


def _set_module_weights(engine, fp32: dict[str, torch.Tensor]) -> None:
    """The weights forward uses: the fp32 masters cast to the module's dtype, as after every optimizer step."""
    params = dict(engine.module.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO 3: gather, write on rank 0, re-partition
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                with torch.no_grad():
                    for name, value in fp32.items():
                        params[name].copy_(value.to(params[name].dtype))
        return
    with torch.no_grad():
        for name, value in fp32.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


def gathered_state(engine) -> dict:
    """Collective. The full backbone state at any ZeRO stage, on every rank, in ``full_state``'s form: for
    checks (a resize must leave it unchanged) and tools. Unpartitioned engines: read off the torch optimizer."""
    if is_partitioned(engine):
        return full_state(engine, keep=True)
    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):  # stage 0 fp16 keeps flat fp32 copies of its own
        raise TypeError(f"{type(optimizer).__name__}: gathering is not supported for this optimizer")
    params = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        state = optimizer.state.get(param, {})
        params[name] = {"fp32": param.detach().float().cpu().clone(),
                        **{k: v.detach().cpu().clone() for k, v in state.items()
                           if torch.is_tensor(v) and v.shape == param.shape}}
    return {"params": params, "state_keys": sorted({k for p in params.values() for k in p if k != "fp32"}),
            "loss_scaler": {}, "zero_stage": engine.zero_optimization_stage()}
