"""What evaluation, generation, export and the lm-eval adapter take: a trained causal LM,
wherever it was loaded from (fbi.trained loads run directories, exports and Hugging Face
checkpoints; fbi.export.packed writes and reads the packed format)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fbi.config import SchemeConfig
from fbi.data.tokenizer import Tokenizer


@dataclass
class Trained:
    model: torch.nn.Module
    logits: Callable[[torch.Tensor], torch.Tensor]  # (B, S) ids -> (B, S, V) logits
    tokenizer: Tokenizer
    start_id: int  # the token before a document: what conditions a text's first token
    max_length: int  # context the model was trained on (or its config allows)
    source: str
    model_cfg: object | None = None  # fbi models only: the architecture's config dataclass
    scheme_cfg: SchemeConfig | None = None
    # What a model card tells: step, tokens trained on, teacher, the run's own evaluations
    # (fbi.trained.run_provenance); carried through a packed export.
    provenance: dict = field(default_factory=dict)
