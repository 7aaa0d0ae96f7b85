"""ZeRO-3's 1-bit parameter route (``zero.gather_signs``, fbi.sign_gather): unpacking gathered
shards; one routed layer against the plain one, and what it keeps for backward; through
train.py on 2 and 3 gloo processes, bit for bit the losses, gradient norms and validation of
the plain route, which all-gathers the latent weights, and checkpoints that move between the
routes; what the route moves, counted by bench/zero3_traffic.py; partitioned scales refused
(the config's refusals are in tests/test_config.py)."""

from __future__ import annotations

import copy
import json
import os
import weakref
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fbi.binarize.packing import pack_signs, sign
from fbi import sign_gather
from fbi.binarize import SCHEMES, scheme_config
from fbi_testing import REPO, run_train


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


def partitioned(layer, monkeypatch):
    """``layer`` as ZeRO-3 leaves it on one rank (its weight an empty tensor, the values in
    ``ds_tensor``), on the 1-bit route, the gather being that one rank's own bytes."""
    w = layer.weight
    w.ds_tensor, w.ds_numel, w.ds_shape = w.detach().reshape(-1).clone(), w.numel(), w.shape
    w.ds_process_group = None
    w.data = torch.empty(0, dtype=w.dtype)
    monkeypatch.setattr(sign_gather, "gather_packed_signs",
                        lambda shard, group: pack_signs(shard).view(1, -1))
    sign_gather.route(layer)
    return layer


@pytest.mark.parametrize("scheme", sorted(n for n, layer in SCHEMES.items() if layer.SIGN_ONLY))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_routed_layer_computes_the_plain_layer_bitwise(monkeypatch, scheme, dtype):
    """Output, and the gradients of the input, the scales and the latent weight (handed to the
    weight parameter in its full shape, which is empty again after backward)."""
    torch.manual_seed(0)
    plain = SCHEMES[scheme](64, 24, cfg=scheme_config(scheme)).to(dtype)
    routed = partitioned(copy.deepcopy(plain), monkeypatch)
    x = torch.randn(3, 5, 64, dtype=dtype)
    outs = []
    for layer in (plain, routed):
        xr = x.clone().requires_grad_()
        y = layer(xr)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=dtype)).view_as(y))
        outs.append([y, xr.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert routed.weight.shape == (0,) and routed.weight.grad.shape == (24, 64)


@pytest.mark.parametrize("scheme", sorted(n for n, layer in SCHEMES.items() if layer.SIGN_ONLY))
def test_the_signs_are_kept_packed_and_checkpointing_keeps_nothing(monkeypatch, scheme):
    """Between forward and backward the route keeps the gathered bytes, not the +-1 tensor
    the scheme read; inside a checkpointed block it hands them to the checkpoint, which keeps
    nothing (the bytes and the layer's input included) and gathers again when it recomputes."""
    layer = partitioned(SCHEMES[scheme](64, 24, cfg=scheme_config(scheme)), monkeypatch)
    read, gathered = [], []  # weak references: the +-1 tensors the scheme read; the bytes
    real_signs, real_gather = sign_gather._SignsOf, sign_gather.gather_packed_signs

    class Tracked:
        @staticmethod
        def apply(weight, signs):
            out = real_signs.apply(weight, signs)
            read.append(weakref.ref(out))
            return out

    def gather(shard, group):
        packed = real_gather(shard, group)
        gathered.append(weakref.ref(packed))
        return packed

    monkeypatch.setattr(sign_gather, "_SignsOf", Tracked)
    monkeypatch.setattr(sign_gather, "gather_packed_signs", gather)
    y = layer(torch.randn(4, 64))
    assert read[0]() is None and gathered[0]() is not None  # only the bytes survive forward
    y.sum().backward()
    assert layer.weight.grad is not None

    read.clear()
    gathered.clear()
    inputs = []

    def block(x):
        h = x.sin()
        inputs.append(weakref.ref(h))
        return layer(h)

    y = torch.utils.checkpoint.checkpoint(block, torch.randn(4, 64, requires_grad=True),
                                          use_reentrant=False)
    assert inputs[0]() is None and read[0]() is None and gathered[0]() is None
    y.sum().backward()
    assert len(gathered) == 2  # the recomputation gathered again


@pytest.mark.parametrize("scheme,precision,extra,resume,nproc", [
    ("fbi", "bf16", ["micro_batch_size=2"], True, 2),  # 2 micro-batches per step: accumulation
    # backward re-gathers; 3 ranks: shards of 1,366 elements, neither whole bytes nor even
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
            "weights; 0 have weights below") in proc.stderr
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
def test_traffic_bench_counts_one_sixteenth():
    """bench/zero3_traffic.py on the tiny model: on the 1-bit route DeepSpeed gathers none of
    the binarized latent weights, their signs are 1/16 of them, the scales move as before, and
    the routes' losses are bitwise equal."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "bench" / "zero3_traffic.py"), "--model", "fbi_tiny", "--vocab", "512",
         "--seq-len", "32", "--steps", "2", "--persistence", "1000"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    latent, signs = (
        [float(v) for v in re.search(rf"\| {route} \| ([\d.]+) MiB \| ([\d.]+) MiB \| "
                                     r"([\d.]+) MiB \| ([\d.]+) MiB", proc.stdout).groups()]
        for route in ("latent", "signs"))
    assert latent[2] == 0 and signs[1] == 0  # no signs on one route, no latent weights on the other
    assert latent[1] > 1 and signs[2] == pytest.approx(latent[1] / 16, abs=2e-3)
    assert signs[3] == latent[3] > 0  # the scales: whole on every rank, refreshed after each step
    assert "signs / latent weights: 0.0625" in proc.stdout
    assert "losses bitwise equal over 2 steps: yes" in proc.stdout


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
