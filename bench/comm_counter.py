"""Bytes a rank receives, counted around ``torch.distributed``'s collectives.

``install()`` must run before DeepSpeed is imported: DeepSpeed's comm layer looks its
all-gather and reduce-scatter functions up once. Each collective counts what one rank receives
on a ring, by kind:

- all-gathers: ``(world - 1) / world`` of the output; ``uint8`` ones are the 1-bit route's
  packed signs (``signs``), the others parameters (``params``);
- reduce-scatters: ``(world - 1) / world`` of the input (``grads``);
- all-reduces: ``2 (world - 1) / world`` of the tensor (``allreduce``).

A collective implemented by another (``all_gather_into_tensor`` calls ``all_gather_single``)
counts once, at the outermost call.
"""

from __future__ import annotations

import functools
import inspect
import threading

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

counts: dict[str, float] = dict.fromkeys(("params", "signs", "grads", "allreduce"), 0.0)
calls: dict[str, int] = dict.fromkeys(counts, 0)
_inside = threading.local()


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _first(tensors) -> torch.Tensor:
    return tensors if isinstance(tensors, torch.Tensor) else _first(tensors[0])


def _gathered(out, _):
    kind = "signs" if _first(out).dtype == torch.uint8 else "params"
    return kind, _nbytes(out)


def _scattered(_, inputs):
    return "grads", _nbytes(inputs)


def _reduced(tensor, _):
    return "allreduce", 2 * _nbytes(tensor)


# name -> how its first two arguments tell (kind, bytes times world / (world - 1))
_COLLECTIVES = {
    "all_gather_single": _gathered, "all_gather_into_tensor": _gathered,
    "_all_gather_base": _gathered, "all_gather": _gathered, "all_gather_coalesced": _gathered,
    "reduce_scatter_tensor": _scattered, "_reduce_scatter_base": _scattered,
    "reduce_scatter_single": _scattered, "reduce_scatter": _scattered,
    "all_reduce": _reduced, "all_reduce_coalesced": _reduced,
}


def _counting(fn, measure):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if getattr(_inside, "depth", 0):
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        kind, size = measure(*list(bound.arguments.values())[:2])
        world = dist.get_world_size(bound.arguments.get("group"))
        counts[kind] += size * (world - 1) / world
        calls[kind] += 1
        _inside.depth = 1
        try:
            return fn(*args, **kwargs)
        finally:
            _inside.depth = 0

    wrapped.counted = True
    return wrapped


def install() -> None:
    """Wrap the collectives in ``torch.distributed`` and its ``distributed_c10d``."""
    for name, measure in _COLLECTIVES.items():
        fn = getattr(c10d, name, None)
        if fn is None or getattr(fn, "counted", False):
            continue
        wrapped = _counting(fn, measure)
        setattr(c10d, name, wrapped)
        if getattr(dist, name, None) is fn:
            setattr(dist, name, wrapped)


def reset() -> None:
    for kind in counts:
        counts[kind], calls[kind] = 0.0, 0
