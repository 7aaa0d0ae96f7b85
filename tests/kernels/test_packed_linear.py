"""The packed kernels against the dense layer: every sign-only scheme's ``PackedLinear`` equals
the float64 product with the scheme's own ``unpack``, on odd shapes, decode and prefill."""

import pytest
import torch

from fbi.binarize import SCHEMES, scheme_config
from fbi.binarize.packing import pack_signs, unpack_signs
from fbi.kernels import cpu
from fbi.kernels.forms import NoKernel, row_bits
from fbi.kernels.linear import PackedLinear

SHAPES = [(1, 1), (7, 3), (13, 70), (64, 5), (100, 33), (130, 257), (192, 64)]  # (in, out)
TOKENS = [1, 3, 5, 9, 19, 37]  # decode, remainders of 8-row and 4x4 tiles, prefill (>= 32)
SCHEME_OPTIONS = [("fbi", {"layout": "column"}), ("fbi", {"layout": "row"}),
                  ("fbi", {"layout": "tensor"}), ("fbi_w1a1", {}), ("bitnet", {}),
                  ("bitnet158", {}), ("onebit", {}), ("onebit_fold", {})]


def scheme_layer(name, options, in_features, out_features, seed=0):
    torch.manual_seed(seed)
    cfg = scheme_config(name, **options)
    layer = SCHEMES[name](in_features, out_features, init_std=0.5, cfg=cfg)
    with torch.no_grad():  # scales away from their data-derived init, signs of both kinds
        for p in layer.parameters():
            if p is not layer.weight:
                p.copy_(torch.rand_like(p) + 0.1)
    return layer


def reference(layer, packed, x):
    """The scheme's own input function, then the float64 product with ``unpack``."""
    w = type(layer).unpack(packed).double()
    return layer.normalize_output(layer.quantize_input(x).double() @ w.T)


@pytest.mark.parametrize("name,options", SCHEME_OPTIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_packed_linear_equals_dense_float64(name, options, in_features, out_features):
    layer = scheme_layer(name, options, in_features, out_features)
    packed = layer.pack()
    kernel = PackedLinear(layer, packed)
    for n in TOKENS:
        x = torch.randn(n, in_features)
        want = reference(layer, packed, x)
        got = kernel(x)
        assert got.dtype == torch.float32 and got.shape == (n, out_features)
        # fp32 accumulation: error bounded by a few ulps of the sum of |terms|
        bound = layer.normalize_output(layer.quantize_input(x).abs().double()
                                       @ type(layer).unpack(packed).double().abs().T)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=float(bound.abs().max()) * 1e-5)


def test_batched_shapes_and_fold_match_the_packed_tensors():
    layer = scheme_layer("fbi", {}, 40, 24)
    kernel = PackedLinear(layer, layer.pack())
    x = torch.randn(2, 3, 40)
    torch.testing.assert_close(kernel(x), kernel(x.reshape(6, 40)).reshape(2, 3, 24))
    torch.testing.assert_close(kernel.fold().weight, type(layer).unpack(layer.pack()))
    assert kernel.pack().keys() == layer.pack().keys()


def test_pbllm_is_refused_with_the_reason():
    layer = scheme_layer("pbllm", {}, 64, 8)
    with pytest.raises(NoKernel, match="pbllm.*not a sign product.*--kernel dense"):
        PackedLinear(layer, layer.pack())


