"""FBI-LLM's binarized linear against a float64 re-implementation of the paper's formula."""

import torch

from fbi.binarize import linear_factory
from fbi.binarize.fbi import FBILinear
from fbi.binarize.fp import DenseLinear


def reference(x, w, alpha, beta):
    """float64: y = x (alpha * sign(W) + beta)^T with sign(0) = +1."""
    sign = torch.where(w >= 0, 1.0, -1.0).double()
    return x @ (alpha * sign + beta).T


def test_init_follows_the_latent_weight():
    torch.manual_seed(0)
    layer = FBILinear(24, 16, init_std=0.5)
    w = layer.weight.detach().double()
    beta = w.mean(dim=0, keepdim=True)
    alpha = (w - beta).abs().mean(dim=0, keepdim=True)
    assert layer.alpha.shape == layer.beta.shape == (1, 24)
    torch.testing.assert_close(layer.beta.double(), beta, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.alpha.double(), alpha, rtol=1e-6, atol=1e-7)


def test_forward_and_gradients_match_float64():
    torch.manual_seed(1)
    layer = FBILinear(32, 20, init_std=0.3)
    with torch.no_grad():  # scales away from their init so every term matters
        layer.alpha.mul_(torch.rand_like(layer.alpha) + 0.5)
        layer.beta.add_(0.1 * torch.randn_like(layer.beta))
        layer.weight[0, 0] = 0.0  # sign(0) is +1
        layer.weight[1, 0] = -0.0  # and so is sign(-0.0)
    x = torch.randn(3, 5, 32)
    grad_out = torch.randn(3, 5, 20)
    (layer(x) * grad_out).sum().backward()

    xd = x.double()
    w = layer.weight.detach().double()
    a = layer.alpha.detach().double().requires_grad_()
    b = layer.beta.detach().double().requires_grad_()
    y_ref = reference(xd, w, a, b)
    (y_ref * grad_out.double()).sum().backward()

    torch.testing.assert_close(layer(x).double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.alpha.grad.double(), a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.beta.grad.double(), b.grad, rtol=1e-5, atol=1e-5)
    # Identity STE: dL/dW = dL/dsign(W) = alpha * dL/dW_eff, with dL/dW_eff = g^T x.
    g_weff = grad_out.double().reshape(-1, 20).T @ xd.reshape(-1, 32)
    torch.testing.assert_close(layer.weight.grad.double(), a.detach() * g_weff, rtol=1e-5, atol=1e-5)


def test_effective_weight_has_two_values_per_column():
    torch.manual_seed(2)
    layer = FBILinear(40, 64)
    with torch.no_grad():
        layer.weight[:5, 3] = 0.0
        layer.weight[5:9, 3] = -0.0
    w_eff = layer.effective_weight().detach()
    for column in w_eff.T:
        assert column.unique().numel() == 2
    expected = {
        (float(a + b), float(-a + b)) for a, b in zip(layer.alpha[0].detach(), layer.beta[0].detach())
    }
    got = {(float(c.max()), float(c.min())) for c in w_eff.T}
    assert got == expected


def test_factory_binarizes_only_matching_names():
    make = linear_factory("fbi", ["layers.*"])
    assert type(make("layers.0.mlp.up_proj", 8, 8, 0.02)) is FBILinear
    assert type(make("lm_head", 8, 8, 0.02)) is DenseLinear
    fp = linear_factory("fp", ["layers.*"])
    assert type(fp("layers.0.mlp.up_proj", 8, 8, 0.02)) is DenseLinear
