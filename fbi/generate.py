"""Sampling from a trained model: a quick look at what it learned, and lm-eval's generation.

Generation runs with a key-value cache (the recurrent state for Mamba-2) where the model has
one: a Hugging Face checkpoint as it is, an fbi model through its ``transformers`` twin
(``fbi.export.hf.to_transformers``, the same function up to float rounding, built once by
``cached_model``): a packed export's layers on the packed kernels go in as they are (every
sign-only scheme, activation quantizers included), other scheme layers folded. Schemes that
neither run packed nor fold re-run the window of the last ``max_length`` tokens for every new
token. Either way generation stops at EOS and at the first stop string.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, StoppingCriteria

from fbi.export.hf import CannotFold, to_transformers
from fbi.lm import Trained


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
    if model is not None:
        eos = trained.tokenizer.eos_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature or None, top_k=(top_k or None) if temperature else None,
            eos_token_id=eos, pad_token_id=eos)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = model.to(device).generate(
                torch.tensor([ids], device=device), generation_config=config,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                stopping_criteria=[stopping] if stop else None)
        return out[0, len(ids):].tolist()
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
        if token == trained.tokenizer.eos_id or (stop and stopping(torch.tensor([ids]))[0]):
            break
    return ids[stopping.start:]


def generate(trained: Trained, prompt: str, max_new_tokens: int = 64, **kwargs) -> str:
    """The prompt's continuation as text, conditioned on the document-start token first."""
    prompt_ids = [trained.start_id] + trained.tokenizer.encode([prompt])[0]
    new = generate_ids(trained, prompt_ids, max_new_tokens, **kwargs)
    if new and new[-1] == trained.tokenizer.eos_id:
        new = new[:-1]
    return trained.tokenizer.decode(new)
