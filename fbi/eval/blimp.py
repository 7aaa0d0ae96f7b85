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

from fbi.config import ConfigError
from fbi.data.tokenizer import Tokenizer
from fbi.eval.likelihood import continuation_logprobs
from fbi.progress import Progress


def read_pairs(paths: Sequence[str | Path]) -> list[dict]:
    """Pairs from jsonl files, or from every ``*.jsonl`` in a folder (sorted). A line that is
    not a JSON object with both sentences is refused naming the file, the line and the fix."""
    files = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    pairs = []
    for f in files:
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ConfigError(f"--blimp: {f} is not UTF-8 text ({err.reason} at byte {err.start}); "
                             "give BLiMP's jsonl files") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
            except ValueError as err:
                raise ConfigError(f"--blimp: {f} line {number} is not JSON ({err}); fix or remove "
                                 "the line") from None
            missing = [k for k in ("sentence_good", "sentence_bad")
                       if not isinstance(pair, dict) or not isinstance(pair.get(k), str)]
            if missing:
                raise ConfigError(f"--blimp: {f} line {number} lacks the fields {missing} of a "
                                 "minimal pair (text in sentence_good and sentence_bad); give "
                                 "BLiMP's jsonl files, or files of that shape")
            pairs.append(pair)
    if not pairs:
        raise ConfigError(f"--blimp: no minimal pairs in {[str(p) for p in paths]}; give "
                         "data/blimp or jsonl files of minimal pairs")
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
    with Progress("BLiMP", -(-len(sentences) // (batch_size * world_size)), "batches",
                  enabled=rank == 0) as progress:
        logprobs, _ = continuation_logprobs(
            logits_fn, [[start_id] + ids for ids in encoded], [len(ids) for ids in encoded],
            batch_size, device, rank, world_size, progress,
        )
    right = [good > bad for good, bad in zip(logprobs[0::2], logprobs[1::2])]
    groups: dict[str, list[bool]] = defaultdict(list)
    for pair, ok in zip(pairs, right):
        for key in ("UID", "field"):
            if key in pair:
                groups[f"{key}/{pair[key]}"].append(ok)
    return {"accuracy": sum(right) / len(right), "pairs": len(right),
            "groups": {k: sum(v) / len(v) for k, v in sorted(groups.items())}}
