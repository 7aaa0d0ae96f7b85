"""The online teacher source: frozen, its identity, and its context checked at start-up."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from fbi.config import ConfigError
from fbi.distill.teacher import NoTeacher, OnlineTeacher
from fbi.distill.teacher_checkpoint import teacher_info
from fbi_testing import make_teacher


def test_online_teacher_is_frozen_and_returns_the_models_logits(teacher_dir):
    source = OnlineTeacher(teacher_dir, "float32", torch.device("cpu"), seq_len=32)
    assert not source.model.training
    assert not any(p.requires_grad for p in source.model.parameters())
    inputs = torch.randint(0, source.vocab_size, (2, 32))
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=inputs).logits
    assert torch.equal(source.targets([0, 1], inputs), expected)
    assert NoTeacher().targets([0, 1], inputs) is None


def test_a_sequence_longer_than_the_teachers_context_is_refused(teacher_dir):
    assert teacher_info(teacher_dir)["context"] == 256
    with pytest.raises(ConfigError, match=r"data.seq_len: 300 tokens exceed the teacher's "
                                          r"context of 256"):
        OnlineTeacher(teacher_dir, "float32", torch.device("cpu"), seq_len=300)


def test_fingerprint_tells_teachers_apart(teacher_dir, tokenizer_dir, tmp_path):
    other = make_teacher(tmp_path / "other", tokenizer_dir, seed=1)
    same = make_teacher(tmp_path / "same", tokenizer_dir, seed=0)
    assert teacher_info(teacher_dir)["fingerprint"] == teacher_info(same)["fingerprint"]
    assert teacher_info(teacher_dir)["fingerprint"] != teacher_info(other)["fingerprint"]
