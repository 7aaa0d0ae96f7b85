"""Binary-network diagnostics every ``logging.diagnostics_every`` steps, per layer type
(``q_proj``, ``down_proj``, ...) over all blocks:

- ``flip/<type>``: share of latent weights whose sign changed since the previous diagnostics
  step (a binary network learns only through sign flips; a share falling to ~0 means the
  binary weights froze);
- ``near_zero/<type>``: share of latent weights with ``|w| < 0.01 * mean |w|`` of the layer
  type (the weights whose sign the next updates may flip);
- ``<scale>_mean|min|max/<type>``: statistics of the scheme's scales (FBI-LLM's alpha and
  beta, ...), which collapse towards 0 when the binary layer stops carrying signal.

Each rank looks at its own share of the weights (its ZeRO-3 partition, otherwise every
``world_size``-th element), keeps one sign bit per element of that share as a bool, and the
counts are all-reduced: the cost is one pass over the weights per diagnostics step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fbi.binarize import DenseLinear, binarized_layers
from fbi.callbacks import Callback, Control

NEAR_ZERO = 0.01


def _local(p: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
        return p.ds_tensor.detach().view(-1)
    return p.detach().view(-1)[rank::world_size]


class BinaryDiagnostics(Callback):
    def __init__(self, model: torch.nn.Module, every: int, rank: int, world_size: int):
        self.every, self.rank, self.world_size = every, rank, world_size
        self.groups: dict[str, list[DenseLinear]] = {}
        for name, module in binarized_layers(model).items():
            self.groups.setdefault(name.rsplit(".", 1)[-1], []).append(module)
        self.signs: dict[int, torch.Tensor] = {}  # id(module) -> previous sign bits
        self.device = next(model.parameters()).device

    def after_step(self, run, state, metrics, control: Control) -> None:
        if not self.every or not self.groups or state["step"] % self.every:
            return
        metrics.update(self.measure())
        control.log = True

    def _reduce(self, values: list[float], op) -> list[float]:
        if not values:
            return []
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=op)
        return t.tolist()

    @torch.no_grad()
    def measure(self) -> dict:
        first = not self.signs
        weights = {g: [_local(m.weight, self.rank, self.world_size) for m in ms]
                   for g, ms in self.groups.items()}
        sums, mins, maxs = [], [], []
        for group, modules in self.groups.items():
            flips = 0
            for m, w in zip(modules, weights[group]):
                positive = w > 0
                if id(m) in self.signs:
                    flips += int((positive != self.signs[id(m)]).sum())
                self.signs[id(m)] = positive
            sums += [flips, sum(w.numel() for w in weights[group]),
                     sum(float(w.abs().sum(dtype=torch.float64)) for w in weights[group])]
            for scale in modules[0].SCALES:
                v = torch.cat([_local(getattr(m, scale), self.rank, self.world_size).float()
                               for m in modules])
                sums += [float(v.sum()), v.numel()]
                mins.append(float(v.min()) if v.numel() else float("inf"))
                maxs.append(float(v.max()) if v.numel() else float("-inf"))
        sums = self._reduce(sums, dist.ReduceOp.SUM)
        mins = self._reduce(mins, dist.ReduceOp.MIN)
        maxs = self._reduce(maxs, dist.ReduceOp.MAX)
        out, below, counts, i, j = {}, [], [], 0, 0
        for group, modules in self.groups.items():
            flips, elements, abs_sum = sums[i:i + 3]
            counts.append(elements)
            if not first:
                out[f"flip/{group}"] = flips / elements
            threshold = NEAR_ZERO * abs_sum / elements
            below.append(sum(int((w.abs() < threshold).sum()) for w in weights[group]))
            i += 3
            for scale in modules[0].SCALES:
                out[f"{scale}_mean/{group}"] = sums[i] / max(sums[i + 1], 1)
                out[f"{scale}_min/{group}"], out[f"{scale}_max/{group}"] = mins[j], maxs[j]
                i, j = i + 2, j + 1
        below = self._reduce(below, dist.ReduceOp.SUM)
        for k, group in enumerate(self.groups):
            out[f"near_zero/{group}"] = below[k] / counts[k]
        return out