@pytest.mark.parametrize("in_features", [1, 63, 64, 65, 200])
def test_row_bits_start_each_row_on_8_bytes(in_features):
    signs = torch.where(torch.rand(5, in_features) < 0.5, 1.0, -1.0)
    bits = row_bits(pack_signs(signs), 5, in_features)
    assert bits.shape == (5, 8 * -(-in_features // 64))
    for r in range(5):
        assert torch.equal(unpack_signs(bits[r], (in_features,)), signs[r])


def host_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


@pytest.mark.parametrize("variant", ["native", "avx2", "portable"])
def test_cpu_kernel_variants_against_float64(variant):
    """Each compiled path: this host's SIMD, AVX2's sign-flip table, the plain loop."""
    if variant == "avx2" and not host_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    torch.manual_seed(1)
    # 136 bytes: two feature chunks of the kernel (128 bytes each); 300 rows x 33 tokens:
    # 4 x 4 tiles and their remainders
    for rows, nb, n in [(1, 8, 1), (9, 8, 1), (13, 16, 5), (70, 24, 4), (33, 8, 7), (6, 136, 6),
                        (300, 16, 33)]:
        bits = torch.randint(0, 256, (rows, nb), dtype=torch.uint8)
        u = torch.randn(n, 8 * nb)
        s = unpack_signs(bits, (rows, 8 * nb), torch.float64)
        want = u.double() @ s.T
        got = cpu.sign_matmul(bits, u, variant).double()
        if variant != "native":
            assert cpu.extension(variant).simd_path() == variant
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(u.abs().sum(1).max()))


def test_lookup_layer_split_across_threads_and_a_foreign_layout_refused():
    """Decode's lookup layer (AVX-512 hosts): each thread scales the input and builds its own
    tables, so the rows split between threads must give the one-thread result exactly; a layout
    made for other bits is refused, naming the argument."""
    if not cpu.looks_up():
        pytest.skip("this CPU has no AVX-512: decode takes the masked adds")
    layer = scheme_layer("bitnet158", {}, 200, 1000)  # two planes, 63 blocks, the last partial
    kernel = PackedLinear(layer, layer.pack())
    x = torch.randn(3, 200)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x)
        torch.set_num_threads(2)
        torch.testing.assert_close(kernel(x), one, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    form = kernel.form
    other = cpu.lut_layout(form.bits[:992], 2)  # 31 blocks a plane where the layer has 63
    with pytest.raises(RuntimeError, match="lut: lut_layout's"):
        cpu.extension().sign_linear(form.bits, other, x, form.planes, form.in_scale,
                                    form.out_scale, form.beta_in, form.beta_out)


def test_lut_layout_puts_a_blocks_rows_side_by_side():
    """Byte k of rows 16b..16b+15 of each plane together; the rows padded with zero bits."""
    bits = torch.randint(0, 256, (2 * 21, 16), dtype=torch.uint8)
    lut = cpu.lut_layout(bits, 2)
    assert lut.shape == (2, 2, 16, 16)
    for p in range(2):
        for o in range(21):
            for k in range(16):
                assert lut[p, o // 16, k, o % 16] == bits[21 * p + o, k]
    assert (lut[:, 1, :, 5:] == 0).all()


@pytest.mark.parametrize("variant", ["native", "avx2", "portable"])
def test_int8_prefill_product_against_float64(variant):
    """Prefill's int8 route (``cpu.int8_matmul``: the signs as int8, the inputs split into three
    int8 pieces) on each compiled path: within 2^-24 of each token's largest input, the
    ternary planes summed, widths that end mid-byte and mid-vector, zero and non-finite tokens."""
    if variant == "avx2" and not host_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    torch.manual_seed(2)
    for rows, in_features, n, planes in [(1, 1, 32, 1), (17, 63, 33, 2), (40, 64, 35, 1),
                                         (3, 70, 32, 1), (70, 130, 64, 2), (300, 1000, 40, 1)]:
        nb = 8 * -(-in_features // 64)
        bits = torch.randint(0, 256, (planes * rows, nb), dtype=torch.uint8)
        # inputs over six orders of magnitude, so each token's scale and pieces differ
        u = torch.randn(n, in_features) * 10.0 ** torch.randint(-3, 3, (n, 1)).float()
        u[0] = 0.0
        u[-1, :] = 1e-31  # below the split's floor: zeros
        s = unpack_signs(bits, (planes * rows, 8 * nb), torch.float64)[:, :in_features]
        want = u.double() @ (s[:rows] + s[rows:] if planes == 2 else s).T
        got = cpu.int8_matmul(bits, u, variant, planes=planes).double()
        # the split's error, and below its floor (1e-30) the token's whole product
        bound = (2.0 ** -22 * u.abs().amax(1, keepdim=True).double() + 1e-30) * planes * in_features
        assert got.shape == (n, rows) and (got - want).abs().le(bound).all()
        assert torch.equal(got[0], torch.zeros(rows, dtype=torch.float64))
        assert torch.equal(got[-1], torch.zeros(rows, dtype=torch.float64))
    u[1, 3] = float("nan")
    u[2, 0] = float("inf")
    got = cpu.int8_matmul(bits, u, variant)
    assert got[1:3].isnan().all() and got[3:].isfinite().all()


@pytest.mark.parametrize("variant", ["native", "avx2", "portable"])
def test_bf16_head_product_against_float64(variant):
    """The head as stored (``cpu.bf16_matmul``): bf16 weights widened exactly, float32 sums;
    widths that end mid-vector, row counts beside the 8-row blocks, several tokens."""
    if variant == "avx2" and not host_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    torch.manual_seed(3)
    for rows, in_features, n in [(1, 1, 1), (7, 15, 1), (9, 16, 3), (70, 130, 2), (300, 2048, 1)]:
        w = torch.randn(rows, in_features).bfloat16()
        x = torch.randn(n, in_features)
        want = x.double() @ w.double().T
        got = cpu.bf16_matmul(w, x, variant)
        assert got.dtype == torch.float32 and got.shape == (n, rows)
        bound = 1e-6 * (x.double().abs() @ w.double().abs().T)  # fp32 sums of in_features terms
        assert ((got.double() - want).abs() <= bound * max(1, in_features / 64)).all()
