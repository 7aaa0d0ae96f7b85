"""Sampling from a trained model: a quick look at what it learned, and lm-eval's generation.

Generation runs with a key-value cache (the recurrent state for Mamba-2) where the model has
one: a Hugging Face checkpoint as it is, an fbi model through its ``transformers`` twin
(``fbi.export.hf.to_transformers``, the same function up to float rounding, built once by
``cached_model``): a packed export's layers on the packed kernels go in as they are (every
sign-only scheme, activation quantizers included), other scheme layers folded. Schemes that
neither run packed nor fold re-run the window of the last ``max_length`` tokens for every new
token. Either way generation stops at EOS and at the first stop string.

Past the trained context (``max_length``), both paths slide the window: each new token is
predicted from the last ``max_length`` tokens, never from positions the model was not trained
on. The cached path keeps its cache while the text fits the context, then re-runs the window
for every further token (a cache cannot slide: rotary positions shift with the window), with a
warning that it is now as slow as generation without a cache. So a prompt or an output longer
than the context gives the same tokens with or without the cache.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteria

from fbi.export.hf import CannotFold, to_transformers
from fbi.lm import Trained

log = logging.getLogger(__name__)


def cached_model(trained: Trained) -> PreTrainedModel | None:
    """The ``transformers`` model that generates ``trained``'s tokens with a cache, or None."""
    if isinstance(trained.model, PreTrainedModel):
        return trained.model
    try:
        return to_transformers(trained, keep_packed=True)
    except CannotFold:
        return None


class StopStrings(StoppingCriteria):
    """True once the text generated after the first ``prompt_length`` ids holds a stop string."""

    def __init__(self, trained: Trained, prompt_length: int, stop: Sequence[str]) -> None:
        self.decode, self.start, self.stop = trained.tokenizer.decode, prompt_length, list(stop)

    def __call__(self, ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = [any(s in self.decode(row[self.start:].tolist()) for s in self.stop) for row in ids]
        return torch.tensor(done, device=ids.device)


@torch.no_grad()
def generate_ids(
    trained: Trained,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stop: Sequence[str] = (),
    model: PreTrainedModel | None = None,
) -> list[int]:
    """New token ids after ``prompt_ids`` (its last ``max_length`` kept); greedy when
    ``temperature`` is 0. ``model``: ``cached_model(trained)`` to generate with its cache."""
    if temperature < 0:
        raise ValueError(f"--temperature: got {temperature}; choose 0 (greedy) or more")
    ids = list(prompt_ids)[-trained.max_length:]
    stopping = StopStrings(trained, len(ids), stop)
    if len(ids) + max_new_tokens > trained.max_length:
        warn_past_context(trained.max_length, model is not None)
    if model is not None:
        eos = trained.tokenizer.eos_id
        config = GenerationConfig(
            do_sample=temperature > 0, temperature=temperature or None,
            top_k=(top_k or None) if temperature else None, eos_token_id=eos, pad_token_id=eos)
        model = model.to(device)

        def step(window: list[int], count: int, criteria=None) -> list[int]:
            return model.generate(
                torch.tensor([window], device=device), generation_config=config,
                max_new_tokens=count, stopping_criteria=criteria,
                attention_mask=torch.ones(1, len(window), dtype=torch.long, device=device),
            )[0, len(window):].tolist()

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Within the context: one cached call (its stop strings counted from the prompt's
            # end). Past it: one token per call on the window, stops checked on the whole text.
            ids += step(ids, max(min(max_new_tokens, trained.max_length - len(ids)), 1),
                        [stopping] if stop else None)
            while len(ids) - stopping.start < max_new_tokens and not finished(
                    ids, trained, stopping, stop):
                ids += step(ids[-trained.max_length:], 1)
        return ids[stopping.start:]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-trained.max_length:]], device=device)
        logits = trained.logits(window)[0, -1].float().cpu()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = logits.topk(min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        ids.append(token)
        if finished(ids, trained, stopping, stop):
            break
    return ids[stopping.start:]


@functools.cache  # once per process: lm-eval asks for thousands of generations
def warn_past_context(context: int, cached: bool) -> None:
    log.warning("generating past the %d-token context the model was trained on: each token "
                "after it is predicted from the last %d tokens (a sliding window)%s", context,
                context, ", re-run whole: the cache cannot slide" if cached else "")


def finished(ids: list[int], trained: Trained, stopping: StopStrings, stop: Sequence[str]) -> bool:
    return ids[-1] == trained.tokenizer.eos_id or bool(stop and stopping(torch.tensor([ids]))[0])


def generate(trained: Trained, prompt: str, max_new_tokens: int = 64, **kwargs) -> str:
    """The prompt's continuation as text, conditioned on the document-start token first."""
    prompt_ids = [trained.start_id] + trained.tokenizer.encode([prompt])[0]
    new = generate_ids(trained, prompt_ids, max_new_tokens, **kwargs)
    if new and new[-1] == trained.tokenizer.eos_id:
        new = new[:-1]
    return trained.tokenizer.decode(new)
