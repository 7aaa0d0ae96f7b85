"""The full-precision parts of a packed export run as stored: the output head and the token
embeddings keep the export's dtype (bfloat16 by default, ``--fp-dtype``) instead of a float32
copy, and compute in float32.

The head is decode's largest read after the binary layers shrank: 262 MB a token in fp32 at
LLaMA-2's vocabulary and d_model 2048, 131 MB as stored. ``StoredHead`` multiplies the stored
weights by the float32 input summed in float32 (``cpu.bf16_matmul``, each weight widened
exactly), so its logits are the float32 path's up to the order of the sums; prefill widens a
block of rows at a time for torch's float32 GEMM. ``StoredEmbedding`` widens the rows it looks
up. Both subclass torch's modules, so ``transformers`` takes them as its own head and
embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from fbi.kernels import cpu

BLOCK_ROWS = 4096  # prefill widens this many head rows at a time: 32 MB at d_model 2048


class StoredHead(nn.Linear):
    """``x @ weight^T`` in float32 from ``weight`` as stored (no bias: fbi's heads have none)."""

    def __init__(self, weight: nn.Parameter) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if w.dtype == torch.float32:
            y = flat @ w.T
        elif w.dtype == torch.bfloat16 and not w.is_cuda and flat.shape[0] < cpu.PREFILL_TOKENS:
            y = cpu.bf16_matmul(w, flat)
        else:
            y = torch.cat([flat @ w[r:r + BLOCK_ROWS].float().T
                           for r in range(0, self.out_features, BLOCK_ROWS)], dim=1)
        return y.view(*x.shape[:-1], self.out_features)


class StoredEmbedding(nn.Embedding):
    """Token embeddings looked up in the stored dtype, returned in float32."""

    def __init__(self, weight: nn.Parameter) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()
