"""The Triton kernel under Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU), or
compiled where there is a GPU (bench/gpu_check.py runs this file there, and times the kernel):
decode and prefill paths against the float64 product, on the packed layout the schemes'
forms produce (odd shapes, b1.58's two planes)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fbi.binarize.packing import unpack_signs
from fbi.kernels.linear import apply
from fbi_testing import REPO

# tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU, before triton is imported
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip(
    "triton", reason="triton is not installed (CPU wheels of torch do not ship it): "
    "pip install the triton of requirements.txt")

sys.path.insert(0, str(REPO / "tests" / "kernels"))
from test_packed_linear import SCHEME_OPTIONS, reference, scheme_layer  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU check runs these on CUDA


@pytest.fixture
def triton_sign():
    import fbi.kernels.triton_sign as module

    return module


@pytest.mark.parametrize("rows,nb,n", [(1, 8, 1), (70, 24, 3), (33, 8, 16), (130, 16, 70)])
def test_triton_kernel_against_float64(triton_sign, rows, nb, n):
    torch.manual_seed(0)
    bits = torch.randint(0, 256, (rows, nb), dtype=torch.uint8)
    u = torch.randn(n, 8 * nb)
    want = u.double() @ unpack_signs(bits, (rows, 8 * nb), torch.float64).T
    got = triton_sign.sign_matmul(bits.to(DEVICE), u.to(DEVICE)).double().cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(u.abs().sum(1).max()))


@pytest.mark.parametrize("name,options", [SCHEME_OPTIONS[0], SCHEME_OPTIONS[1]]
                         + [o for o in SCHEME_OPTIONS if o[0] in ("bitnet158", "onebit")],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("n", [1, 20])
def test_schemes_on_the_triton_kernel_equal_dense(triton_sign, monkeypatch, name, options, n):
    """``PackedLinear``'s product with the Triton kernel in place of the CPU one."""
    from fbi.kernels import linear
    from fbi.kernels.linear import PackedLinear

    monkeypatch.setattr(linear, "sign_matmul", triton_sign.sign_matmul)
    layer = scheme_layer(name, options, 100, 37)
    packed = layer.pack()
    kernel = PackedLinear(layer, packed).to(DEVICE)
    x = torch.randn(n, 100)
    got = layer.normalize_output(apply(kernel.form, layer.quantize_input(x).to(DEVICE)).cpu())
    torch.testing.assert_close(got.double(), reference(layer, packed, x), rtol=1e-5, atol=1e-5)
