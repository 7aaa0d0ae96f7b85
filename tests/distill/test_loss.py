"""fbi.distill.loss against a direct float64 computation, plus its memory behaviour."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fbi.distill.loss import distillation_loss, mean_token_nll

B, S, V = 3, 37, 50  # 111 positions: chunk_rows=16 gives 7 chunks, the last one ragged


def _inputs(seed=0, teacher_dtype=torch.float32, shape=(B, S, V)):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(shape, generator=g)).requires_grad_()
    teacher = (3 * torch.randn(shape, generator=g)).to(teacher_dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[torch.rand(shape[:-1], generator=g) < 0.2] = -100
    labels[0, :5] = -100
    return student, teacher, labels


def _reference(student, teacher, labels, T, ce_weight):
    """(loss, distill, ce, d loss / d student) in float64, written out directly."""
    s = student.detach().double().requires_grad_()
    valid = labels != -100
    n = valid.sum()
    nll = -F.log_softmax(s, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ce = nll[valid].sum() / n
    if teacher is None:
        distill, loss = None, ce
    else:
        p_t = F.softmax(teacher.double() / T, dim=-1)
        soft_ce = -(p_t * F.log_softmax(s / T, dim=-1)).sum(-1)
        distill = T**2 * soft_ce[valid].sum() / n
        loss = (1 - ce_weight) * distill + ce_weight * ce
    loss.backward()
    return loss.detach(), distill, ce.detach(), s.grad


def _close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_matches_float64_reference(T, ce_weight):
    student, teacher, labels = _inputs()
    out = distillation_loss(student, teacher, labels, temperature=T, ce_weight=ce_weight,
                            chunk_rows=16)
    out.loss.backward()
    loss, distill, ce, grad = _reference(student, teacher, labels, T, ce_weight)
    _close(out.loss, loss)
    _close(out.distill, distill.detach())
    _close(out.ce, ce)
    assert out.tokens.item() == (labels != -100).sum().item()
    _close(student.grad, grad, atol=1e-8)
    assert not student.grad[labels == -100].any()


def test_bf16_teacher_fp32_student():
    student, teacher, labels = _inputs(seed=1, teacher_dtype=torch.bfloat16)
    out = distillation_loss(student, teacher, labels, temperature=2.0, ce_weight=0.3,
                            chunk_rows=16)
    out.loss.backward()
    loss, _, _, grad = _reference(student, teacher, labels, 2.0, 0.3)
    assert out.loss.dtype == torch.float32 and student.grad.dtype == torch.float32
    _close(out.loss, loss)
    _close(student.grad, grad, atol=1e-8)


def test_bf16_student_gets_bf16_gradient():
    student, teacher, labels = _inputs(seed=2, teacher_dtype=torch.bfloat16)
    student16 = student.detach().bfloat16().requires_grad_()
    distillation_loss(student16, teacher, labels, chunk_rows=16).loss.backward()
    _, _, _, grad = _reference(student16, teacher, labels, 1.0, 0.0)
    assert student16.grad.dtype == torch.bfloat16
    _close(student16.grad, grad, rtol=1e-2, atol=1e-5)


def test_no_teacher_is_cross_entropy_whatever_ce_weight():
    student, _, labels = _inputs(seed=3)
    expected = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(expected, student)
    out = distillation_loss(student, None, labels, ce_weight=0.0, chunk_rows=16)
    out.loss.backward()
    assert out.distill is None
    _close(out.loss, expected.detach())
    _close(out.ce, expected.detach())
    _close(student.grad, expected_grad, atol=1e-8)
    nll, tokens = mean_token_nll(student, labels, chunk_rows=16)
    _close(nll, expected.detach())
    assert tokens.item() == (labels != -100).sum().item()


def test_non_contiguous_student_and_scaled_backward():
    full, teacher, labels = _inputs(seed=4, shape=(B, S + 1, V))
    student = full[:, :-1]  # the usual shifted-logits slice: not viewable as (B*S, V)
    out = distillation_loss(student, teacher[:, 1:], labels[:, 1:], temperature=2.0,
                            ce_weight=0.3, chunk_rows=16)
    (3.0 * out.loss).backward()
    _, _, _, grad = _reference(student, teacher[:, 1:], labels[:, 1:], 2.0, 0.3)
    _close(full.grad[:, :-1], 3.0 * grad, atol=1e-8)
    assert not full.grad[:, -1].any()


def test_default_chunking_and_no_grad_give_the_same_values():
    student, teacher, labels = _inputs(seed=5)
    chunked = distillation_loss(student, teacher, labels, temperature=2.0, chunk_rows=7)
    with torch.no_grad():
        whole = distillation_loss(student, teacher, labels, temperature=2.0)
    assert chunked.loss.requires_grad and not whole.loss.requires_grad
    _close(whole.loss, chunked.loss.detach())
    _close(whole.ce, chunked.ce)


def test_all_positions_ignored_gives_zero_not_nan():
    student, teacher, _ = _inputs(seed=6)
    labels = torch.full((B, S), -100)
    out = distillation_loss(student, teacher, labels, ce_weight=0.3)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.tokens.item() == 0
    assert not student.grad.any()


def test_second_backward_is_refused():
    student, teacher, labels = _inputs(seed=7)
    out = distillation_loss(student, teacher, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        out.loss.backward()


def test_bad_inputs_are_refused_with_clear_messages():
    student, teacher, labels = _inputs()
    with pytest.raises(ValueError,
                       match=r"teacher vocabulary size 51 differs from the student's 50"):
        distillation_loss(student, torch.randn(B, S, V + 1), labels)
    with pytest.raises(ValueError, match=r"\(3, 36, 50\).*\(3, 37, 50\)"):
        distillation_loss(student, teacher[:, 1:], labels)
    with pytest.raises(ValueError, match=r"labels must be integer ids of shape \(3, 37\)"):
        distillation_loss(student, teacher, labels[:, 1:])
    with pytest.raises(ValueError, match="ce_weight"):
        distillation_loss(student, teacher, labels, ce_weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, labels, temperature=0.0)


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of storages allocated by ops run under it (forward and backward alike).

    An op output whose storage is not one of its inputs' is a fresh allocation; it counts
    until its storage is freed (the storage's finalizer fires when the C++ storage dies).
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        fresh = {}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                fresh[t.untyped_storage().data_ptr()] = t.untyped_storage()
        for storage in fresh.values():
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _naive(student, teacher, labels, temperature, ce_weight, chunk_rows):
    valid = labels != -100
    soft = -(F.softmax(teacher.float(), -1) * F.log_softmax(student, -1)).sum(-1)
    return (soft[valid].mean(),)


@pytest.mark.parametrize("loss_fn, holds_one_fp32_copy", [(distillation_loss, True),
                                                          (_naive, False)])
def test_at_most_one_full_size_fp32_tensor_is_live(loss_fn, holds_one_fp32_copy):
    student, teacher, labels = _inputs(seed=8, teacher_dtype=torch.bfloat16, shape=(4, 64, 512))
    full = student.numel() * 4
    tracker = _PeakLiveBytes()
    with tracker:
        loss = loss_fn(student, teacher, labels, temperature=2.0, ce_weight=0.3, chunk_rows=16)[0]
        loss.backward()
    # One full-size gradient (it becomes student.grad) plus chunk temporaries of 16 rows each.
    assert (tracker.peak < 1.5 * full) == holds_one_fp32_copy, tracker.peak / full


def test_no_grad_allocates_nothing_of_full_size():
    student, teacher, labels = _inputs(seed=9, teacher_dtype=torch.bfloat16, shape=(4, 64, 512))
    tracker = _PeakLiveBytes()
    with torch.no_grad(), tracker:
        distillation_loss(student, teacher, labels, temperature=2.0, chunk_rows=16)
    # Only chunk temporaries, each 1/16 of the logits here.
    assert tracker.peak < 0.5 * student.numel() * 4, tracker.peak / (student.numel() * 4)
