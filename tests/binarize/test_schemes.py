"""Every scheme against a float64 re-implementation of its paper's formula, written here
independently of fbi/binarize: forward, all gradients, the values the quantized weight takes,
bits per weight, fold, pack/unpack; and the memory-lean layer against the plain formula."""

import math

import pytest
import torch
from torch.nn.functional import linear

from fbi.binarize import SCHEMES, linear_factory, scale_parameter_names, scheme_config
from fbi.config import ConfigError, SchemeConfig
from fbi.configure import compose


def ste(w, q):
    """float64 straight-through: value q, gradient of w."""
    return w + (q - w).detach()


def sgn(w):
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)  # -0.0 >= 0: sign(-0) = +1


def absmax8_ref(x):
    s = 127.0 / x.detach().abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return ste(x, torch.clamp(torch.round(x.detach() * s), -128, 127) / s)


def fbi_weight(w, alpha, beta):
    return alpha * ste(w, sgn(w.detach())) + beta


def hadamard_ref(n):
    h = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(int(math.log2(n))):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / math.sqrt(n)


def pbllm_weight(w, fraction):
    wd = w.detach()
    k = round(fraction * wd.numel())
    thresh = wd.abs().flatten().sort(descending=True).values[k - 1] if k else math.inf
    mask = wd.abs() >= thresh
    step = (wd.abs() * mask).max(dim=1, keepdim=True).values / 127
    salient = torch.round(wd / step).clamp(-127, 127) * step
    alpha = (wd.abs() * ~mask).sum(1, keepdim=True) / (~mask).sum(1, keepdim=True)
    return ste(w, torch.where(mask, salient, alpha * sgn(wd)))


def reference(name, cfg, x, w, p):
    """float64 y for scheme ``name``: x (tokens, in), w (out, in), p: the layer's scales."""
    if name == "fp":
        return x @ w.T
    if name == "fbi":
        return x @ fbi_weight(w, p["alpha"], p["beta"]).T
    if name == "bitnet":
        wd = w.detach()
        return absmax8_ref(x) @ ste(w, sgn(wd - wd.mean()) * wd.abs().mean()).T
    if name == "bitnet158":
        gamma = w.detach().abs().mean()
        return absmax8_ref(x) @ ste(w, torch.clamp(torch.round(w.detach() / gamma), -1, 1) * gamma).T
    if name == "onebit":  # the paper's form: [(X * g) sign(W)^T] * h
        return ((x * p["g"]) @ ste(w, sgn(w.detach())).T) * p["h"]
    if name == "pbllm":
        return x @ pbllm_weight(w, cfg.salient_fraction).T
    if name == "fbi_w1a1":
        block = math.gcd(cfg.hadamard_block, x.shape[-1] & -x.shape[-1])
        xr = (x.reshape(x.shape[0], -1, block) @ hadamard_ref(block).T).reshape(x.shape)
        scale = math.sqrt(2 / math.pi) * xr.detach().pow(2).mean(-1, keepdim=True).sqrt()
        q = sgn(xr.detach()) * scale
        inside = ((xr.detach() - q).abs() <= cfg.trust * scale).to(x.dtype)
        xq = xr * inside + (q - xr * inside).detach()  # trust-region masked STE
        return xq @ fbi_weight(w, p["alpha"], p["beta"]).T
    raise AssertionError(name)


CASES = [("fp", {}), ("fbi", {}), ("fbi", {"layout": "row"}), ("fbi", {"layout": "tensor"}),
         ("bitnet", {}), ("bitnet158", {}), ("onebit", {}), ("pbllm", {"salient_fraction": 0.1}),
         ("fbi_w1a1", {"hadamard_block": 16}), ("fbi_w1a1", {"hadamard_block": 128})]
IDS = [f"{n}-{'-'.join(map(str, o.values()))}" if o else n for n, o in CASES]


