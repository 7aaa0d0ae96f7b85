"""FBI-LLM autoregressive distillation loss, computed in chunks of positions.

    distill = T**2 * mean_valid( -sum_v p_t(v) log p_s(v) )
              with p_t = softmax(z_t / T), p_s = softmax(z_s / T)
    ce      = mean_valid( -log softmax(z_s)[y] )
    loss    = (1 - ce_weight) * distill + ce_weight * ce        (loss = ce when there is no teacher)

At T = 1 and ce_weight = 0 this is exactly FBI-LLM's loss (arXiv:2407.07093, eq. 7); the T**2
factor is Hinton et al.'s, so the gradient's size does not depend on T.

Sparse targets (fbi.distill.targets.SparseTargets: ids, weights w, tail mass r) replace the
soft cross-entropy by the one over the listed ids plus, for top-k, "every other token" as
one class:

    distill = T**2 * mean_valid( -sum_k w_k log p_s(id_k) - r log sum_{v not listed} p_s(v) )

Dense logits are the case w = p_t over all V ids, r = 0.

Comparable across sources. ``distill`` is each source's own loss, and a lumped top-k tail
leaves out the tail's spread, so it reads below the dense loss for the same student.
``soft_ce`` estimates the full-vocabulary term alike for every source:

    soft_ce = T**2 * mean_valid( -sum_k w_k log p_s(id_k) - r log sum_{v not listed} p_s(v)
                                 + r * H(p_s restricted to the ids not listed) )

which is exact for dense logits, unbiased for sampled ones (r = 0: equal to ``distill``),
and exact for top-k when the teacher's tail has the student's shape (the one assumption
that needs nothing the cache does not store). With the label tail (``label_slot``) the
loss puts r on the label, but ``soft_ce`` reads the same top-k ids and r as the lumped
form: the label is one token of the data, not the teacher's tail, and a student that has
learnt the labels would otherwise read low by the tail's spread.

Memory. The logits are the largest activations of an LLM (B*S*V), so the loss never holds a
full-size fp32 copy of them: positions are processed `chunk_rows` at a time, each chunk is
upcast to fp32, and the gradient w.r.t. the student logits is derived analytically and written
into one preallocated buffer of the student logits' shape and dtype. Nothing else of full size
is allocated, in forward or backward. The buffer is separate from the logits rather than
written over them in place: in-place would save one more full-size tensor, but would silently
corrupt any later use of the logits (accuracy metrics, a second loss) that autograd's version
check cannot see, since nothing saves the logits for backward.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from fbi.distill.targets import SparseTargets, Targets

# Per fp32 chunk temporary; a chunk makes about five of them. Derived rows do not depend on V.
DEFAULT_CHUNK_BYTES = 256 * 2**20


class LossOutput(NamedTuple):
    """`loss` carries the autograd graph; the others are detached fp32 scalars for logging.

    `distill` and `soft_ce` are None without a teacher. `ce` is the mean token NLL (the
    perplexity's log), `tokens` the number of positions it averages over
    (labels != ignore_index).
    """

    loss: Tensor
    distill: Tensor | None
    ce: Tensor
    tokens: Tensor
    soft_ce: Tensor | None


def distillation_loss(
    student_logits: Tensor,
    teacher: Targets | None,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> LossOutput:
    """Distillation (+ optional hard-label CE) loss of (B, S, V) student logits.

    teacher: dense (B, S, V) logits of any float dtype (bf16 is typical), sparse targets
        (SparseTargets of (B, S, K) ids and weights, (B, S) tail or None), or None for plain CE.
    labels: (B, S) integer next-token ids; positions equal to `ignore_index` are excluded.
    chunk_rows: positions per chunk; None derives it from DEFAULT_CHUNK_BYTES and V.
    A batch with no valid position gives loss 0 and a zero gradient, not NaN.
    The gradient is computed in forward when needed, so `loss.backward()` may run once only.
    """
    _check(student_logits, teacher, labels, temperature, ce_weight, chunk_rows)
    vocab = student_logits.shape[-1]
    rows = chunk_rows or max(1, DEFAULT_CHUNK_BYTES // (4 * vocab))
    # autograd.Function takes tensors, not tuples: sparse targets travel as their four fields.
    sparse = teacher if isinstance(teacher, SparseTargets) else SparseTargets(None, None, None)
    dense = teacher if isinstance(teacher, Tensor) else None
    args = (student_logits, dense, *sparse, labels, temperature, ce_weight, ignore_index, rows)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss, distill, ce, tokens, soft_ce = _ChunkedDistillation.apply(*args)
    else:
        loss, distill, ce, tokens, soft_ce = _loss_and_grad(*args, grad=None)
    if teacher is None:
        distill = soft_ce = None
    return LossOutput(loss, distill, ce, tokens, soft_ce)


@torch.no_grad()
def mean_token_nll(
    logits: Tensor, labels: Tensor, *, ignore_index: int = -100, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """(mean NLL in nats, number of valid tokens) of (B, S, V) logits; for perplexity."""
    out = distillation_loss(logits, None, labels, ignore_index=ignore_index, chunk_rows=chunk_rows)
    return out.ce, out.tokens


def _check(student, teacher, labels, temperature, ce_weight, chunk_rows) -> None:
    if student.dim() != 3 or not student.is_floating_point():
        raise ValueError(f"student logits must be a float (B, S, V) tensor, got "
                         f"{student.dtype} of shape {tuple(student.shape)}")
    if labels.shape != student.shape[:-1] or labels.is_floating_point():
        raise ValueError(f"labels must be integer ids of shape {tuple(student.shape[:-1])} "
                         f"(the student logits' (B, S)), got {labels.dtype} {tuple(labels.shape)}")
    if isinstance(teacher, SparseTargets):
        _check_sparse(student, teacher)
    elif teacher is not None:
        if teacher.shape[-1] != student.shape[-1]:
            raise ValueError(f"teacher vocabulary size {teacher.shape[-1]} differs from the "
                             f"student's {student.shape[-1]}; they must share one tokenizer")
        if teacher.shape != student.shape or not teacher.is_floating_point():
            raise ValueError(f"teacher logits {teacher.dtype} {tuple(teacher.shape)} do not match "
                             f"student logits {tuple(student.shape)}; expected a float tensor "
                             f"of the same shape")
        if teacher.device != student.device:
            raise ValueError(f"teacher logits are on {teacher.device}, student logits on "
                             f"{student.device}; move them to one device")
    if labels.device != student.device:
        raise ValueError(f"labels are on {labels.device}, student logits on {student.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1], got {ce_weight}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")


def _check_sparse(student: Tensor, t: SparseTargets) -> None:
    lead = tuple(student.shape[:-1])
    if t.ids.dim() != 3 or tuple(t.ids.shape[:-1]) != lead or t.ids.is_floating_point():
        raise ValueError(f"sparse target ids must be integer (B, S, K) with (B, S) = {lead}, "
                         f"got {t.ids.dtype} {tuple(t.ids.shape)}")
    if t.weights.shape != t.ids.shape or not t.weights.is_floating_point():
        raise ValueError(f"sparse target weights must be float of the ids' shape "
                         f"{tuple(t.ids.shape)}, got {t.weights.dtype} {tuple(t.weights.shape)}")
    if t.tail is not None and (tuple(t.tail.shape) != lead or not t.tail.is_floating_point()):
        raise ValueError(f"sparse target tail must be float of shape {lead} or None, got "
                         f"{t.tail.dtype} {tuple(t.tail.shape)}")
    tensors = [t.ids, t.weights] + ([t.tail] if t.tail is not None else [])
    if any(x.device != student.device for x in tensors):
        raise ValueError(f"sparse targets must be on the student logits' device {student.device}")


def _kd_rows_and_grad(s_T: Tensor, lse_T: Tensor, target, temperature: float, want_grad: bool):
    """Per-row soft cross-entropy (without T**2), per-row ``soft_ce`` (without T**2; None
    when it is the loss itself), and the gradient w.r.t. s_T for one chunk.

    target: ("dense", (rows, V) teacher logits) or ("sparse", ids, weights, tail, label_slot),
    rows first. The gradient of  W lse - sum_k w_k s[id_k] - r lse_rest,  with W = sum_k w_k + r
    and lse_rest the log-sum-exp over the ids not listed, is
    W softmax(s) - w (at the ids) - r softmax_rest(s) (zero at the ids).
    ``s_T`` is not modified (it may alias the student's logits).
    """
    if target[0] == "dense":
        p_t = torch.softmax(target[1].float() / temperature, dim=-1)
        # -sum_v p_t log p_s = lse_T - <p_t, s_T>, since each row of p_t sums to 1.
        rows = lse_T - torch.linalg.vecdot(p_t, s_T)
        if not want_grad:
            return rows, None, None
        return rows, None, (s_T - lse_T.unsqueeze(-1)).exp_().sub_(p_t)
    _, ids, w, tail, label_slot = target
    ids, w = ids.long(), w.float()
    total = w.sum(-1) if tail is None else w.sum(-1) + tail.float()
    s_k = s_T.gather(-1, ids)
    rows = total * lse_T - (w * s_k).sum(-1)
    p_s = (s_T - lse_T.unsqueeze(-1)).exp_() if want_grad or tail is not None else None
    soft = None
    if tail is not None:
        r = tail.float()
        p_rest, rest = _outside(p_s, ids)
        rows = rows - r * (lse_T + rest.log())  # lse_rest = lse_T + log(rest)
        if label_slot:  # soft_ce reads the teacher's top-k and its whole tail r + w_label
            top, w_top, r_all = ids[..., :-1], w[..., :-1], r + w[..., -1]
            top_rest, top_mass = _outside(p_s, top)
            soft = (total * lse_T - (w_top * s_k[..., :-1]).sum(-1)
                    - r_all * (lse_T + top_mass.log())
                    + _spread(top_rest, top_mass, s_T, lse_T, r_all))
        else:
            soft = rows + _spread(p_rest, rest, s_T, lse_T, r)
    if not want_grad:
        return rows, soft, None
    g = p_s.mul_(total.unsqueeze(-1))
    if tail is not None:  # - r softmax_rest(s) = - (r / rest) p_s outside the ids
        g.sub_(p_rest.mul_((r / rest).unsqueeze(-1)))
    g.scatter_add_(-1, ids, -w)
    return rows, soft, g


def _outside(p_s: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The student's probabilities with ``ids`` zeroed, and their sum per row: summed
    directly (no 1 - sum cancellation), floored so that a student with no mass left gives a
    large loss, not inf. An id listed twice (a label-tail slot) is excluded once."""
    p_rest = p_s.scatter(-1, ids, 0.0)
    return p_rest, p_rest.sum(-1).clamp_(min=torch.finfo(torch.float32).tiny)


def _spread(p_rest: Tensor, rest: Tensor, s_T: Tensor, lse_T: Tensor, r: Tensor) -> Tensor:
    """r H(p_rest / rest) = r (log rest - sum_j p_rest_j (s_j - lse) / rest): what a lumped
    tail leaves out of the soft cross-entropy when the teacher's tail has the student's shape."""
    return r * (rest.log() - (torch.linalg.vecdot(p_rest, s_T) - rest * lse_T)
                / rest).clamp_(min=0.0)  # an entropy; the floor in _outside can undershoot


def _row_reader(x: Tensor):
    """Read rows [a, b) of a (B, S, V) tensor as (b - a, V) without copying it whole.

    A contiguous tensor is sliced as a view; any other (e.g. logits[:, :-1]) is gathered one
    chunk at a time, since flattening it would copy all B*S*V elements.
    """
    if x.is_contiguous():
        flat = x.view(-1, x.shape[-1])
        return lambda a, b: flat[a:b]
    lead = x.shape[:-1]
    return lambda a, b: x[torch.unravel_index(torch.arange(a, b, device=x.device), lead)]


def _target_reader(dense, ids, weights, tail, label_slot):
    """Rows [a, b) of the teacher's targets, in the form _kd_rows_and_grad takes; None
    without a teacher."""
    if dense is not None:
        read = _row_reader(dense)
        return lambda a, b: ("dense", read(a, b))
    if ids is None:
        return None
    read_ids, read_w = _row_reader(ids), _row_reader(weights)
    flat_tail = tail.reshape(-1) if tail is not None else None
    return lambda a, b: ("sparse", read_ids(a, b), read_w(a, b),
                         flat_tail[a:b] if flat_tail is not None else None, label_slot)


def _loss_and_grad(student, dense, ids, weights, tail, label_slot, labels, temperature,
                   ce_weight, ignore_index, chunk_rows, grad: Tensor | None):
    """Loss values, and, when `grad` (an (N, V) buffer) is given, d loss / d student into it."""
    n_rows, T = labels.numel(), temperature
    read_s = _row_reader(student)
    read_t = _target_reader(dense, ids, weights, tail, label_slot)  # None without a teacher
    flat_labels = labels.reshape(-1)
    tokens = (flat_labels != ignore_index).sum()
    inv_n = 1.0 / tokens.clamp(min=1).float()  # a tensor: no host sync on GPU
    # Without a teacher the loss is plain CE whatever ce_weight says.
    w_ce = ce_weight if read_t is not None else 1.0
    w_kd = 1.0 - w_ce
    distill_sum = torch.zeros((), dtype=torch.float32, device=student.device)
    ce_sum, soft_sum = torch.zeros_like(distill_sum), torch.zeros_like(distill_sum)
    for a in range(0, n_rows, chunk_rows):
        b = min(a + chunk_rows, n_rows)
        s = read_s(a, b).float()  # may alias `student` when it is fp32: never modified below
        y = flat_labels[a:b]
        valid = y != ignore_index
        y_safe = torch.where(valid, y, 0).unsqueeze(-1)
        lse = torch.logsumexp(s, dim=-1)
        ce_sum += torch.where(valid, lse - s.gather(-1, y_safe).squeeze(-1), 0.0).sum()
        kd_grad = None
        if read_t is not None:
            s_T, lse_T = (s, lse) if T == 1.0 else (s / T, None)
            if lse_T is None:
                lse_T = torch.logsumexp(s_T, dim=-1)
            kd_rows, soft, kd_grad = _kd_rows_and_grad(
                s_T, lse_T, read_t(a, b), T, want_grad=grad is not None and w_kd > 0)
            distill_sum += torch.where(valid, kd_rows, 0.0).sum()
            soft_sum += torch.where(valid, kd_rows if soft is None else soft, 0.0).sum()
        if grad is None:
            continue
        # d/dz_s of T**2 * (soft-CE at z_s/T) = T * (d soft-CE / d s_T);
        # d/dz_s of -log softmax(z_s)[y] = softmax(z_s) - onehot(y). Both over the mean's N.
        g = torch.zeros_like(s)
        if w_ce > 0:
            g.add_((s - lse.unsqueeze(-1)).exp_(), alpha=w_ce)
            g.scatter_add_(-1, y_safe, torch.full_like(y_safe, -w_ce, dtype=g.dtype))
        if kd_grad is not None:
            g.add_(kd_grad, alpha=w_kd * T)
        g.masked_fill_(~valid.unsqueeze(-1), 0.0).mul_(inv_n)
        grad[a:b].copy_(g)
    ce = ce_sum * inv_n
    distill = distill_sum * inv_n * T**2
    loss = w_kd * distill + w_ce * ce  # a new tensor even without a teacher (w_kd = 0)
    return loss, distill, ce, tokens, soft_sum * inv_n * T**2


class _ChunkedDistillation(torch.autograd.Function):
    """Forward computes the loss and its gradient together; backward only scales it."""

    @staticmethod
    def forward(ctx, student, dense, ids, weights, tail, label_slot, labels, temperature,
                ce_weight, ignore_index, chunk_rows):
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        out = _loss_and_grad(student, dense, ids, weights, tail, label_slot, labels, temperature,
                             ce_weight, ignore_index, chunk_rows,
                             grad=grad.view(-1, student.shape[-1]))
        ctx.grad = grad  # an intermediate, not an input/output: kept as a plain attribute
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        if ctx.grad is None:
            raise RuntimeError("distillation_loss supports one backward pass only: its gradient "
                               "buffer is scaled in place and released by the first")
        grad, ctx.grad = ctx.grad, None
        # In place: a second full-size tensor here would double the loss's peak memory.
        return (grad.mul_(grad_loss),) + (None,) * 10
