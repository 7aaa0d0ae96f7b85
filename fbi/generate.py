"""Sampling from a trained model: a quick look at what it learned.

No key-value cache: every new token runs the whole (at most ``max_length``-token) window
again, which is fine for short samples from small models.
"""

from __future__ import annotations

import torch

from fbi.lm import Trained


@torch.no_grad()
def generate_ids(
    trained: Trained,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    device: torch.device | str = "cpu",
) -> list[int]:
    """New token ids after ``prompt_ids``; greedy when ``temperature`` is 0."""
    if temperature < 0:
        raise ValueError(f"--temperature: got {temperature}; choose 0 (greedy) or more")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt_ids)
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
        if stop_at_eos and token == trained.tokenizer.eos_id:
            break
    return ids[len(prompt_ids):]


def generate(trained: Trained, prompt: str, max_new_tokens: int = 64, **kwargs) -> str:
    """The prompt's continuation as text, conditioned on the document-start token first."""
    prompt_ids = [trained.start_id] + trained.tokenizer.encode([prompt])[0]
    new = generate_ids(trained, prompt_ids, max_new_tokens, **kwargs)
    if new and new[-1] == trained.tokenizer.eos_id:
        new = new[:-1]
    return trained.tokenizer.decode(new)
