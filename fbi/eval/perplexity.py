"""Perplexity: on the held-out split (during training, for the student and the teacher
alike) and on local text files in strided windows (after training, any model)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from fbi.data.shards import TokenShards
from fbi.distill.loss import mean_token_nll
from fbi.progress import Progress


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    data: TokenShards,
    batches: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
    progress: Progress | None = None,
) -> float | None:
    """exp(mean next-token NLL) over the first ``batches * batch_size`` samples, in order.

    ``should_stop`` is asked after every round (on every rank, so it may be a collective such
    as an agreed preemption flag); when it says so, evaluation ends early and returns None.

    Batch ``j`` goes to rank ``j % world_size``. Every rank runs the same number of forward
    passes, because ZeRO-3 gathers parameters collectively; a rank with no batch left runs
    a spare one and discards it. Sums are all-reduced, so every rank returns the same value.
    """
    n = min(data.num_samples, batches * batch_size)
    starts = list(range(0, n, batch_size))
    rounds = math.ceil(len(starts) / world_size)
    nll_and_count = torch.zeros(2, dtype=torch.float64, device=device)
    for r in range(rounds):
        j = r * world_size + rank
        real = j < len(starts)
        start = starts[j] if real else 0
        batch = torch.from_numpy(data.batch(range(start, min(start + batch_size, n)))).to(device)
        mean_nll, tokens = mean_token_nll(logits_fn(batch[:, :-1]), batch[:, 1:])
        if real:
            nll_and_count += torch.stack([mean_nll.double() * tokens, tokens.double()])
        if progress is not None:
            progress.update()
        if should_stop is not None and should_stop():
            return None
    if world_size > 1:
        dist.all_reduce(nll_and_count)
    return math.exp((nll_and_count[0] / nll_and_count[1]).item())


def read_text(path: Path, text_format: str = "plain") -> str:
    """A local text file as the field evaluates it. ``wikitext``: the lines of the WikiText
    release joined by blank lines, as ``"\\n\\n".join(dataset["text"])`` does over the
    Hugging Face dataset's rows (one row per line, newline kept), the usual evaluation of
    GPTQ, FBI-LLM and others; ``plain``: the file as it is."""
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"--format: got {text_format!r}; choose one of {', '.join(TEXT_FORMATS)}")
    text = Path(path).read_text(encoding="utf-8")
    if text_format == "wikitext":
        return "\n\n".join(text.splitlines(keepends=True))
    return text


TEXT_FORMATS = ("plain", "wikitext")


@torch.no_grad()
def strided_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    context: int,
    stride: int,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> tuple[float, int]:
    """(summed NLL, tokens scored) of a 1-D token sequence, in windows of ``context`` tokens
    moved by ``stride``: each window scores only the tokens no earlier window scored, given
    up to ``context - 1`` tokens before them (stride = context: disjoint windows, as the
    papers do; a smaller stride gives each token more context, as in ``transformers``'
    perplexity guide). Every token but the first is scored exactly once when stride <=
    context - 1; with disjoint windows each window's first token is not scored."""
    if not 0 < stride <= context:
        raise ValueError(f"--stride: got {stride}; choose 0 < stride <= --context ({context})")
    n = ids.numel()
    if n < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    nll, count, scored_to = 0.0, 0, 1  # the first token has no prefix
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        window = ids[begin:end].to(device)
        first = max(scored_to, begin + 1)  # the first target scored in this window
        logits = logits_fn(window[None, :-1])[0, first - begin - 1:].double()
        targets = window[first - begin:]
        nll -= torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().item()
        count += targets.numel()
        scored_to = end
        if progress is not None:
            progress.update()
        if end == n:
            break
    return nll, count


def windows(n: int, context: int, stride: int) -> int:
    """How many windows ``strided_nll`` runs over ``n`` tokens."""
    return min(len(range(0, max(n - 1, 1), stride)), 1 + max(0, -(-(n - context) // stride)))


def text_perplexity(trained, text: str, context: int, stride: int, device="cpu",
                    max_tokens: int | None = None, name: str = "text") -> dict:
    """Perplexity of a ``fbi.trained.Trained`` model on ``text`` (its first ``max_tokens``
    tokens when given), the document-start token (the BOS or separator training put before
    each document) prepended."""
    ids = torch.tensor([trained.start_id] + trained.tokenizer.encode([text])[0][:max_tokens])
    with Progress(f"perplexity of {name}", windows(ids.numel(), context, stride),
                  "windows") as progress:
        nll, count = strided_nll(trained.logits, ids, context, stride, device, progress)
    return {"ppl": math.exp(nll / count), "nll": nll, "tokens": count,
            "context": context, "stride": stride}
