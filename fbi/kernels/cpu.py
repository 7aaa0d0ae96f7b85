"""The CPU kernel of packed sign products (``sign_matmul.cpp``), compiled on first use.

Compiled with ``-O3 -march=native`` for the CPU it runs on: the build folder under
``$FBI_CACHE/kernels/`` (default ``~/.cache/fbi``) is keyed by the CPU's model and feature
flags, the compiler, torch's version and the source, so nodes of a shared filesystem that
differ each get their own build, and a build never runs on a CPU that lacks its instructions.
``variant="avx2"`` and ``"portable"`` (no ``-m`` flag: the plain loop, the fallback) build the
source's other paths, which the tests check too.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import subprocess
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sign_matmul.cpp")
# native: what runs; avx2 and portable: the other paths of the source, built by the tests on a
# host that can run them (an AVX-512 host's native build never takes the AVX2 path)
FLAGS = {"native": ["-O3", "-march=native"], "avx2": ["-O3", "-mavx2", "-mfma"],
         "portable": ["-O3"]}


def cache_root() -> Path:
    return Path(os.environ.get("FBI_CACHE", "~/.cache/fbi")).expanduser() / "kernels"


def host_signature() -> str:
    """What a native build depends on: the CPU (model and flags), the compiler, torch."""
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = "\n".join(sorted({line for line in info.splitlines()
                                if line.startswith(("model name", "flags"))}))
    except OSError:  # not Linux: the machine and processor names are what is known
        pass
    compiler = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 check=False).stdout
    except OSError as e:
        raise RuntimeError(f"fbi kernels: no C++ compiler ({compiler}: {e}); install g++ "
                           "or set CXX, or run with --kernel dense") from e
    return "\n".join([platform.machine(), cpu, version, torch.__version__, SOURCE.read_text()])


@functools.cache
def extension(variant: str = "native"):
    """The compiled module (``sign_matmul``, decode's ``sign_linear``, prefill's
    ``sign_weight``, ``split_int8`` and ``combine_int8``, the head's ``bf16_matmul``,
    ``simd_path``), built once per host."""
    from torch.utils.cpp_extension import load

    if variant not in FLAGS:
        raise ValueError(f"kernel variant {variant!r}: choose one of {', '.join(FLAGS)}")
    key = hashlib.sha256(f"{variant}\n{host_signature()}".encode()).hexdigest()[:16]
    folder = cache_root() / f"sign_matmul_{variant}_{key}"
    folder.mkdir(parents=True, exist_ok=True)
    log.info("fbi kernels: loading the %s CPU kernel from %s (built there on first use)",
             variant, folder)
    return load(name=f"fbi_sign_matmul_{variant}_{key}", sources=[str(SOURCE)],
                extra_cflags=[*FLAGS[variant], "-fopenmp"], extra_ldflags=["-fopenmp"],
                build_directory=str(folder), verbose=False)


# From this many tokens on (prefill), int8_matmul beats sign_matmul's masked adds:
# python bench/packed_kernels.py --crossover measures it.
PREFILL_TOKENS = 32

_scratch = threading.local()  # each thread's int8 sign matrix for prefill


def sign_matmul(bits: torch.Tensor, u: torch.Tensor, variant: str = "native") -> torch.Tensor:
    """``u @ S^T`` (n, rows) for S = +-1 from ``bits`` (rows, bytes) uint8 and u (n, 8 bytes)
    float32 by the kernel's masked adds: decode's product, no dense weight exists."""
    return extension(variant).sign_matmul(bits, u)


@functools.cache
def looks_up(variant: str = "native") -> bool:
    """Whether this build decodes by table lookup (AVX-512) rather than by masked adds."""
    return extension(variant).simd_path() == "avx512"


def lut_layout(bits: torch.Tensor, planes: int) -> torch.Tensor:
    """Decode's lookup layout of ``bits`` (planes x rows, bytes): (planes, blocks of 16 rows,
    bytes, 16), byte k of a block's 16 rows side by side, each plane's rows padded with zero
    bits to a whole block."""
    rows, nb = bits.shape[0] // planes, bits.shape[1]
    blocks = bits.view(planes, rows, nb)
    if rows % 16:  # a padded copy only where the last block is short: one copy less at first decode
        blocks = torch.nn.functional.pad(blocks, (0, 0, 0, -rows % 16))
    return blocks.view(planes, -1, 16, nb).transpose(2, 3).contiguous()


def sign_linear(form, x: torch.Tensor, variant: str = "native") -> torch.Tensor:
    """Decode's whole layer for x (..., in) float32, contiguous (``form``: its
    ``forms.SignProduct``): the sign product of the rescaled input, the output scales and the
    rank-1 term in one call, (..., out)."""
    lut = None
    if looks_up(variant):  # the layout is made at the layer's first decode call
        if form.lut is None:
            form.lut = lut_layout(form.bits, form.planes)
        lut = form.lut
    return extension(variant).sign_linear(form.bits, lut, x, form.planes, form.in_scale,
                                          form.out_scale, form.beta_in, form.beta_out)


def int8_matmul(bits: torch.Tensor, u: torch.Tensor, variant: str = "native",
                planes: int = 1) -> torch.Tensor:
    """``u @ S^T`` by torch's int8 GEMM (``torch._int_mm``, oneDNN: AMX where the CPU has it):
    S, the sum of ``planes`` sign matrices, written as int8 (1 byte a weight) into this thread's
    reused buffer (one layer at a time, the largest seen: 11.5 MB at fbi_1p3b's MLP, 45 MB at
    7B), u split into three int8 pieces (``sign_matmul.cpp``), so every product is exact and the
    result is u's to 2^-24 of each token's largest input, as fine as fp32's own rounding."""
    ext = extension(variant)
    need = bits.shape[0] // planes * u.shape[1]
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < need:
        _scratch.buffer = buffer = None  # free the smaller one before allocating
        buffer = _scratch.buffer = torch.empty(need, dtype=torch.int8)
    s = ext.sign_weight(bits, planes, u.shape[1], buffer)
    q, scale = ext.split_int8(u.contiguous())
    return ext.combine_int8(torch._int_mm(q, s.T), scale)


def bf16_matmul(weight: torch.Tensor, x: torch.Tensor, variant: str = "native") -> torch.Tensor:
    """``x @ weight^T`` (n, rows) for weight bfloat16 (rows, in) and x float32 (n, in), every
    product and sum in float32: the head as stored, read at 2 bytes a weight."""
    return extension(variant).bf16_matmul(weight, x)
