"""Tensors read from a file, checked against what the reader expects before anything is allocated from them.

Two levels, both on the tensors as ``torch.load(mmap=True)`` returns them (sizes, strides, storages: nothing
is copied to check them):

* ``check_layout``, for every tensor of every torch file (``ds_face.checkpoint.safe_load.load_weights_only`` calls it): a
  plain CPU tensor whose elements are distinct stored elements of its storage. An expanded (stride-0) view, an
  overlapping view or one that runs past its storage is refused, so a tensor never stands for more memory than
  the file holds; all tensors of a file together may claim at most ``SHARED_VIEWS`` times the file's size
  (DeepSpeed's own files hold a few views of one flat buffer).
* ``check_state``, for weights loaded into a model (``--init-backbone``, eval, embed, IJB, export): exactly the
  model's keys and shapes, floating point where the model is (float32, or float16/bfloat16, which float32 holds
  exactly; float64, integer, bool and complex refused), the model's integer dtype for its integer buffers, every
  value finite, and with ``own_storage`` each tensor alone in a storage of exactly its own size (no sharing),
  so that the bytes read are the model's own size.

Every refusal is a ``TensorCheckError`` (a ValueError) whose one-line message names the file and the key.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping

import torch

SHARED_VIEWS = 2  # bytes all tensors of a file may claim, in multiples of the file's size
# what a float32 model's weights may be stored as: float32 or a 16-bit type it holds exactly
FLOAT_STORED = (torch.float32, torch.float16, torch.bfloat16)
SHOW = 5  # keys listed per kind of mismatch


class TensorCheckError(ValueError):
    """A tensor that is not what the reader expects; the message names the file and the key."""


def tensors_in(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(where, tensor) for every tensor in ``obj``'s dicts, lists, tuples, sets and object attributes, each
    container visited once (a pickle may nest deeply, share one list many times, or hold itself)."""
    pending, seen = [(where, obj)], set()
    while pending:
        where, obj = pending.pop()
        if isinstance(obj, torch.Tensor):
            yield where or "(the file itself)", obj
            continue
        if id(obj) in seen:
            continue
        if isinstance(obj, Mapping):
            seen.add(id(obj))
            pending.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(list(obj.items())))
        elif isinstance(obj, (list, tuple, set, frozenset)):
            seen.add(id(obj))
            pending.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(obj))))
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):  # DeepSpeed's loss scaler & co.
            seen.add(id(obj))
            pending.append((where, vars(obj)))


def _overlaps(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` reach one stored element (an expanded view: stride 0; or overlapping
    strides). In stride order, each stride must pass everything the smaller dimensions reach."""
    reach = 0
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def layout_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` is not a plain CPU tensor of distinct elements within its storage (None when it is)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"a {type(t).__name__}, not a plain tensor"
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        return f"a {t.layout} {'quantized ' if t.is_quantized else ''}tensor, not a dense one"
    if t.device.type != "cpu":
        return f"a tensor on device {t.device}, not stored data"
    if t.numel() == 0:
        return None
    if any(stride < 0 for stride in t.stride()):
        return f"a view with a negative stride {list(t.stride())}"
    if _overlaps(t):
        return (f"an expanded or overlapping view (shape {list(t.shape)}, strides {list(t.stride())}: "
                f"{t.numel()} elements from fewer stored ones)")
    end = (t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()
    if t.storage_offset() < 0 or end > t.untyped_storage().nbytes():
        return (f"a view past its storage ({end} bytes claimed from a storage of "
                f"{t.untyped_storage().nbytes()})")
    return None


def check_layout(obj: Any, path: str | os.PathLike, file_size: int) -> None:
    """Every tensor in ``obj`` (loaded from ``path``): plain, dense, within its storage; together they claim at
    most ``SHARED_VIEWS`` x ``file_size`` bytes."""
    claimed = 0
    for where, t in tensors_in(obj):
        problem = layout_problem(t)
        if problem:
            raise TensorCheckError(f"{path}: {where} is {problem}; refused before anything is allocated from it")
        claimed += t.numel() * t.element_size()
    if claimed > SHARED_VIEWS * max(file_size, 0):
        raise TensorCheckError(f"{path}: its tensors claim {claimed} bytes, more than {SHARED_VIEWS}x the "
                               f"file's {file_size} bytes (views sharing storage); refused")


def _mismatch(state: Mapping, expected: Mapping) -> list[str]:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
              for k in expected if k in state and isinstance(state[k], torch.Tensor)
              and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... and {len(items) - SHOW} more" if len(items) > SHOW else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:SHOW])}{more}")
    return parts


def _name(dtype: torch.dtype) -> str:
    return str(dtype)[len("torch."):]


def dtype_problem(got: torch.dtype, want: torch.dtype) -> str | None:
    """Why a tensor of dtype ``got`` cannot fill one of ``want`` (None when it can): a float32 model takes
    float32, float16 or bfloat16 (upcast exactly); any other dtype must be the model's own."""
    allowed = FLOAT_STORED if want == torch.float32 else (want,)
    if got in allowed:
        return None
    names = [_name(d) for d in allowed]
    expected = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    return f"dtype {_name(got)}, expected {expected} (the model's is {_name(want)})"


def check_state(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor], path: str | os.PathLike,
                what: str = "the model", hint: Callable[[], str] | None = None, own_storage: bool = True) -> None:
    """``state`` holds exactly ``expected``'s keys (a state_dict, on any device: meta costs nothing) with its
    shapes and dtypes (``dtype_problem``), no tensor overlapping itself (``layout_problem``), every floating value
    finite; with ``own_storage``, each tensor in a storage of exactly its own bytes, shared with no other.
    Checked in that order: the finite check is the first to read values. Raises TensorCheckError.
    ``hint()``: a sentence added to a key/shape mismatch (what the file looks like)."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TensorCheckError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    parts = _mismatch(state, expected)
    if parts:
        raise TensorCheckError(f"{path} does not fit {what}: " + "; ".join(parts) + (f". {hint()}" if hint else ""))
    storages: dict[int, str] = {}
    for key, want in expected.items():
        t = state[key]
        problem = dtype_problem(t.dtype, want.dtype) or layout_problem(t)
        if not problem and own_storage and t.numel():
            storage = t.untyped_storage()
            if t.storage_offset() or storage.nbytes() != t.numel() * t.element_size():
                problem = (f"a view into a storage of {storage.nbytes()} bytes, not a tensor of its own "
                           f"({t.numel() * t.element_size()} bytes)")
            elif storage.data_ptr() in storages:
                problem = f"stored in the same storage as {storages[storage.data_ptr()]}"
            storages[storage.data_ptr()] = key
        if problem:
            raise TensorCheckError(f"{path}: {key} is {problem}; {what} cannot use it")
    for key, t in state.items():  # values last: everything above reads no tensor data
        if t.is_floating_point() and t.numel():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                first = t.reshape(-1)[int((~finite).reshape(-1).nonzero()[0])].item()
                raise TensorCheckError(f"{path}: {key} holds {bad} non-finite value(s) (first: {first}); "
                                       f"{what} needs finite weights")
        if key.endswith("running_var") and t.numel() and bool((t < 0).any()):
            raise TensorCheckError(f"{path}: {key} holds a negative variance ({t.min().item()}); "
                                   f"a BatchNorm variance is >= 0")
