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
    """The compiled module (``sign_matmul``, ``simd_path``), built once per host."""
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


# From this many tokens on, blocks unpacked for torch's GEMM beat the masked adds: about 20-30
# on this 2-core Xeon when idle, up to ~200 when it is shared (the GEMM suffers more);
# python bench/packed_kernels.py --crossover measures it.
PREFILL_TOKENS = 32
PREFILL_ROWS = 256  # rows unpacked at a time: 256 x 5632 fp32 is 5.8 MB


def sign_matmul(bits: torch.Tensor, u: torch.Tensor, variant: str = "native") -> torch.Tensor:
    """``u @ S^T`` for S = +-1 from ``bits`` (rows, bytes) uint8 and u (n, 8 bytes) float32:
    the kernel's masked adds for decode-sized batches; from ``PREFILL_TOKENS`` tokens on, blocks
    of ``PREFILL_ROWS`` rows unpacked to +-1 fp32 for torch's matmul (its fused multiply-adds
    win once every bit serves many tokens; only one block is ever dense)."""
    if u.shape[0] < PREFILL_TOKENS:
        return extension(variant).sign_matmul(bits, u)
    return unpacked_matmul(bits, u, variant)


def unpacked_matmul(bits: torch.Tensor, u: torch.Tensor, variant: str = "native") -> torch.Tensor:
    """``u @ S^T`` by blocks of ``PREFILL_ROWS`` rows unpacked into one reused fp32 buffer."""
    ext = extension(variant)
    y = u.new_empty(u.shape[0], bits.shape[0])
    block = u.new_empty(min(PREFILL_ROWS, bits.shape[0]), u.shape[1])
    for r in range(0, bits.shape[0], PREFILL_ROWS):
        w = ext.unpack(bits[r:r + PREFILL_ROWS], block)
        torch.matmul(u, w.T, out=y[:, r:r + PREFILL_ROWS])
    return y
