"""Sparse teacher targets in fbi.distill.loss: top-k against a float64 reference restricted to
the same support, and the sampled estimator's mean against the full-vocabulary loss."""

import pytest
import torch
import torch.nn.functional as F

from fbi.distill.cache_writer import encode_sampled, encode_topk
from fbi.distill.loss import distillation_loss
from fbi.distill.targets import SparseTargets, label_tail

B, S, V = 3, 8, 50


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(B, S, V, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(B, S, V, generator=g)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = -100
    return student, teacher, labels


def _topk_reference(student, teacher, labels, k, T, ce_weight):
    """float64: soft-CE over the teacher's top-k ids plus 'every other id' as one class."""
    s = student.detach().double().requires_grad_()
    p_t = F.softmax(teacher.double() / T, dim=-1)
    w, ids = p_t.topk(k, dim=-1)
    r = 1 - w.sum(-1)
    logp_s = F.log_softmax(s / T, dim=-1)
    listed = torch.zeros_like(p_t, dtype=torch.bool).scatter(-1, ids, True)
    log_rest = torch.logsumexp(logp_s.masked_fill(listed, float("-inf")), dim=-1)
    soft = -(w * logp_s.gather(-1, ids)).sum(-1) - r * log_rest
    valid = labels != -100
    nll = -F.log_softmax(s, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = ((1 - ce_weight) * T**2 * soft[valid] + ce_weight * nll[valid]).sum() / valid.sum()
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("T,ce_weight", [(1.0, 0.0), (2.0, 0.3)])
def test_topk_equals_the_loss_restricted_to_the_same_support(T, ce_weight):
    student, teacher, labels = _inputs()
    ids, logp, log_tail = encode_topk(teacher, 5, T)  # what the cache writer stores
    targets = SparseTargets(ids, logp.exp(), log_tail.exp())
    out = distillation_loss(student, targets, labels, temperature=T, ce_weight=ce_weight,
                            chunk_rows=7)
    out.loss.backward()
    loss, grad = _topk_reference(student, teacher, labels, 5, T, ce_weight)
    torch.testing.assert_close(out.loss, loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad, grad.float(), rtol=1e-5, atol=1e-7)


def test_full_support_sparse_equals_dense():
    student, teacher, labels = _inputs(seed=1)
    dense = distillation_loss(student, teacher, labels, temperature=2.0, chunk_rows=5)
    (g_dense,) = torch.autograd.grad(dense.loss, student)
    p_t = F.softmax(teacher / 2.0, dim=-1)
    ids = torch.arange(V).expand(B, S, V)
    for tail in (None, torch.zeros(B, S)):  # sampled form, and top-k with k = V
        sparse = distillation_loss(student, SparseTargets(ids, p_t, tail), labels,
                                   temperature=2.0, chunk_rows=5)
        (g_sparse,) = torch.autograd.grad(sparse.loss, student)
        torch.testing.assert_close(sparse.loss, dense.loss)
        torch.testing.assert_close(g_sparse, g_dense)


def test_sampled_estimator_is_unbiased_for_loss_and_gradient():
    """Mean over M independent draws -> the full-vocabulary loss and gradient.

    Bounds come from the draws' own spread: |mean - full| < 4 standard errors for the loss,
    and for the gradient the squared error of the mean below 3x its expectation
    (sum of per-element variances / M). The same bounds refuse the top-k estimator with
    as many slots (biased), which shows they are tight enough to fail.
    """
    student, teacher, labels = _inputs(seed=2)
    T, draws, M = 1.0, 8, 1500
    full = distillation_loss(student, teacher, labels, temperature=T)
    (g_full,) = torch.autograd.grad(full.loss, student)
    losses, grads = [], []
    for m in range(M):
        ids, counts = encode_sampled(teacher, draws, T, seed=m)
        assert (counts.sum(-1) == draws).all()
        out = distillation_loss(student, SparseTargets(ids, counts.float() / draws, None),
                                labels, temperature=T)
        (g,) = torch.autograd.grad(out.loss, student)
        losses.append(out.loss.detach().double())
        grads.append(g.double())
    losses, grads = torch.stack(losses), torch.stack(grads)
    se = losses.std() / M**0.5
    assert abs(losses.mean() - full.loss.double()) < 4 * se
    expected_sq = grads.var(dim=0).sum() / M
    assert ((grads.mean(0) - g_full.double()) ** 2).sum() < 3 * expected_sq

    ids, logp, _ = encode_topk(teacher, draws, T)  # renormalized top-k: biased
    biased = distillation_loss(student, SparseTargets(ids, logp.exp() / logp.exp().sum(-1,
                               keepdim=True), None), labels, temperature=T)
    (g_biased,) = torch.autograd.grad(biased.loss, student)
    assert abs(biased.loss.double() - full.loss.double()) > 3 * 4 * se
    assert ((g_biased.double() - g_full.double()) ** 2).sum() > 3 * 3 * expected_sq


def _exact_soft_ce(student, p_t, labels, T):
    """float64: T**2 * mean over valid positions of -sum_v p_t log softmax(s / T)."""
    logp_s = F.log_softmax(student.detach().double() / T, dim=-1)
    valid = labels != -100
    return T**2 * (-(p_t * logp_s).sum(-1))[valid].mean()


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_soft_ce_is_exact_for_dense_and_for_a_tail_shaped_like_the_students(T):
    """Every source reports the full soft cross-entropy: dense exactly; top-k (lumped tail,
    and the label tail) exactly when the teacher's tail has the student's shape, where the
    lumped ``distill`` misses the tail's spread."""
    student, teacher, labels = _inputs(seed=4)
    dense = distillation_loss(student, teacher, labels, temperature=T)
    p_dense = F.softmax(teacher.double() / T, dim=-1)
    torch.testing.assert_close(dense.soft_ce.double(), _exact_soft_ce(student, p_dense, labels, T))
    torch.testing.assert_close(dense.soft_ce, dense.distill)
    # a teacher whose probabilities outside its top 5 are the student's, rescaled
    ids, logp, _ = encode_topk(teacher, 5, T)
    w = logp.double().exp() * 0.7 / logp.double().exp().sum(-1, keepdim=True)
    q = F.softmax(student.detach().double() / T, dim=-1).scatter(-1, ids, 0.0)
    p_t = (0.3 * q / q.sum(-1, keepdim=True)).scatter(-1, ids, w)
    exact = _exact_soft_ce(student, p_t, labels, T)
    lumped = distillation_loss(student, SparseTargets(ids, w.float(), torch.full((B, S), 0.3)),
                               labels, temperature=T)
    torch.testing.assert_close(lumped.soft_ce.double(), exact)
    assert exact - lumped.distill.double() > 0.5  # the spread the lumped loss leaves out
    # The label tail's soft_ce reads the same top-k and tail, wherever the loss put the tail:
    # a student sure of the labels (as a trained one is) must not read low.
    sure = student.detach().clone()
    sure.scatter_add_(-1, labels.clamp(min=0).unsqueeze(-1), torch.full((B, S, 1), 6.0))
    q = F.softmax(sure.double() / T, dim=-1).scatter(-1, ids, 0.0)
    p_t = (0.3 * q / q.sum(-1, keepdim=True)).scatter(-1, ids, w)
    labelled = distillation_loss(sure, label_tail(SparseTargets(
        ids, w.float(), torch.full((B, S), 0.3)), labels.clamp(min=0)), labels, temperature=T)
    exact = _exact_soft_ce(sure, p_t, labels, T)
    torch.testing.assert_close(labelled.soft_ce.double(), exact, rtol=1e-6, atol=0.0)
    assert exact - labelled.distill.double() > 0.2  # the label tail's own loss reads low


def test_soft_ce_of_sampled_targets_is_unbiased():
    student, teacher, labels = _inputs(seed=5)
    exact = _exact_soft_ce(student, F.softmax(teacher.double(), dim=-1), labels, 1.0)
    values = []
    for m in range(400):
        ids, counts = encode_sampled(teacher, 8, 1.0, seed=m)
        out = distillation_loss(student, SparseTargets(ids, counts.float() / 8, None), labels)
        assert out.soft_ce.item() == out.distill.item()
        values.append(out.soft_ce.double())
    values = torch.stack(values)
    assert abs(values.mean() - exact) < 4 * values.std() / len(values) ** 0.5


def test_sampling_is_deterministic_in_its_seed():
    _, teacher, _ = _inputs(seed=3)
    a = encode_sampled(teacher, 16, 1.0, seed=7)
    b = encode_sampled(teacher, 16, 1.0, seed=7)
    c = encode_sampled(teacher, 16, 1.0, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_bad_sparse_targets_are_refused():
    student, teacher, labels = _inputs()
    ids, logp, tail = encode_topk(teacher, 4, 1.0)
    with pytest.raises(ValueError, match="weights must be float of the ids' shape"):
        distillation_loss(student, SparseTargets(ids, logp[..., :3].exp(), tail.exp()), labels)
    with pytest.raises(ValueError, match="tail must be float of shape"):
        distillation_loss(student, SparseTargets(ids, logp.exp(), tail[:, 1:]), labels)
    with pytest.raises(ValueError, match="ids must be integer"):
        distillation_loss(student, SparseTargets(ids.float(), logp.exp(), None), labels)


@pytest.mark.parametrize("with_tail", [True, False])
def test_sparse_targets_keep_the_one_full_size_tensor_bound(with_tail):
    from test_loss import _PeakLiveBytes

    g = torch.Generator().manual_seed(4)
    student = torch.randn(4, 64, 512, generator=g).requires_grad_()
    ids, logp, log_tail = encode_topk(torch.randn(4, 64, 512, generator=g), 32, 1.0)
    targets = SparseTargets(ids, logp.exp(), log_tail.exp() if with_tail else None)
    labels = torch.randint(0, 512, (4, 64), generator=g)
    tracker = _PeakLiveBytes()
    with tracker:
        distillation_loss(student, targets, labels, ce_weight=0.3, chunk_rows=16).loss.backward()
    # The gradient (it becomes student.grad) plus chunk temporaries of 16 rows each.
    assert tracker.peak < 1.5 * student.numel() * 4, tracker.peak / (student.numel() * 4)
