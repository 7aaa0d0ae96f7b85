"""What the cache stores per position and checks when it reads it: uint8 top-k units against
the float64 probabilities (precision, exact sum, unbiased rounding, unbiased loss), the row
checks, the label tail against a float64 reference, and the teacher's weight record."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fbi.config import ConfigError
from fbi.distill.cache_writer import encode_sampled, encode_topk
from fbi.distill.loss import distillation_loss
from fbi.distill.rows import (UNITS, bad_rows, decode_units, encode_units, sum_tolerance)
from fbi.distill.targets import SparseTargets, label_tail
from fbi.distill.teacher_checkpoint import BLOCK, check_weights, hash_weights, teacher_info

B, S, V, K = 2, 16, 300, 8


def _logits(seed=0, scale=3.0):
    return scale * torch.randn(B, S, V, generator=torch.Generator().manual_seed(seed))


def test_uint8_units_are_within_one_unit_and_sum_to_one_exactly():
    ids, logp, log_tail = encode_topk(_logits(), K, 1.0)
    units = encode_units(logp, log_tail, torch.Generator().manual_seed(1)).numpy()
    weights, tail = decode_units(units)
    p = logp.double().exp()
    assert (weights.double() - p).abs().max() < 1 / UNITS
    assert (tail.double() - log_tail.double().exp()).abs().max() <= K / UNITS
    assert (units.astype(int).sum(-1) <= UNITS).all()
    assert torch.equal(weights.double().mul(UNITS).round().sum(-1) + tail.double().mul(UNITS)
                       .round(), torch.full((B, S), float(UNITS), dtype=torch.float64))


def test_uint8_rounding_and_the_loss_from_it_are_unbiased():
    ids, logp, log_tail = encode_topk(_logits(1), K, 1.0)
    draws = 2000
    gen = torch.Generator().manual_seed(2)
    decoded = [decode_units(encode_units(logp, log_tail, gen).numpy()) for _ in range(draws)]
    mean_w = torch.stack([w for w, _ in decoded]).double().mean(0)
    # A unit's rounding error is at most one unit, so its sd is at most 1/2 unit.
    bound = 5 * 0.5 / UNITS / draws**0.5
    assert (mean_w - logp.double().exp()).abs().max() < bound
    # The loss is linear in the weights: its mean over roundings is the exact top-k loss.
    student = torch.randn(B, S, V, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, V, (B, S))
    exact = distillation_loss(student, SparseTargets(ids, logp.exp(), log_tail.exp()), labels)
    mean = torch.stack([distillation_loss(student, SparseTargets(ids, w, t), labels).loss
                        for w, t in decoded[:400]]).double().mean()
    assert abs(mean - exact.loss.double()) < 5 * (torch.stack(
        [distillation_loss(student, SparseTargets(ids, w, t), labels).loss
         for w, t in decoded[400:800]]).double().std() / 400**0.5)


def test_sampled_counts_stay_unbiased_as_stored():
    logits = _logits(4, scale=1.5)[:1, :2]
    p = F.softmax(logits.double(), -1)
    total = torch.zeros_like(p)
    n = 400
    for seed in range(n):
        ids, counts = encode_sampled(logits, 16, 1.0, seed)
        stored = counts.numpy().astype(np.uint8)  # as the cache keeps them
        total.scatter_add_(-1, ids, torch.from_numpy(stored).double() / 16)
    sd = (p * (1 - p) / (16 * n)).sqrt()
    assert ((total / n - p).abs() <= 5 * sd + 1e-12).all()


def _check(ids, weights, tail, value_dtype="float16"):
    return bad_rows(np.asarray(ids), weights, tail, V, sum_tolerance(value_dtype, K)
                    if tail is not None else 1e-5)


def test_good_rows_pass_and_zero_rows_and_bad_ids_are_found():
    ids, logp, log_tail = encode_topk(_logits(5), K, 1.0)
    w16, t16 = logp.half().float().exp(), log_tail.half().float().exp()
    assert _check(ids.numpy().astype(np.uint16), w16, t16) == []
    zero_ids = ids.numpy().astype(np.uint16).copy()
    zero_ids[1, 3] = 0
    w = w16.clone()
    w[1, 3] = 1.0  # exp(0): a float row never written
    t = t16.clone()
    t[1, 3] = 1.0
    assert [(i, what.split()[-1]) for i, what in _check(zero_ids, w, t)] == \
        [((1, 3), "zeros)"), ((1, 3), "one")]
    out = ids.numpy().astype(np.uint16).copy()
    out[0, 5, 2] = V
    assert _check(out, w16, t16) == [((0, 5), f"a token id >= the vocabulary size {V}")]
    # uint8 units: a zero row lists id 0 eight times; sampled: counts that sum to 0.
    units = encode_units(logp, log_tail, torch.Generator().manual_seed(0)).numpy()
    units[0, 0] = 0
    uw, ut = decode_units(units)
    assert [i for i, _ in bad_rows(zero_ids, uw, ut, V, 0.0)] == [(1, 3)]
    s_ids, counts = encode_sampled(_logits(6), 16, 1.0, 0)
    c = counts.float() / 16
    c[0, 7] = 0
    assert [i for i, _ in bad_rows(s_ids.numpy(), c, None, V, 1e-5)] == [(0, 7)]


def test_label_tail_matches_a_float64_reference():
    g = torch.Generator().manual_seed(7)
    teacher = 3 * torch.randn(B, S, V, generator=g)
    student = (2 * torch.randn(B, S, V, generator=g)).requires_grad_()
    ids, logp, log_tail = encode_topk(teacher, K, 1.0)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :4] = ids[0, :4, 2]  # some labels among the top-k
    got = distillation_loss(student, label_tail(SparseTargets(ids, logp.exp(), log_tail.exp()),
                                                labels), labels)
    got.loss.backward()
    s = student.detach().double().requires_grad_()
    logp_s = F.log_softmax(s, -1)
    w, r = logp.double().exp(), log_tail.double().exp()
    listed = torch.zeros(B, S, V, dtype=torch.bool).scatter(-1, ids, True)
    label_listed = listed.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lumped = torch.logsumexp(logp_s.masked_fill(listed, float("-inf")), -1)
    tail_term = torch.where(label_listed, -r * lumped,
                            -r * logp_s.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    reference = (-(w * logp_s.gather(-1, ids)).sum(-1) + tail_term).mean()
    reference.backward()
    assert label_listed.any() and not label_listed.all()
    torch.testing.assert_close(got.loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), s.grad, rtol=1e-4, atol=1e-7)


def _checkpoint(directory, megabytes=5):
    directory.mkdir()
    (directory / "config.json").write_text('{"vocab_size": 300}')
    rng = np.random.default_rng(0)
    rng.integers(0, 256, megabytes * BLOCK, dtype=np.uint8).tofile(directory / "model.safetensors")
    return directory


def test_a_teacher_changed_in_the_middle_of_a_weight_file_is_refused(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher")
    record = hash_weights(teacher, tmp_path / "blocks")
    check_weights(teacher, record, tmp_path / "blocks", "the cache")  # itself: accepted
    quick = teacher_info(teacher)["fingerprint"]
    weights = teacher / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:  # one byte in the third MiB
        f.seek(2 * BLOCK + 12345)
        byte = f.read(1)
        f.seek(2 * BLOCK + 12345)
        f.write(bytes([byte[0] ^ 1]))
    assert teacher_info(teacher)["fingerprint"] == quick  # the ends did not change
    with pytest.raises(ConfigError, match=r"model.safetensors is not the teacher the cache was "
                                          rf"made with \(bytes {2 * BLOCK}\.\.{3 * BLOCK} differ"):
        check_weights(teacher, record, tmp_path / "blocks", "the cache")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: sampled blocks
    with pytest.raises(ConfigError, match="differ"):
        check_weights(teacher, record, tmp_path / "blocks", "the cache")
    assert hash_weights(teacher, tmp_path / "b2")["fingerprint"] != record["fingerprint"]


def test_a_teacher_copied_without_its_mtimes_is_hashed_in_full_once(tmp_path, monkeypatch):
    from fbi.distill import teacher_checkpoint

    teacher = _checkpoint(tmp_path / "teacher", megabytes=20)
    record = hash_weights(teacher, tmp_path / "blocks")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in teacher.iterdir():  # as cp without -p: new mtimes
        (copy / f.name).write_bytes(f.read_bytes())
    read = []
    real = teacher_checkpoint.block_digests
    monkeypatch.setattr(teacher_checkpoint, "block_digests",
                        lambda path, blocks=None: read.append(len(blocks)) or real(path, blocks))
    for _ in range(3):  # three starts
        check_weights(copy, record, tmp_path / "blocks", "the cache")
    assert read == [20, 8, 8]
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:  # a rewrite in place gives a new mtime: hashed in full
        f.seek(13 * BLOCK + 7)
        f.write(b"\x00\x01")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=rf"bytes {13 * BLOCK}\.\.{14 * BLOCK} differ"):
        check_weights(copy, record, tmp_path / "blocks", "the cache")
    assert read[-1] == 20
