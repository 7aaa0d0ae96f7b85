"""ZeRO-3's 1-bit parameter route (``zero.gather_signs``): binarized layers all-gather the packed
signs of their latent weight's shards instead of the full-precision weight.

Under ZeRO-3 a layer's forward (and backward) normally all-gathers every parameter it owns. A
layer whose forward reads its latent weight only through ``sign(W)`` (``SIGN_ONLY``: FBI-LLM,
OneBit, fbi_w1a1) needs 1 bit per weight there, plus its own scales; the full-precision weight is
needed only by the optimizer that owns each shard. So, for such layers:

- DeepSpeed's per-module fetch hooks are taken off the layer, so its latent weight is never
  gathered; the layer's scales are persistent (DeepSpeed keeps them whole on every rank).
- Forward takes the packed signs of every rank's shard (``param.ds_tensor``, 8 per byte) from
  the layer's bucket (fbi.sign_buckets: the routed layers of one block in one all-gather,
  prefetched a block ahead; inside a checkpointed block's recomputation, the bytes its forward
  gathered), unpacks them into a +-1 tensor and runs the scheme's own forward with it in
  place of the weight: its result is bitwise the plain route's, because the scheme takes
  ``sign`` of it again. Autograd saves that tensor for backward as the gathered bytes (1/16
  of bf16), handed to an outer saved-tensor policy if one is active (activation
  checkpointing drops them; save_on_cpu offloads them). Where saved-tensor hooks are disabled
  (``torch.autograd.graph.disable_saved_tensors_hooks``) autograd keeps the +-1 tensor
  itself, as large as the plain route's weight. Inside ``torch.func`` transforms the layer
  refuses to run, saying why.
- Backward hands the scheme's gradient for the weight (full shape, as the plain route makes it)
  to the weight parameter, where DeepSpeed's own hook reduce-scatters it into the owner's
  shard: the optimizer, its state and checkpoints are untouched.
- A weight that another module also holds (tied embeddings) stays on the plain route:
  DeepSpeed gathers it for the other module, and the route must not empty it meanwhile.

Autograd checks a gradient against the shape its input had in forward, and a partitioned
parameter is an empty tensor; so while the parameter takes part in autograd its ``data`` is a
zero-stride view of its full shape (no memory), and it is emptied again right after, as
DeepSpeed's ``free_param`` leaves it.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import unpack_signs
from fbi.config import ConfigError
from fbi.sign_buckets import Bucket, chain, new_pass, packed_signs


@dataclass
class Routes:
    """What ``install`` did: layers routed, in how many buckets; layers left on the plain
    route because DeepSpeed keeps their weight whole (nothing to gather), or because their
    weight is shared (name -> the other holders)."""

    routed: list[str] = field(default_factory=list)
    buckets: int = 0
    whole: list[str] = field(default_factory=list)
    shared: dict[str, list[str]] = field(default_factory=dict)


def install(engine, blocks) -> Routes:
    """Route every ZeRO-3-partitioned ``SIGN_ONLY`` layer of ``engine.module`` through its
    gathered signs, one bucket per module of ``blocks`` (the architecture's repeated blocks, in
    forward order)."""
    offload = engine.optimizer.parameter_offload
    holders = parameter_holders(engine.module)
    block_of = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    routes, members = Routes(), {}
    for name, layer in engine.module.named_modules():
        if not (isinstance(layer, DenseLinear) and layer.SIGN_ONLY):
            continue
        if layer.weight.ds_persist:
            routes.whole.append(name)
            continue
        others = [h for h in holders[id(layer.weight)] if h != f"{name}.weight".lstrip(".")]
        if others:
            routes.shared[name] = others
            continue
        for scale in layer.SCALES:
            p = getattr(layer, scale)
            if not p.ds_persist:
                raise ConfigError(
                    f"zero.gather_signs: {name}.{scale} ({p.ds_numel} elements) is partitioned, "
                    "but the 1-bit route needs every scale whole on each rank; raise "
                    f"zero.param_persistence_threshold above {p.ds_numel}")
        key = (block_of.get(id(layer), name), id(layer.weight.ds_process_group))
        members.setdefault(key, []).append(layer)
        routes.routed.append(name)
    buckets = chain([Bucket([layer.weight for layer in layers]) for layers in members.values()])
    for bucket, layers in zip(buckets, members.values()):
        for layer in layers:
            _detach_deepspeed_hooks(layer, offload)
            route(layer, bucket)
    engine.module.register_forward_pre_hook(new_pass(buckets))
    routes.buckets = len(buckets)
    return routes


def parameter_holders(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names under which modules of ``model`` hold it."""
    holders = defaultdict(list)
    for name, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is not None:
                holders[id(p)].append(f"{name}.{attr}" if name else attr)
    return holders


def _detach_deepspeed_hooks(layer: torch.nn.Module, offload) -> None:
    """Remove the forward/backward fetch hooks DeepSpeed put on ``layer`` (not its parents')."""
    own = {id(layer._forward_pre_hooks), id(layer._forward_hooks)}
    for handle in offload.forward_hooks + offload.backward_hooks:
        if id(handle.hooks_dict_ref()) in own:
            handle.remove()


def route(layer: DenseLinear, bucket: Bucket) -> None:
    """Give a layer whose weight ZeRO-3 has partitioned (``ds_tensor``, ``ds_shape``, ...) the
    1-bit forward, its signs gathered with ``bucket``."""
    layer.forward = _GatheredForward(layer, bucket)


class _GatheredForward:
    """The layer's forward on the 1-bit route (bound to one layer as its ``forward``)."""

    def __init__(self, layer: DenseLinear, bucket: Bucket) -> None:
        # Held here: reading ``layer.weight`` inside DeepSpeed's forward would gather it
        # (ZeRO-3's getter registers a partitioned parameter read there as its caller's).
        self.layer, self.weight, self.bucket = layer, layer.weight, bucket

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, weight = self.layer, self.weight
        if torch._C._functorch.maybe_current_level() is not None:
            raise RuntimeError(
                f"zero.gather_signs: {type(layer).__name__} on the 1-bit route cannot run inside "
                "a torch.func transform (grad, vmap, ...): its weight's gradient reaches the "
                "ZeRO-3 shard through autograd hooks that functorch does not run; set "
                "zero.gather_signs=false for this")
        packed = packed_signs(weight, self.bucket)
        with _full_shaped(weight):
            signs = _SignsOf.apply(weight, signs_from_gathered(packed, weight))
        params = layer._parameters
        params["weight"] = signs  # the scheme's forward reads its weight here; sign(+-1) = +-1
        try:
            if not torch._C._autograd._saved_tensors_hooks_is_enabled():
                # Hooks disabled: autograd keeps the +-1 tensor itself.
                return type(layer).forward(layer, x)
            with torch.autograd.graph.saved_tensors_hooks(*_saved_as_bytes(signs, packed, weight)):
                return type(layer).forward(layer, x)
        finally:
            params["weight"] = weight


def _saved_as_bytes(signs: torch.Tensor, packed: torch.Tensor, weight: torch.nn.Parameter):
    """Saved-tensor hooks that keep ``signs`` as the gathered ``packed`` bytes, through
    whatever outer policy decides what is kept (activation checkpointing drops all and
    recomputes; save_on_cpu offloads). Weak references: autograd keeps the hooks as long as
    what they saved."""
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

    return pack, unpack


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


def signs_from_gathered(packed: torch.Tensor, weight: torch.nn.Parameter) -> torch.Tensor:
    """+-1 in the weight's dtype and full shape, from ``Bucket.take``'s bytes (each
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
