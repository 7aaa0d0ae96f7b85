"""``SIGN_ONLY`` verified, not declared: the 1-bit ZeRO-3 route (``zero.gather_signs``,
fbi.sign_gather) hands a layer ``sign(W)`` in place of its latent weight, in forward and in
backward. That is right only if nothing the layer computes depends on ``|W|``: its output, and
the gradients of its input, scales and latent weight. A scheme that declares ``SIGN_ONLY``
wrongly would train silently on wrong values (a layer reading ``|W|`` outputs values scaled by
the inverse of the weights' magnitude), so the declaration is probed before a run starts.
"""

from __future__ import annotations

import copy

import torch

from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import sign
from fbi.config import ConfigError, SchemeConfig

PROBE_SHAPE = (32, 16)  # (in, out): every scheme's constraints hold (e.g. a Hadamard block)


def magnitude_dependence(cls: type[DenseLinear], cfg: SchemeConfig) -> list[str]:
    """What a ``cls`` layer with scheme config ``cfg`` computes differently (bit for bit,
    in float64) after every ``|W|`` is redrawn with the signs kept: ``[]`` for a layer that
    reads W only through sign(W), else e.g. ``["output (train)", "input gradient (eval)"]``.
    The new magnitudes span ten orders (1e-5 to 1e5, log-uniform), so a clip or threshold at
    any ordinary |W| shows; both training and eval mode are probed, so a dependence that
    exists in one mode only shows. Probes a small fresh layer (the model's own may be
    ZeRO-3-partitioned already); the global random streams are left as they were."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a = cls(*PROBE_SHAPE, init_std=0.5, cfg=cfg).double()
        b = copy.deepcopy(a)
        with torch.no_grad():  # new magnitudes, same signs (none zero), scales untouched
            b.weight.copy_(sign(a.weight) * 10.0 ** (torch.rand_like(a.weight) * 10 - 5))
        x = torch.randn(5, PROBE_SHAPE[0], dtype=torch.float64)
        grad = torch.randn(5, PROBE_SHAPE[1], dtype=torch.float64)
    differs = []
    for mode in ("train", "eval"):
        results = []
        for probe in (a, b):
            probe.train(mode == "train")
            probe.zero_grad(set_to_none=True)
            xr = x.clone().requires_grad_()
            y = probe(xr)
            y.backward(grad)
            results.append({"output": y, "input gradient": xr.grad,
                            **{f"{n} gradient": p.grad for n, p in probe.named_parameters()}})
        differs += [f"{k} ({mode})" for k in results[0] if not torch.equal(results[0][k], results[1][k])]
    return differs


def verify_sign_only(cls: type[DenseLinear], cfg: SchemeConfig) -> None:
    """Raise ``ConfigError`` if scheme layer ``cls`` (with options ``cfg``) is not
    ``SIGN_ONLY`` or its computation depends on ``|W|`` (``magnitude_dependence``): checked at
    start-up (fbi.preflight, before the run directory exists) when ``zero.gather_signs=true``."""
    name = cfg.name
    if not cls.SIGN_ONLY:
        raise ConfigError(
            f"zero.gather_signs: scheme={name} ({cls.__name__}) reads more of the latent weight "
            "than its signs; choose a SIGN_ONLY scheme, or set zero.gather_signs=false")
    differs = magnitude_dependence(cls, cfg)
    if differs:
        raise ConfigError(
            f"zero.gather_signs: scheme={name} declares SIGN_ONLY ({cls.__name__}), but its "
            f"{', '.join(differs)} change when |W| changes with the signs kept: the 1-bit route "
            "would compute something else. Set zero.gather_signs=false, or fix the scheme's "
            "SIGN_ONLY (False unless the forward and backward read W only through sign(W))"
        )
