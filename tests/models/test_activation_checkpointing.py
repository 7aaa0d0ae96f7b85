"""Activation checkpointing recomputes blocks in backward: same loss, same gradients."""

import torch

from fbi.config import ModelConfig, TrainConfig, ZeroConfig
from fbi.deepspeed_setup import activation_checkpointing
from fbi.models import build_model
from fbi.models.llama import DecoderLayer


def test_checkpointed_blocks_give_identical_gradients(monkeypatch):
    cfg = ModelConfig(n_layers=2, d_model=32, d_ff=64, n_heads=4, vocab_size=50)
    ids = torch.randint(0, 50, (2, 16))
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, "fbi", ["layers.*"])
        activation_checkpointing(model, TrainConfig(max_steps=10, zero=ZeroConfig(activation_checkpointing=enabled)))
        calls = []
        forward = DecoderLayer.forward
        monkeypatch.setattr(DecoderLayer, "forward", lambda *a: calls.append(1) or forward(*a))
        model(ids).logsumexp(-1).mean().backward()
        monkeypatch.undo()
        assert len(calls) == (4 if enabled else 2)  # each block ran again in backward
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
