"""The full backbone state of a live engine, for tests that compare runs (a resize must leave it unchanged)."""
import torch

from ds_face.checkpoint.zero_state import full_state, is_partitioned


def gathered_state(engine) -> dict:
    """Collective. The full backbone state at any ZeRO stage, on every rank, in ``full_state``'s form: for
    checks (a resize must leave it unchanged). Unpartitioned engines: read off the torch optimizer."""
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
