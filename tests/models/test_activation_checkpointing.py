"""Activation checkpointing recomputes each architecture's blocks in backward, wrapped from
outside: same loss, same gradients, same module paths."""

import pytest
import torch

from fbi.config import TrainConfig, ZeroConfig
from fbi.models.llama import ModelConfig
from fbi.models.mamba2 import Mamba2Config
from fbi.deepspeed_setup import activation_checkpointing
from fbi.models import architecture, build_model

CONFIGS = [ModelConfig(n_layers=2, d_model=32, d_ff=64, n_heads=4, vocab_size=50),
           Mamba2Config(n_layers=2, d_model=32, d_state=8, head_dim=16, chunk_size=4, vocab_size=50)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.arch)
def test_checkpointed_blocks_give_identical_gradients(monkeypatch, cfg):
    ids = torch.randint(0, 50, (2, 16))
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, "fbi")
        names = [n for n, _ in model.named_parameters()]
        activation_checkpointing(model, TrainConfig(model=cfg, max_steps=10,
                                                    zero=ZeroConfig(activation_checkpointing=enabled)))
        assert [n for n, _ in model.named_parameters()] == names
        calls = []
        block_cls = type(architecture(cfg).blocks(model)[0])
        forward = block_cls.forward
        monkeypatch.setattr(block_cls, "forward", lambda *a: calls.append(1) or forward(*a))
        model(ids).logsumexp(-1).mean().backward()
        monkeypatch.undo()
        assert len(calls) == (4 if enabled else 2)  # each block ran again in backward
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
