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


OPTIMIZER_STATE_KEYS = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq")}  # per-element states
FULL_STATE_KEYS = ("params", "state_keys", "step", "loss_scaler", "zero_stage", "engine_counters")


def check_full_state(state, engine, optimizer: str) -> None:
    """A ``full_state`` read back from a file (memory-mapped), checked against this engine before anything is
    allocated from it: exactly its trainable parameters' names, each holding exactly ``fp32`` and the
    ``optimizer``'s states, every tensor float32 of the parameter's shape, a plain tensor within its storage (no
    expanded stride-0 view, no storage shared with another entry), finite; so its size is bounded by the model's
    by construction. (A file listing 20,001 parameters once drove a resize past 4 GB.) Counters and the loss
    scaler are range-checked by ``ds_face.checkpoint.files.check_states``. Raises ValueError saying what is wrong."""
    if not isinstance(state, dict):
        raise ValueError(f"not a full optimizer state (a {type(state).__name__}, not a dict)")
    unknown = sorted(str(k) for k in state if k not in FULL_STATE_KEYS)
    params = state.get("params")
    if unknown or not isinstance(params, dict):
        raise ValueError(f"corrupt: expected the entries {', '.join(FULL_STATE_KEYS)}"
                         + (f"; unexpected {', '.join(unknown[:5])}" if unknown else "; no 'params'"))
    expected = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in engine.module.named_parameters()
                if p.requires_grad}
    if params.keys() != expected.keys():
        missing = sorted(set(expected) - set(params))
        extra = sorted(str(k) for k in set(params) - set(expected))
        raise ValueError(f"holds state for {len(params)} parameters, this backbone trains {len(expected)} (missing: "
                         f"{', '.join(missing[:3]) or 'none'}; not in this backbone: {', '.join(extra[:3]) or 'none'})")
    allowed = OPTIMIZER_STATE_KEYS.get(optimizer, ())
    keys = state.get("state_keys")
    if not (isinstance(keys, list) and set(keys) <= set(allowed) and len(set(keys)) == len(keys)):
        raise ValueError(f"'state_keys' is {keys!r}; the {optimizer} optimizer keeps {list(allowed)}")
    tensors, storages = [], set()
    for name, shape in expected.items():
        entry = params[name]
        if not isinstance(entry, dict) or set(entry) != {"fp32", *keys}:
            got = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"'params.{name}' must hold exactly {['fp32', *keys]}, got {got}")
        for key in ("fp32", *keys):
            tensor, where = entry[key], f"'params.{name}.{key}'"
            if not torch.is_tensor(tensor) or tensor.dtype != torch.float32 or tuple(tensor.shape) != shape:
                got = f"{tensor.dtype} {list(tensor.shape)}" if torch.is_tensor(tensor) else type(tensor).__name__
                raise ValueError(f"{where} must be a float32 tensor of shape {list(shape)}, got {got}")
            check_plain(tensor, where, storages)
            tensors.append((where, tensor))
    for where, tensor in tensors:  # only now are the values read: their size is the model's
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where} holds NaN or inf")
    step = state.get("step")
    if step is not None and not (torch.is_tensor(step) and step.numel() == 1):
        raise ValueError(f"'step' must be one number (or None), got {type(step).__name__}")
    scaler = state.get("loss_scaler", {})
    if not isinstance(scaler, dict) or not set(scaler) <= set(LOSS_SCALER_FIELDS):
        raise ValueError(f"'loss_scaler' must hold only {', '.join(LOSS_SCALER_FIELDS)}")
    if state.get("zero_stage") not in (0, 1, 2, 3, None) or isinstance(state.get("zero_stage"), bool):
        raise ValueError(f"'zero_stage' is {state.get('zero_stage')!r}")
    counters = state.get("engine_counters", {})
    if not isinstance(counters, dict) or not all(isinstance(k, str) for k in counters):
        raise ValueError("'engine_counters' must be a dict of counters")


def check_plain(tensor: torch.Tensor, where: str, storages: set) -> None:
    """A plain tensor within its storage (``ds_face.checkpoint.tensor_checks.layout_problem``: no expanded stride-0 or
    overlapping view, which would claim more elements than the file holds) that shares its storage with no other
    tensor in ``storages`` (data pointers seen so far; this one is added). Raises ValueError naming ``where``."""
    from ds_face.checkpoint.tensor_checks import layout_problem
    problem = layout_problem(tensor)
    if problem:
        raise ValueError(f"{where} is {problem}")
    storage = tensor.untyped_storage()
    if tensor.numel() and storage.data_ptr() in storages:
        raise ValueError(f"{where} shares its storage with another tensor of the file")
    storages.add(storage.data_ptr())


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
