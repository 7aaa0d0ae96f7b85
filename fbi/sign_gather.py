"""ZeRO-3's 1-bit parameter route (``zero.gather_signs``): binarized layers all-gather the packed
signs of their latent weight's shards instead of the full-precision weight.

Under ZeRO-3 a layer's forward (and backward) normally all-gathers every parameter it owns. A
layer whose forward reads its latent weight only through ``sign(W)`` (``SIGN_ONLY``: FBI-LLM,
OneBit, fbi_w1a1) needs 1 bit per weight there, plus its own scales; the full-precision weight is
needed only by the optimizer that owns each shard. So, for such layers:

- DeepSpeed's per-module fetch hooks are taken off the layer, so its latent weight is never
  gathered; the layer's scales are persistent (DeepSpeed keeps them whole on every rank).
- Forward packs the signs of this rank's shard (``param.ds_tensor``, 8 per byte), all-gathers
  the bytes over the parameter's ZeRO group, unpacks them into a +-1 tensor and runs the
  scheme's own forward with it in place of the weight: its result is bitwise the plain route's,
  because the scheme takes ``sign`` of it again. Autograd saves that tensor for backward as
  the gathered bytes (1/16 of bf16), handed to an outer saved-tensor policy if one is active
  (activation checkpointing keeps nothing and its recomputation gathers again).
- Backward hands the scheme's gradient for the weight (full shape, as the plain route makes it)
  to the weight parameter, where DeepSpeed's own hook reduce-scatters it into the owner's
  shard: the optimizer, its state and checkpoints are untouched.

Autograd checks a gradient against the shape its input had in forward, and a partitioned
parameter is an empty tensor; so while the parameter takes part in autograd its ``data`` is a
zero-stride view of its full shape (no memory), and it is emptied again right after, as
DeepSpeed's ``free_param`` leaves it.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.distributed as dist

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import pack_signs, unpack_signs
from fbi.config import ConfigError


def install(engine) -> tuple[list[str], list[str]]:
    """Route every ZeRO-3-partitioned ``SIGN_ONLY`` layer of ``engine.module`` through its
    gathered signs. Returns the names of those, and of the layers whose weight DeepSpeed keeps
    persistent (whole on every rank, below ``zero.param_persistence_threshold``): they keep
    the plain route, which gathers nothing for them."""
    offload = engine.optimizer.parameter_offload
    routed, whole = [], []
    for name, layer in engine.module.named_modules():
        if not (isinstance(layer, DenseLinear) and layer.SIGN_ONLY):
            continue
        if layer.weight.ds_persist:
            whole.append(name)
            continue
        for scale in layer.SCALES:
            p = getattr(layer, scale)
            if not p.ds_persist:
                raise ConfigError(
                    f"zero.gather_signs: {name}.{scale} ({p.ds_numel} elements) is partitioned, "
                    "but the 1-bit route needs every scale whole on each rank; raise "
                    f"zero.param_persistence_threshold above {p.ds_numel}")
        _detach_deepspeed_hooks(layer, offload)
        route(layer)
        routed.append(name)
    return routed, whole


def _detach_deepspeed_hooks(layer: torch.nn.Module, offload) -> None:
    """Remove the forward/backward fetch hooks DeepSpeed put on ``layer`` (not its parents')."""
    own = {id(layer._forward_pre_hooks), id(layer._forward_hooks)}
    for handle in offload.forward_hooks + offload.backward_hooks:
        if id(handle.hooks_dict_ref()) in own:
            handle.remove()


def route(layer: DenseLinear) -> None:
    """Give a layer whose weight ZeRO-3 has partitioned (``ds_tensor``, ``ds_shape``, ...) the
    1-bit forward."""
    layer.forward = _GatheredForward(layer)


class _GatheredForward:
    """The layer's forward on the 1-bit route (bound to one layer as its ``forward``)."""

    def __init__(self, layer: DenseLinear) -> None:
        # Held here: reading ``layer.weight`` inside DeepSpeed's forward would gather it
        # (ZeRO-3's getter registers a partitioned parameter read there as its caller's).
        self.layer, self.weight = layer, layer.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, weight = self.layer, self.weight
        packed = gather_packed_signs(weight.ds_tensor, weight.ds_process_group)
        with _full_shaped(weight):
            signs = _SignsOf.apply(weight, signs_from_gathered(packed, weight))
        params = layer._parameters
        params["weight"] = signs  # the scheme's forward reads its weight here; sign(+-1) = +-1
        # The signs are saved as the gathered bytes, through whatever outer policy decides what
        # is kept (activation checkpointing drops all and recomputes; save_on_cpu offloads).
        # Weak references: autograd keeps the hooks as long as what they saved.
        kept, gathered = weakref.ref(signs), weakref.ref(packed)
        outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # torch 2.13
        outer_pack, outer_unpack = outer or (_same, _same)

        def pack(t: torch.Tensor):
            mine = t is kept()
            return mine, outer_pack(gathered() if mine else t)

        def unpack(saved):
            mine, inner = saved
            t = outer_unpack(inner)
            return signs_from_gathered(t, weight) if mine else t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                return type(layer).forward(layer, x)
        finally:
            params["weight"] = weight


def _same(t):
    return t


class _SignsOf(torch.autograd.Function):
    """Identity from the weight parameter to its gathered signs: the gradient the scheme
    computes for them (its straight-through estimate) becomes the weight's, full shape, which
    DeepSpeed's accumulate-grad hook then reduce-scatters."""

    @staticmethod
    def forward(ctx, weight: torch.nn.Parameter, signs: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        return signs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.weight
        weight.data = _zero_view(weight)
        # Emptied once the whole backward is done, after DeepSpeed's hook has taken the grad.
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _empty(weight))
        return grad, None


def gather_packed_signs(shard: torch.Tensor, group) -> torch.Tensor:
    """(world, bytes) uint8: every rank's shard's signs, 8 per byte (``packing.pack_signs``)."""
    mine = pack_signs(shard)
    out = torch.empty(dist.get_world_size(group) * mine.numel(), dtype=torch.uint8,
                      device=mine.device)
    dist.all_gather_single(out, mine, group=group)
    return out.view(-1, mine.numel())


def signs_from_gathered(packed: torch.Tensor, weight: torch.nn.Parameter) -> torch.Tensor:
    """+-1 in the weight's dtype and full shape, from ``gather_packed_signs``' bytes (each
    rank's shard padded to a whole byte, the last shard padded by ZeRO)."""
    world, shard = packed.shape[0], weight.ds_tensor.numel()
    signs = unpack_signs(packed, (world, packed.shape[1] * 8), weight.dtype)[:, :shard]
    return signs.reshape(-1)[: weight.ds_numel].view(weight.ds_shape)


@contextmanager
def _full_shaped(weight: torch.nn.Parameter):
    weight.data = _zero_view(weight)
    try:
        yield
    finally:
        _empty(weight)


def _zero_view(weight: torch.nn.Parameter) -> torch.Tensor:
    return torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.ds_shape)


def _empty(weight: torch.nn.Parameter) -> None:
    weight.data = torch.empty(0, dtype=weight.dtype, device=weight.device)
