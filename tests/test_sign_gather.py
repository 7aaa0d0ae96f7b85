"""ZeRO-3's 1-bit parameter route (``zero.gather_signs``, fbi.sign_gather, fbi.sign_buckets):
unpacking gathered shards; one routed layer against the plain one, what it keeps for backward,
a checkpoint's recomputation reusing the gathered bytes, saved-tensor hooks disabled;
coalesced and prefetched bucket gathers; shared weights found; through
train.py on 2 and 3 gloo processes, bit for bit the losses, gradient norms and validation of
the plain route, which all-gathers the latent weights, and checkpoints that move between the
routes; what the route moves, counted by bench/zero3_traffic.py; partitioned scales refused
(the config's refusals are in tests/test_config.py)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import weakref
import re
import shutil

import pytest
import torch
import torch.distributed as dist

from fbi import sign_buckets, sign_gather
from fbi.binarize import SCHEMES, scheme_config
from fbi.binarize.packing import pack_signs, sign
from fbi.configure import compose
from fbi.models import build_model
from fbi_testing import REPO, run_ranks, run_train


# Weights of 2,048+ elements are partitioned, the scales (64-128 elements) stay whole.
ROUTE = ["zero=stage3", "zero.param_persistence_threshold=1000"]
MAMBA = ["experiment=bimamba_demo", "model.n_layers=2", "model.d_model=64", "model.d_state=16",
         "model.head_dim=16", "model.chunk_size=8"]


def metrics(run_dir) -> list[dict]:
    """The training and validation rows of metrics.jsonl: step, losses, gradient norm."""
    keep = ("step", "loss", "grad_norm", "val_ppl_student")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keep if k in r} for r in rows if "loss" in r or "val_ppl_student" in r]


@pytest.mark.parametrize("world,shape", [(3, (5, 7)), (2, (16, 8)), (4, (3, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacking_gathered_shards_gives_the_signs_of_the_whole_weight(world, shape, dtype):
    """ZeRO-3 splits the flat weight into ``ceil(n / world)``-element shards, the last one
    padded; each is packed to whole bytes on its own rank. Unpacking the gathered bytes must
    give sign(W) (zeros and -0.0 included) in the weight's dtype and shape."""
    w = torch.randn(shape).to(dtype)
    w.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-30])
    n = w.numel()
    part = -(-n // world)
    flat = torch.nn.functional.pad(w.reshape(-1), (0, part * world - n), value=-1.0)
    packed = torch.stack([pack_signs(flat[r * part:(r + 1) * part]) for r in range(world)])
    param = torch.nn.Parameter(torch.empty(0, dtype=dtype))
    param.ds_tensor, param.ds_numel, param.ds_shape = flat[:part], n, w.shape
    signs = sign_gather.signs_from_gathered(packed, param)
    assert signs.dtype == dtype and signs.shape == w.shape
    assert torch.equal(signs, sign(w))


@pytest.fixture(scope="module")
def one_rank():
    """A real gloo process group of one rank: what the buckets all-gather over here."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def partitioned(*layers):
    """``layers`` as ZeRO-3 leaves them on one rank (each weight an empty tensor, the values in
    ``ds_tensor``), on the 1-bit route, in one bucket."""
    for layer in layers:
        w = layer.weight
        w.ds_tensor, w.ds_numel, w.ds_shape = w.detach().reshape(-1).clone(), w.numel(), w.shape
        w.ds_process_group = None
        w.data = torch.empty(0, dtype=w.dtype)
    bucket = sign_buckets.Bucket([layer.weight for layer in layers])
    for layer in layers:
        sign_gather.route(layer, bucket)
    return layers[0] if len(layers) == 1 else layers


def run_and_grads(layer, x, dtype):
    """Output, input gradient and parameter gradients of ``layer`` on ``x``."""
    xr = x.clone().requires_grad_()
    y = layer(xr)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=dtype)).view_as(y))
    return [y, xr.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("scheme", sorted(n for n, layer in SCHEMES.items() if layer.SIGN_ONLY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hooks", ["enabled", "disabled"])
def test_a_routed_layer_computes_the_plain_layer_bitwise(one_rank, scheme, dtype, hooks):
    """Output, and the gradients of the input, the scales and the latent weight (handed to the
    weight parameter in its full shape, which is empty again after backward); also where
    saved-tensor hooks are disabled (as inside torch.func transforms), where the route cannot
    keep the signs as bytes and keeps the +-1 tensor."""
    torch.manual_seed(0)
    plain = SCHEMES[scheme](64, 24, cfg=scheme_config(scheme)).to(dtype)
    routed = partitioned(copy.deepcopy(plain))
    x = torch.randn(3, 5, 64, dtype=dtype)
    expected = run_and_grads(plain, x, dtype)
    with (torch.autograd.graph.disable_saved_tensors_hooks("disabled by the test")
          if hooks == "disabled" else contextlib.nullcontext()):
        got = run_and_grads(routed, x, dtype)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert routed.weight.shape == (0,) and routed.weight.grad.shape == (24, 64)


def test_the_route_runs_on_a_torch_without_all_gather_single(one_rank, monkeypatch):
    """torch 2.11 and 2.12 name the collective all_gather_into_tensor only: the route falls
    back to it and computes the plain layer bitwise."""
    monkeypatch.delattr(dist, "all_gather_single", raising=False)
    torch.manual_seed(0)
    plain = SCHEMES["fbi"](64, 24, cfg=scheme_config("fbi"))
    routed = partitioned(copy.deepcopy(plain))
    x = torch.randn(3, 5, 64)
    for a, b in zip(run_and_grads(plain, x, torch.float32), run_and_grads(routed, x, torch.float32)):
        assert torch.equal(a, b)


def test_a_routed_layer_refuses_torch_func_transforms(one_rank):
    """functorch runs neither the autograd hooks that take the weight's gradient to its shard
    nor the scheme's straight-through Function: a clear refusal, not an internal assert."""
    layer = partitioned(SCHEMES["fbi"](16, 8, cfg=scheme_config("fbi")))
    with pytest.raises(RuntimeError, match="zero.gather_signs: FBILinear on the 1-bit route "
                                           "cannot run inside a torch.func transform"):
        torch.func.grad(lambda x: layer(x).sum())(torch.randn(2, 16))


class Gathers:
    """The all-gathers issued, and weak references to the bytes layers took."""

    def __init__(self, monkeypatch):
        self.calls, self.taken = 0, []
        real_gather, real_take = dist.all_gather_single, sign_buckets.Bucket.take

        def gather(*args, **kwargs):
            self.calls += 1
            return real_gather(*args, **kwargs)

        def take(bucket, weight):
            packed = real_take(bucket, weight)
            self.taken.append(weakref.ref(packed))
            return packed

        monkeypatch.setattr(dist, "all_gather_single", gather)
        monkeypatch.setattr(sign_buckets.Bucket, "take", take)


@pytest.mark.parametrize("scheme", sorted(n for n, layer in SCHEMES.items() if layer.SIGN_ONLY))
def test_the_signs_are_kept_packed_and_a_checkpoint_recomputes_with_them(one_rank, monkeypatch,
                                                                          scheme):
    """Between forward and backward the route keeps the gathered bytes, not the +-1 tensor
    the scheme read. Inside a block checkpointed with ``checkpoint_contexts`` the checkpoint
    keeps the block's input alone, its tape the bytes; the recomputation takes them from the
    tape, gathering nothing; gradients equal an uncheckpointed run's. A checkpoint without the
    contexts keeps nothing and gathers again."""
    torch.manual_seed(0)
    layer = partitioned(SCHEMES[scheme](64, 24, cfg=scheme_config(scheme)))
    read = []  # weak references to the +-1 tensors the scheme read
    real_signs = sign_gather._SignsOf

    class Tracked:
        @staticmethod
        def apply(weight, signs):
            out = real_signs.apply(weight, signs)
            read.append(weakref.ref(out))
            return out

    monkeypatch.setattr(sign_gather, "_SignsOf", Tracked)
    gathers = Gathers(monkeypatch)
    x = torch.randn(4, 64)
    y = layer(x)
    assert read[0]() is None and gathers.taken[0]() is not None  # only the bytes survive
    y.sum().backward()
    expected = layer.weight.grad.clone()

    for contexts, calls in ((sign_buckets.checkpoint_contexts, 1),
                            (torch.utils.checkpoint.noop_context_fn, 2)):
        layer.weight.grad, inputs = None, []
        gathers.calls, gathers.taken, read[:] = 0, [], []

        def block(x):
            h = x * 1.0
            inputs.append(weakref.ref(h))
            return layer(h)

        y = torch.utils.checkpoint.checkpoint(block, x.clone().requires_grad_(),
                                              use_reentrant=False, context_fn=contexts)
        assert inputs[0]() is None and read[0]() is None
        assert (gathers.taken[0]() is not None) == (calls == 1)  # on the tape
        y.sum().backward()
        assert gathers.calls == calls
        assert torch.equal(layer.weight.grad, expected)


def test_a_bucket_gathers_its_layers_at_once_and_prefetches_the_next(one_rank, monkeypatch):
    """Three layers in two buckets: the first layer's use gathers its whole bucket and issues
    the next bucket's gather; a new pass drops what the last one left (the weights may have
    changed), so it gathers again; outputs equal the plain layers'."""
    torch.manual_seed(0)
    plain = [SCHEMES["fbi"](32, 16, cfg=scheme_config("fbi")) for _ in range(3)]
    routed = [copy.deepcopy(layer) for layer in plain]
    for layer in routed:
        w = layer.weight
        w.ds_tensor, w.ds_numel, w.ds_shape = w.detach().reshape(-1).clone(), w.numel(), w.shape
        w.ds_process_group, w.data = None, torch.empty(0)
    first, second = sign_buckets.chain([sign_buckets.Bucket([routed[0].weight, routed[1].weight]),
                                        sign_buckets.Bucket([routed[2].weight])])
    for layer, bucket in zip(routed, (first, first, second)):
        sign_gather.route(layer, bucket)
    gathers = Gathers(monkeypatch)
    x = torch.randn(2, 32)
    new_pass = sign_buckets.new_pass([first, second])
    for _ in range(2):
        new_pass()
        assert gathers.calls % 2 == 1  # the first bucket, issued ahead
        outs = [layer(x) for layer in routed]
        assert gathers.calls % 2 == 0 and second._pending is None
        assert all(torch.equal(a, b(x)) for a, b in zip(outs, plain))
    assert gathers.calls == 4


def test_shared_weights_are_found():
    """A tied head shares the embedding's weight: both holders named."""
    cfg = compose(["experiment=demo", "model.n_layers=1", "model.vocab_size=64",
                   "model.tie_embeddings=true"])
    model = build_model(cfg.model, cfg.scheme)
    shared = [h for h in sign_gather.parameter_holders(model).values() if len(h) > 1]
    assert shared == [["model.embed_tokens.weight", "lm_head.weight"]]


@pytest.mark.parametrize("scheme,precision,extra,resume,nproc", [
    ("fbi", "bf16", ["micro_batch_size=2"], True, 2),  # 2 micro-batches per step: accumulation
    # the recomputation takes the tape's bytes; 3 ranks: shards of 1,366 elements, neither whole
    # bytes nor even
    ("onebit_fold", "fp32", ["zero.activation_checkpointing=true", "global_batch_size=6",
                        "micro_batch_size=2"], False, 3),
    ("fbi", "fp32", MAMBA, False, 2),  # Bi-Mamba: in_proj and out_proj binarized
])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_signs_route_equals_latent_route_bitwise(tmp_path, tiny_run, scheme, precision, extra,
                                                 resume, nproc):
    """4 steps, a checkpoint and validation at step 2 and 4: the routes agree exactly. With
    ``resume``, a run on the 1-bit route resuming the plain route's step-2 checkpoint also
    continues it exactly (a checkpoint is the same on both routes)."""
    if extra == MAMBA:  # tiny_run's widths are the transformer's
        tiny_run = [a for a in tiny_run if not a.startswith("model.")]
    args = tiny_run + ROUTE + [f"scheme={scheme}", f"precision={precision}", "max_steps=4",
                               "checkpoint_every=2", "eval_every=2", *extra]
    plain, signs, mixed = tmp_path / "plain", tmp_path / "signs", tmp_path / "mixed"
    run_train(args + [f"run_dir={plain}", "zero.gather_signs=false"], nproc=nproc)
    proc = run_train(args + [f"run_dir={signs}", "zero.gather_signs=true"], nproc=nproc)
    # 2 blocks x 7 linears (transformer) or x 2 (Mamba); embedding and head stay dense
    layers = 4 if extra == MAMBA else 14
    assert (f"{layers} binarized layers all-gather packed signs instead of their latent "
            f"weights, in 2 gathers per forward; 0 have weights below") in proc.stderr
    reference = metrics(plain)
    assert len(reference) >= 6 and sum("val_ppl_student" in r for r in reference) == 2
    assert metrics(signs) == reference  # exact float equality, every row
    if not resume:
        return
    shutil.copytree(plain, mixed)
    shutil.rmtree(mixed / "checkpoints" / "step_00000004")
    proc = run_train(args + [f"run_dir={mixed}", "zero.gather_signs=true"], nproc=2)
    assert "resumed from" in proc.stderr
    after = [r for r in reference if r["step"] > 2]
    assert metrics(mixed)[-len(after):] == after


@pytest.mark.slow
@pytest.mark.multiprocess
def test_traffic_bench_counts_one_sixteenth_with_activation_checkpointing():
    """bench/zero3_traffic.py on the tiny model (4 blocks) with every block recomputed in
    backward, bytes counted around torch.distributed: on the 1-bit route DeepSpeed gathers none
    of the binarized latent weights; their signs are at most 0.07 of what the plain route
    gathers of them, because the recomputation reuses the forward's bytes; one gather per
    block; the scales and the gradients move as before, and the losses are bitwise equal."""
    proc = run_ranks(
        [str(REPO / "bench" / "zero3_traffic.py"), "--model", "fbi_tiny", "--vocab", "512",
         "--seq-len", "32", "--steps", "2", "--persistence", "1000", "--checkpointing"],
        timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    row = r" ([\d.]+) MiB \|" * 7 + r" \d+ \+ (\d+) signs"
    latent, signs = (
        [float(v) for v in re.search(rf"\| {route} \|{row}", proc.stdout).groups()]
        for route in ("latent", "signs"))
    assert latent[3] == 0 and signs[1] == 0  # no signs on one route, no latent weights on the other
    assert latent[1] > 1 and 0 < signs[3] <= 0.07 * latent[1]
    assert signs[7] == 4  # one coalesced gather per block and step
    assert signs[2] == latent[2] > 0  # the scales: whole on every rank, refreshed after each step
    assert signs[4] == latent[4] > 0  # the gradients' reduce-scatter
    assert "losses bitwise equal over 2 steps: yes" in proc.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_shared_weight_keeps_the_plain_route(tmp_path, tiny_run):
    """A binarized head tied to the (dense) embedding: its weight stays on the plain route,
    with a warning naming both holders; the run equals the plain route's bit for bit."""
    args = tiny_run + ROUTE + ["model.tie_embeddings=true", "scheme.binarize=[model.layers.*,lm_head]",
                               "max_steps=2", "eval_every=2"]
    run_train(args + [f"run_dir={tmp_path / 'plain'}", "zero.gather_signs=false"], nproc=2)
    proc = run_train(args + [f"run_dir={tmp_path / 'signs'}", "zero.gather_signs=true"], nproc=2)
    assert ("zero.gather_signs: lm_head keeps the plain route: its weight is shared with "
            "model.embed_tokens.weight") in proc.stderr
    assert "14 binarized layers all-gather packed signs" in proc.stderr
    assert metrics(tmp_path / "signs") == metrics(tmp_path / "plain")


@pytest.mark.slow
def test_partitioned_scales_are_refused(tmp_path, tiny_run):
    """A persistence threshold below the scales' size would partition them: refused, naming
    the field and the threshold that fixes it, before the first step."""
    proc = run_train(tiny_run + ["zero=stage3", "zero.gather_signs=true", "max_steps=2",
                                 "zero.param_persistence_threshold=10", f"run_dir={tmp_path}"],
                     check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"zero.gather_signs: model\.layers\.0\.\S+\.alpha \(\d+ elements\) is "
                     r"partitioned.*raise zero.param_persistence_threshold above \d+", proc.stderr)
    assert "Traceback" not in proc.stderr and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_weights_kept_whole_leave_nothing_to_gather_and_say_so(tmp_path, tiny_run):
    """At DeepSpeed's default threshold (100,000 elements) the tiny model's weights are all
    kept whole on every rank: the run trains on the plain route and warns that the 1-bit
    route has nothing to do."""
    proc = run_train(tiny_run + ["zero=stage3", "zero.gather_signs=true", "max_steps=1",
                                 "eval_batches=0", f"run_dir={tmp_path}"])
    assert re.search(r"WARNING fbi: zero.gather_signs: 0 binarized layers .*; 14 have weights "
                     r"below zero.param_persistence_threshold=100000", proc.stderr)
    assert (tmp_path / "metrics.jsonl").exists()
