"""Zero-shot accuracy on BLiMP-style minimal pairs (Warstadt et al., 2020).

Each line of a jsonl file holds ``sentence_good`` and ``sentence_bad`` (and BLiMP's ``UID``
and ``field``). A model is right on a pair when it gives the good sentence the higher total
log-probability, each sentence scored in full after the document-start token, as BLiMP's
own evaluation and lm-eval's ``blimp`` tasks do.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from fbi.data.tokenizer import Tokenizer
from fbi.eval.likelihood import continuation_logprobs


def read_pairs(paths: Sequence[str | Path]) -> list[dict]:
    """Pairs from jsonl files, or from every ``*.jsonl`` in a folder (sorted)."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    pairs = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    if not pairs:
        raise FileNotFoundError(f"--blimp: no minimal pairs in {[str(p) for p in paths]}")
    missing = [k for k in ("sentence_good", "sentence_bad") if k not in pairs[0]]
    if missing:
        raise ValueError(f"--blimp: {files[0]} lacks the fields {missing} of a minimal pair")
    return pairs


def blimp_accuracy(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Tokenizer,
    start_id: int,
    pairs: list[dict],
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Accuracy over all pairs, and per ``UID`` (phenomenon) and ``field`` when given."""
    sentences = [p[k] for p in pairs for k in ("sentence_good", "sentence_bad")]
    encoded = tokenizer.encode(sentences)
    logprobs, _ = continuation_logprobs(
        logits_fn, [[start_id] + ids for ids in encoded], [len(ids) for ids in encoded],
        batch_size, device, rank, world_size,
    )
    right = [good > bad for good, bad in zip(logprobs[0::2], logprobs[1::2])]
    groups: dict[str, list[bool]] = defaultdict(list)
    for pair, ok in zip(pairs, right):
        for key in ("UID", "field"):
            if key in pair:
                groups[f"{key}/{pair[key]}"].append(ok)
    return {"accuracy": sum(right) / len(right), "pairs": len(right),
            "groups": {k: sum(v) / len(v) for k, v in sorted(groups.items())}}
