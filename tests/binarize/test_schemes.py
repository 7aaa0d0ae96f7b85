"""Every registered scheme, parametrized over the registry (a new scheme runs the whole
battery), against a float64 re-implementation of its paper's formula or its authors' code,
written here independently of fbi/binarize: forward and all gradients, fold or its refusal,
pack/unpack and bits per weight, SIGN_ONLY probed, decay groups, bf16 autocast, the
memory-lean layer against its plain formula; then each scheme's own properties."""

import math

import pytest
import torch
from torch.nn.functional import linear

from fbi.binarize import SCHEMES, linear_factory, scale_parameter_names, scheme_config
from fbi.binarize.fp import DenseLinear
from fbi.binarize.packing import sign_ste
from fbi.binarize.sign_only import magnitude_dependence, verify_sign_only
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


def norm_ref(x, norm):
    """The BitNet papers' in-layer norms without affine parameters."""
    if norm == "layernorm":  # BitNet: (x - E x) / sqrt(Var x + eps), nn.LayerNorm's eps
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / ((x - mu).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    if norm == "rmsnorm":  # the tips' RMSNorm(x): no gain, LlamaRMSNorm's eps (our inference)
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    return x


def fbi_weight(w, alpha, beta):
    return alpha * ste(w, sgn(w.detach())) + beta


def hadamard_ref(n):
    h = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(int(math.log2(n))):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / math.sqrt(n)


def onebit_sign(w):
    """The authors' SignSTEFunc: value sign(W), gradient 1.001 - tanh(W)^2 = d/dW (tanh W +
    0.001 W)."""
    f = torch.tanh(w) + 0.001 * w
    return sgn(w.detach()) + (f - f.detach())


def pbllm_binary(w, alpha, gradient):
    """The authors' ``STEBinary().apply(W) * binary_scale`` (STEBinary: value sign, gradient
    the identity), so the gradient is alpha G; ``identity``: fbi's earlier G."""
    if gradient == "scaled":
        return ste(w, sgn(w.detach())) * alpha
    return ste(w, alpha * sgn(w.detach()))


def pbllm_reselect_weight(w, fraction, gradient):
    wd = w.detach()
    k = round(fraction * wd.numel())
    thresh = wd.abs().flatten().sort(descending=True).values[k - 1] if k else math.inf
    mask = wd.abs() >= thresh
    step = (wd.abs() * mask).max(dim=1, keepdim=True).values / 127
    salient = torch.round(wd / step).clamp(-127, 127) * step
    alpha = (wd.abs() * ~mask).sum(1, keepdim=True) / (~mask).sum(1, keepdim=True)
    return torch.where(mask, ste(w, salient), pbllm_binary(w, alpha, gradient))


def pbllm_authors_init(dense, fraction):
    """From hahnyuan/PB-LLM's BinaryXnorExceptOutliersLinear.gen_outlier_mask: (mask of the
    values outside the kthvalue thresholds, the weight on its per-row min/max 8-bit grid)."""
    flat = dense.flatten().sort().values
    n = dense.numel()
    lo, hi = int(n * fraction / 2), int(n * (1 - fraction / 2))
    mask = torch.zeros_like(dense, dtype=torch.bool)
    if lo:
        mask |= dense < flat[lo - 1]
    if hi < n:
        mask |= dense > flat[hi - 1]
    rmin, rmax = dense.min(1, keepdim=True).values, dense.max(1, keepdim=True).values
    step = (rmax - rmin) / 255
    return mask, torch.round((dense - rmin) / step).clamp(0, 255) * step + rmin


def pbllm_authors_weight(w, dense, fraction, gradient):
    """Salient weights frozen at their init grid values (``train_outlier=False``: detached);
    the rest per-tensor alpha * sign (``binary_scale``: mean |W| of the non-salient, detached)."""
    mask, grid = pbllm_authors_init(dense, fraction)
    alpha = w.detach().abs()[~mask].mean()
    return torch.where(mask, grid, pbllm_binary(w, alpha, gradient))


def layernorm_ref(y):
    mu = y.mean(-1, keepdim=True)
    return (y - mu) / ((y - mu).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()


def reference(name, cfg, x, w, p, dense):
    """float64 y for scheme ``name``: x (tokens, in), w (out, in), p: the layer's scales, dense:
    the weight the layer was initialized from."""
    if name == "fp":
        return x @ w.T
    if name == "fbi":
        return x @ fbi_weight(w, p["alpha"], p["beta"]).T
    if name == "bitnet":
        wd = w.detach()
        return absmax8_ref(norm_ref(x, cfg.norm)) @ ste(w, sgn(wd - wd.mean()) * wd.abs().mean()).T
    if name == "bitnet158":
        gamma = w.detach().abs().mean()
        w_q = ste(w, torch.clamp(torch.round(w.detach() / gamma), -1, 1) * gamma)
        return absmax8_ref(norm_ref(x, cfg.norm)) @ w_q.T
    if name == "onebit":  # the paper's: LayerNorm([(X * g) sign(W)^T] * h), tanh gradient
        return layernorm_ref(((x * p["g"]) @ onebit_sign(w).T) * p["h"])
    if name == "onebit_fold":
        return ((x * p["g"]) @ ste(w, sgn(w.detach())).T) * p["h"]
    if name == "pbllm" and cfg.form == "reselect":
        return x @ pbllm_reselect_weight(w, cfg.salient_fraction, cfg.gradient).T
    if name == "pbllm":
        return x @ pbllm_authors_weight(w, dense, cfg.salient_fraction, cfg.gradient).T
    if name == "fbi_w1a1":
        block = math.gcd(cfg.hadamard_block, x.shape[-1] & -x.shape[-1])
        xr = (x.reshape(x.shape[0], -1, block) @ hadamard_ref(block).T).reshape(x.shape)
        scale = math.sqrt(2 / math.pi) * xr.detach().pow(2).mean(-1, keepdim=True).sqrt()
        q = sgn(xr.detach()) * scale
        inside = ((xr.detach() - q).abs() <= cfg.trust * scale).to(x.dtype)
        xq = xr * inside + (q - xr * inside).detach()  # trust-region masked STE
        return xq @ fbi_weight(w, p["alpha"], p["beta"]).T
    raise AssertionError(f"scheme {name} has no float64 reference here: write one from its "
                         "paper or its authors' code (a new scheme runs this whole battery)")


# Every registered scheme with its defaults (the paper's form), then fbi's variants.
CASES = [(name, {}) for name in sorted(SCHEMES)] + [
    ("fbi", {"layout": "row"}), ("fbi", {"layout": "tensor"}),
    ("bitnet", {"norm": "layernorm", "block_norms": True}),
    ("bitnet", {"norm": "none", "block_norms": True}),
    ("bitnet158", {"norm": "none", "block_norms": True}), ("pbllm", {"gradient": "identity"}),
    ("pbllm", {"form": "reselect", "gradient": "identity"}), ("pbllm", {"form": "reselect"}),
    ("pbllm", {"salient_fraction": 0.3}), ("fbi_w1a1", {"hadamard_block": 16})]
IDS = [f"{n}-{'-'.join(map(str, o.values()))}" if o else n for n, o in CASES]


def make(name, opts, n_in=48, n_out=24, seed=0, std=0.3, dtype=torch.float32):
    """(cfg, layer, dense): a layer initialized from the dense weight (two of its entries
    +-0.0), its scales moved away from their init so every term matters."""
    torch.manual_seed(seed)
    cfg = scheme_config(name, **opts)
    dense = torch.randn(n_out, n_in, dtype=dtype) * std
    dense[0, 0], dense[1, 0] = 0.0, -0.0
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        layer = SCHEMES[name](n_in, n_out, init_std=std, cfg=cfg)
    finally:
        torch.set_default_dtype(default)
    layer.init_from_dense(dense)
    with torch.no_grad():
        for pname in layer.SCALES:
            p = getattr(layer, pname)
            p.mul_(torch.rand_like(p) + 0.5).add_(0.05 * torch.randn_like(p))
    return cfg, layer, dense


def plain(layer, x, params):
    """The layer's function with autograd keeping everything: its own pieces, composed."""
    return layer.normalize_output(linear(layer.quantize_input(x), layer.weight_formula(*params)))


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_forward_and_all_gradients_match_float64(name, opts):
    cfg, layer, dense = make(name, opts, dtype=torch.float64)
    x = torch.randn(7, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 24, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    xr = x.detach().clone().requires_grad_()
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    w = params.pop("weight")
    y_ref = reference(name, cfg, xr, w, params, dense)
    (y_ref * g).sum().backward()

    torch.testing.assert_close(layer(x), y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-10)
    for n, p in params.items():
        torch.testing.assert_close(getattr(layer, n).grad, p.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_pack_unpack_is_bit_identical_and_bits_are_reported(name, opts):
    _, layer, _ = make(name, opts, n_in=40, n_out=19)
    packed = layer.pack()
    assert torch.equal(layer.unpack(packed), layer.effective_weight().detach())
    stored = sum(t.numel() * t.element_size() * 8 for k, t in packed.items() if k != "shape")
    assert layer.bits_per_weight() == stored / (40 * 19)
    if name != "fp":
        assert layer.bits_per_weight() < 8  # below int8 even with fp32 scales on a tiny matrix


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_fold_equals_the_layer_or_refuses(name, opts):
    _, layer, _ = make(name, opts)
    x = torch.randn(5, 48)
    reason = layer.fold_refusal()
    if reason:
        with pytest.raises(NotImplementedError, match="not linear in x"):
            layer.fold()
        assert layer.QUANTIZES_ACTIVATIONS or not torch.allclose(  # really not linear in x
            layer(2 * x), 2 * layer(x), rtol=1e-3, atol=1e-3)
    else:
        torch.testing.assert_close(layer.fold()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_sign_only_is_what_the_layer_does(name, opts):
    """Declared ``SIGN_ONLY`` exactly when redrawing |W| (signs kept) changes nothing."""
    cfg = scheme_config(name, **opts)
    assert (magnitude_dependence(SCHEMES[name], cfg) == []) == SCHEMES[name].SIGN_ONLY


class _ReadsMagnitude(DenseLinear):
    """Declares SIGN_ONLY but scales sign(W) by mean|W|: what the check exists to catch."""
    SIGN_ONLY = True

    def weight_formula(self, weight):
        return sign_ste(weight) * weight.detach().abs().mean()


class _TanhGradient(SCHEMES["onebit"]):
    SIGN_ONLY = True  # wrong: its gradient reads |W|


@pytest.mark.parametrize("cls,differs", [(_ReadsMagnitude, "output"), (_TanhGradient, "weight gradient")])
def test_a_misdeclared_sign_only_scheme_is_refused(cls, differs):
    with pytest.raises(ConfigError, match=f"zero.gather_signs: .*declares SIGN_ONLY.*{differs}"):
        verify_sign_only(cls, scheme_config("fbi"))
    verify_sign_only(SCHEMES["fbi"], scheme_config("fbi"))  # a true declaration passes
    with pytest.raises(ConfigError, match="scheme=pbllm .* reads more of the latent weight"):
        verify_sign_only(SCHEMES["pbllm"], scheme_config("pbllm"))


@pytest.mark.parametrize("layout,dims", [("column", 0), ("row", 1), ("tensor", None)])
def test_fbi_weight_takes_two_values_per_group(layout, dims):
    _, layer, _ = make("fbi", {"layout": layout}, n_in=40, n_out=64)
    w = layer.effective_weight().detach()
    groups = [w.flatten()] if dims is None else (w.T if dims == 0 else w)
    for group in groups:
        assert len(torch.unique(group)) == 2


@pytest.mark.parametrize("name,opts,norm", [
    ("bitnet", {}, "rmsnorm"), ("bitnet", {"norm": "layernorm"}, "layernorm"),
    ("bitnet158", {}, "rmsnorm")])
def test_bitnet_quantizes_its_normalized_input_per_token(name, opts, norm):
    """The BitLinear of the authors' code (both b1 and b1.58: RMSNorm) and of the BitNet paper
    (LayerNorm): the input normalized inside the layer, then 8-bit codes per token; so a layer
    fed an unnormalized input (o_proj, down_proj) computes the same as one fed it rescaled."""
    _, layer, _ = make(name, opts, n_in=200, n_out=50)
    assert layer.cfg.norm == norm
    x = torch.randn(4, 200) * 3 + 1
    xn = norm_ref(x.double(), norm).float()
    levels = layer.quantize_input(x) * 127 / xn.abs().amax(-1, keepdim=True)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    torch.testing.assert_close(layer(x * 50), layer(x), rtol=1e-5, atol=1e-5)


def test_bitnet_binary_and_bitnet158_ternary():
    _, b, _ = make("bitnet", {})
    assert len(torch.unique(b.effective_weight().detach())) == 2
    _, t, _ = make("bitnet158", {}, n_in=200, n_out=50)
    values = torch.unique(t.effective_weight().detach())
    gamma = t.weight.detach().abs().mean()
    torch.testing.assert_close(values, torch.tensor([-1.0, 0.0, 1.0]) * gamma)


@pytest.mark.parametrize("name", ["onebit", "onebit_fold"])
def test_onebit_weight_is_sign_times_outer_product(name):
    _, layer, _ = make(name, {})
    w = layer.effective_weight().detach()
    outer = layer.h.detach()[:, None] * layer.g.detach()[None, :]
    torch.testing.assert_close(w.abs(), outer.abs(), rtol=0, atol=0)


def test_onebit_output_is_layer_normalized():
    """The paper's form: each output row has mean 0 and variance 1 whatever the scales."""
    _, layer, _ = make("onebit", {}, n_in=64, n_out=96)
    with torch.no_grad():
        layer.h.mul_(7.0)
    y = layer(torch.randn(5, 64) * 4).detach().double()
    torch.testing.assert_close(y.mean(-1), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(5, dtype=torch.float64),
                               rtol=1e-3, atol=1e-3)


def test_onebit_fold_init_is_the_rank1_approximation_of_abs_w():
    """fbi's variant: the exact rank-1 factor of |W| (an independent power iteration), the
    dense latent weight kept."""
    torch.manual_seed(3)
    dense = torch.randn(30, 20, dtype=torch.float64)
    layer = SCHEMES["onebit_fold"](20, 30, cfg=scheme_config("onebit_fold")).double()
    layer.init_from_dense(dense)
    a = dense.abs()
    v = torch.ones(20, dtype=torch.float64)
    for _ in range(200):  # power iteration: an independent top singular pair
        v = a.T @ (a @ v)
        v = v / v.norm()
    rank1 = torch.outer(a @ v, v)
    torch.testing.assert_close(torch.outer(layer.h, layer.g), rank1, rtol=1e-8, atol=1e-8)
    assert torch.equal(layer.weight.detach(), dense)


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (48, 40)), (torch.float32, (96, 24)),
                                         (torch.float64, (30, 20))])
def test_onebit_init_is_the_authors_nmf_split(dtype, shape):
    """The authors' build_start_ckpt.py, run as they run it: scikit-learn's
    NMF(n_components=1, init='random', random_state=0) on |W| gives h (fit_transform) and g
    (components_), in W's precision; latent weight 0.01 sign(W)."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    torch.manual_seed(4)
    dense = torch.randn(*shape, dtype=dtype) * 0.05
    layer = SCHEMES["onebit"](shape[1], shape[0], cfg=scheme_config("onebit")).to(dtype)
    layer.init_from_dense(dense)
    nmf = decomposition.NMF(n_components=1, init="random", random_state=0)
    h = nmf.fit_transform(dense.abs().numpy())
    g = nmf.components_
    torch.testing.assert_close(layer.h.detach(), torch.from_numpy(h).squeeze(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.g.detach(), torch.from_numpy(g).squeeze(0), rtol=1e-6, atol=0)
    assert torch.equal(layer.weight.detach(), dense.sign() * 0.01)


def test_onebit_from_scratch_starts_with_unit_scales():
    layer = SCHEMES["onebit"](20, 30, cfg=scheme_config("onebit"))
    assert torch.equal(layer.g.detach(), torch.ones(20)) and torch.equal(layer.h.detach(), torch.ones(30))


def test_pbllm_mask_is_fixed_and_salient_weights_frozen_through_training():
    """The authors' form: after optimizer steps that move every latent weight, the salient
    set and values are those of initialization, and alpha is one per tensor."""
    cfg, layer, dense = make("pbllm", {"salient_fraction": 0.2}, n_in=50, n_out=30)
    mask, grid = pbllm_authors_init(dense.double(), 0.2)
    assert int(mask.sum()) in (299, 300)  # 10% below, 10% above the kthvalue thresholds
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        (layer(torch.randn(4, 50)) ** 2).sum().backward()
        assert layer.weight.grad[mask].abs().sum() == 0 and layer.weight.grad[~mask].abs().sum() > 0
        opt.step()
        with torch.no_grad():  # also what weight decay would do: the forward snaps it back
            layer.weight[mask] *= 1 - 1e-6
    w = layer.effective_weight().detach()
    assert torch.equal(layer.salient(), mask)
    torch.testing.assert_close(w[mask].double(), grid[mask], rtol=0, atol=1e-6)
    assert len(torch.unique(w[~mask].abs())) == 1  # +-alpha, one per tensor


def test_pbllm_reselect_follows_the_largest_magnitudes():
    _, layer, _ = make("pbllm", {"salient_fraction": 0.2, "form": "reselect"}, n_in=50, n_out=30)
    w = layer.effective_weight().detach()
    mask = layer.weight.detach().abs() >= layer.weight.detach().abs().flatten().topk(300).values[-1]
    assert int(mask.sum()) == 300
    for row, m in zip(w, mask):
        assert len(torch.unique(row[~m].abs())) == 1  # +-alpha of the row


def test_w1a1_activations_are_binary_per_token():
    _, layer, _ = make("fbi_w1a1", {"hadamard_block": 16})
    xq = layer.quantize_input(torch.randn(6, 48))
    assert all(len(torch.unique(r)) == 2 for r in xq)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_layer_equals_the_plain_formula(name, opts, dtype):
    """The recomputing layer against its pieces composed with autograd keeping everything,
    for random shapes."""
    gen = torch.Generator().manual_seed(hash((name, str(opts))) % 1000)
    n_in, n_out, tokens = (int(v) for v in torch.randint(8, 80, (3,), generator=gen))
    n_in = 16 * (n_in // 16 + 1)
    _, layer, _ = make(name, opts, n_in=n_in, n_out=n_out)
    layer = layer.to(dtype)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, tokens, n_in, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(2, tokens, n_out, dtype=dtype)
    (layer(x) * g).sum().backward()
    y = layer.normalize_output(linear(layer.quantize_input(x2), layer.weight_formula(*params).to(dtype)))
    (y * g).sum().backward()
    tol = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(layer(x), y, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    for p, q in zip(layer.parameters(), params):
        torch.testing.assert_close(p.grad, q.grad, **tol)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_fp32_layer_under_bf16_autocast_computes_like_autocast_linear(name, opts):
    """fp32 parameters and input inside ``torch.autocast(bfloat16)`` (torchtitan-style mixed
    precision): output and all gradients equal autocast applied to the plain formula (which
    casts x and the effective weight to bf16 for the product); the output bf16 unless the
    scheme normalizes it (autocast runs layer_norm in fp32)."""
    _, layer, _ = make(name, opts, n_in=64, n_out=32)
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y2 = plain(layer, x2, params)
    assert y.dtype == y2.dtype
    assert y.dtype == torch.bfloat16 or type(layer).normalize_output is not DenseLinear.normalize_output
    (y.float() * g).sum().backward()
    (y2.float() * g).sum().backward()
    tol = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    for p, q in zip(layer.parameters(), params):
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
    ("pbllm", "form", "hessian"), ("pbllm", "gradient", "tanh"), ("bitnet", "norm", "batchnorm"),
    ("bitnet", "block_norms", None), ("bitnet158", "block_norms", None),
    ("fbi_w1a1", "hadamard_block", 100), ("fbi_w1a1", "trust", 0.0)])
def test_bad_options_are_refused_naming_the_field(name, field, value):
    opts = {"norm": "none"} if field == "block_norms" else {} if value is None else {field: value}
    with pytest.raises(ConfigError, match=f"scheme.{field}"):
        scheme_config(name, **opts)


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
    assert type(compose(["scheme=onebit"]).scheme) is SchemeConfig


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_composes_from_its_yaml_with_its_defaults(name):
    """conf/scheme/<name>.yaml exists and holds the dataclass's defaults (the paper's form)."""
    assert compose([f"scheme={name}"]).scheme == scheme_config(name, binarize=None) or name == "fp"


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
    binary = [m for m in model.modules() if type(m) is SCHEMES[name]]
    assert len(scales) == (0 if name == "fp" else len(binary) * len(SCHEMES[name].SCALES))