def make(name, opts, n_in=48, n_out=24, seed=0, std=0.3):
    torch.manual_seed(seed)
    cfg = scheme_config(name, **opts)
    layer = SCHEMES[name](n_in, n_out, init_std=std, cfg=cfg)
    with torch.no_grad():  # scales away from their init so every term matters
        for pname in layer.SCALES:
            p = getattr(layer, pname)
            p.mul_(torch.rand_like(p) + 0.5).add_(0.05 * torch.randn_like(p))
        layer.weight[0, 0], layer.weight[1, 0] = 0.0, -0.0
    return cfg, layer


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_forward_and_all_gradients_match_float64(name, opts):
    cfg, layer = make(name, opts)
    layer = layer.double()
    x = torch.randn(7, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 24, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    xr = x.detach().clone().requires_grad_()
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    w = params.pop("weight")
    y_ref = reference(name, cfg, xr, w, params)
    (y_ref * g).sum().backward()

    torch.testing.assert_close(layer(x), y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-10)
    for n, p in params.items():
        torch.testing.assert_close(getattr(layer, n).grad, p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_pack_unpack_is_bit_identical_and_bits_are_reported(name, opts):
    _, layer = make(name, opts, n_in=40, n_out=19)
    packed = layer.pack()
    assert torch.equal(layer.unpack(packed), layer.effective_weight().detach())
    stored = sum(t.numel() * t.element_size() * 8 for k, t in packed.items() if k != "shape")
    assert layer.bits_per_weight() == stored / (40 * 19)
    if name != "fp":
        assert layer.bits_per_weight() < 8  # below int8 even with fp32 scales on a tiny matrix


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_fold_equals_the_layer_or_refuses(name, opts):
    _, layer = make(name, opts)
    x = torch.randn(5, 48)
    if layer.QUANTIZES_ACTIVATIONS:
        with pytest.raises(NotImplementedError, match="not linear in x"):
            layer.fold()
    else:
        torch.testing.assert_close(layer.fold()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("layout,dims", [("column", 0), ("row", 1), ("tensor", None)])
def test_fbi_weight_takes_two_values_per_group(layout, dims):
    _, layer = make("fbi", {"layout": layout}, n_in=40, n_out=64)
    w = layer.effective_weight().detach()
    groups = [w.flatten()] if dims is None else (w.T if dims == 0 else w)
    for group in groups:
        assert len(torch.unique(group)) == 2


def test_bitnet_binary_and_bitnet158_ternary():
    _, b = make("bitnet", {})
    assert len(torch.unique(b.effective_weight().detach())) == 2
    _, t = make("bitnet158", {}, n_in=200, n_out=50)
    values = torch.unique(t.effective_weight().detach())
    gamma = t.weight.detach().abs().mean()
    torch.testing.assert_close(values, torch.tensor([-1.0, 0.0, 1.0]) * gamma)
    x = torch.randn(4, 200) * 3
    levels = t.quantize_input(x) * 127 / x.abs().amax(-1, keepdim=True)  # 8-bit codes per token
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)


def test_onebit_weight_is_sign_times_outer_product():
    _, layer = make("onebit", {})
    w = layer.effective_weight().detach()
    outer = layer.h.detach()[:, None] * layer.g.detach()[None, :]
    torch.testing.assert_close(w.abs(), outer.abs(), rtol=0, atol=0)


def test_onebit_svid_init_is_the_rank1_approximation_of_abs_w():
    torch.manual_seed(3)
    dense = torch.randn(30, 20, dtype=torch.float64)
    _, layer = make("onebit", {}, n_in=20, n_out=30)
    layer.double().init_from_dense(dense)
    a = dense.abs()
    v = torch.ones(20, dtype=torch.float64)
    for _ in range(200):  # power iteration: an independent top singular pair
        v = a.T @ (a @ v)
        v = v / v.norm()
    rank1 = torch.outer(a @ v, v)
    torch.testing.assert_close(torch.outer(layer.h, layer.g), rank1, rtol=1e-8, atol=1e-8)
    assert torch.equal(layer.weight.detach().sign(), dense.sign())


def test_pbllm_salient_fraction_is_honoured():
    _, layer = make("pbllm", {"salient_fraction": 0.2}, n_in=50, n_out=30)
    w = layer.effective_weight().detach()
    mask = layer.weight.detach().abs() >= layer.weight.detach().abs().flatten().topk(300).values[-1]
    assert int(mask.sum()) == 300
    for row, m in zip(w, mask):
        assert len(torch.unique(row[~m].abs())) == 1  # +-alpha of the row


def test_w1a1_activations_are_binary_per_token():
    _, layer = make("fbi_w1a1", {"hadamard_block": 16})
    xq = layer.quantize_input(torch.randn(6, 48))
    assert all(len(torch.unique(r)) == 2 for r in xq)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_layer_equals_the_plain_formula(name, opts, dtype):
    """The recomputing layer against ``linear(quantize(x), effective_weight())`` with autograd
    keeping everything, for random shapes."""
    gen = torch.Generator().manual_seed(hash((name, str(opts))) % 1000)
    n_in, n_out, tokens = (int(v) for v in torch.randint(8, 80, (3,), generator=gen))
    n_in = 16 * (n_in // 16 + 1)
    _, layer = make(name, opts, n_in=n_in, n_out=n_out)
    layer = layer.to(dtype)
    plain = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, tokens, n_in, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, tokens, n_out, dtype=dtype)
    (layer(x) * g).sum().backward()
    y = linear(layer.quantize_input(x2), layer.weight_formula(*plain).to(dtype))
    (y * g).sum().backward()
    tol = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(layer(x), y, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    for p, q in zip(layer.parameters(), plain):
        torch.testing.assert_close(p.grad, q.grad, **tol)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_fp32_layer_under_bf16_autocast_computes_like_autocast_linear(name, opts):
    """fp32 parameters and input inside ``torch.autocast(bfloat16)`` (torchtitan-style mixed
    precision): the output is bf16 and output and all gradients equal autocast applied to the
    plain formula (which casts x and the effective weight to bf16 for the product)."""
    _, layer = make(name, opts, n_in=64, n_out=32)
    plain = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y2 = linear(layer.quantize_input(x2), layer.weight_formula(*plain))
    assert y.dtype == y2.dtype == torch.bfloat16
    (y.float() * g).sum().backward()
    (y2.float() * g).sum().backward()
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    for p, q in zip(layer.parameters(), plain):
        assert p.grad.dtype == p.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, **tol)


def test_factory_applies_patterns_and_options():
    make_linear = linear_factory(scheme_config("fbi", binarize=["*.mlp.*"], layout="row"), ["*.mlp.*"])
    a = make_linear("layers.0.mlp.up_proj", 8, 4, 0.02)
    b = make_linear("layers.0.self_attn.q_proj", 8, 4, 0.02)
    assert type(a) is SCHEMES["fbi"] and a.alpha.shape == (4, 1)
    assert type(b) is SCHEMES["fp"]


def test_scale_names_are_what_is_not_decayed():
    model = torch.nn.Module()
    model.a = make("onebit", {})[1]
    model.b = make("fbi", {})[1]
    assert scale_parameter_names(model) == {"a.g", "a.h", "b.alpha", "b.beta"}


@pytest.mark.parametrize("name,field,value", [
    ("bitnet2", "name", None), ("fbi", "layout", "diag"), ("pbllm", "salient_fraction", 1.5),
    ("fbi_w1a1", "hadamard_block", 100), ("fbi_w1a1", "trust", 0.0)])
def test_bad_options_are_refused_naming_the_field(name, field, value):
    with pytest.raises(ConfigError, match=f"scheme.{field}"):
        scheme_config(name, **({} if value is None else {field: value}))


@pytest.mark.parametrize("override,field", [
    ("scheme=fbi scheme.salient_fraction=0.2", "salient_fraction: not an option of scheme=fbi"),
    ("scheme=pbllm scheme.salient_fraction=2", "share in \\[0, 1\\]"),
    ("scheme=fbi_w1a1 scheme.hadamard_block=96", "scheme.hadamard_block")])
def test_options_are_checked_against_the_named_schemes_config(override, field):
    """Each scheme has its own typed group: another scheme's option is refused by name."""
    with pytest.raises(ConfigError, match=field):
        compose(override.split())


def test_each_scheme_config_holds_only_its_own_options():
    assert scheme_config("pbllm", salient_fraction=0.25).salient_fraction == 0.25
    assert not hasattr(scheme_config("fbi"), "salient_fraction")
    assert compose(["scheme=fbi_w1a1", "scheme.layout=row"]).scheme.layout == "row"
    assert type(compose(["scheme=bitnet"]).scheme) is SchemeConfig


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_scales_are_not_decayed_under_matrices(name):
    from fbi.models.llama import ModelConfig
    from fbi.deepspeed_setup import param_groups
    from fbi.models import build_model

    model = build_model(ModelConfig(n_layers=1, d_model=32, d_ff=64, n_heads=2, vocab_size=50),
                        scheme_config(name))
    decayed = {id(p) for p in param_groups(model, 0.1, "matrices")[0]["params"]}
    params = dict(model.named_parameters())
    scales = scale_parameter_names(model)
    assert all(id(params[n]) not in decayed for n in scales)
    assert len(scales) == (0 if name not in ("fbi", "onebit", "fbi_w1a1") else 14)
