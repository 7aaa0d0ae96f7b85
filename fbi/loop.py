"""The training loop. Everything it calls is assembled in ``fbi.run``."""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist

from fbi import checkpoint
from fbi.config import TrainConfig
from fbi.data.sampler import GlobalSampler
from fbi.deepspeed_setup import init_distributed
from fbi.distill.loss import distillation_loss
from fbi.eval.blimp import blimp_accuracy, read_pairs
from fbi.eval.perplexity import perplexity
from fbi.metrics import Monitor
from fbi.preemption import PreemptionFlag
from fbi.run import Run, build_run
from fbi.trained import document_start_id

log = logging.getLogger("fbi")


def train_step(run: Run, micro_batches: list[list[int]]) -> dict:
    """One optimizer step over this rank's ``grad_accum`` micro-batches of sample ids."""
    cfg, engine = run.cfg, run.engine
    names = ["loss", "ce"] if run.teacher.kind == "none" else ["loss", "distill", "ce"]
    totals = torch.zeros(len(names), device=run.device)  # NCCL reduces device tensors only
    lr = engine.get_lr()[0]  # the rate this step uses; the scheduler moves on in engine.step
    for ids in micro_batches:
        batch = torch.from_numpy(run.train_data.batch(ids)).to(run.device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        targets = run.teacher.targets(ids, inputs)  # dense logits, sparse targets or None
        out = distillation_loss(
            engine(inputs), targets, labels,
            temperature=cfg.distill.temperature, ce_weight=cfg.distill.ce_weight,
        )
        engine.backward(out.loss)
        engine.step()
        totals += torch.stack([getattr(out, n).detach().float() for n in names])
    totals /= run.grad_accum
    if run.dist.world_size > 1:
        dist.all_reduce(totals)
        totals /= run.dist.world_size
    metrics = {**dict(zip(names, totals.tolist())), "lr": lr}
    grad_norm = engine.get_global_grad_norm()  # DeepSpeed reports it under ZeRO and bf16/fp16
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def evaluate(run: Run, should_stop=None, teacher: bool = True) -> dict | None:
    """Validation perplexity of the student (and of the teacher, when there is one and
    ``teacher``), BLiMP accuracy when ``eval_blimp`` names pairs; None when ``should_stop``
    (asked after every batch round on all ranks) ended it early."""
    interrupted = []

    def stop() -> bool:
        if should_stop is not None and should_stop():
            interrupted.append(True)
        return bool(interrupted)

    run.engine.eval()
    args = (run.val_data, run.cfg.eval_batches, run.cfg.micro_batch_size,
            run.dist.rank, run.dist.world_size, run.device, stop)
    result = {"val_ppl_student": perplexity(run.engine, *args)}
    if not interrupted and teacher:
        teacher_ppl = run.teacher.val_ppl(lambda logits_fn: perplexity(logits_fn, *args))
        if teacher_ppl is not None:
            result["val_ppl_teacher"] = teacher_ppl
    if not interrupted and run.cfg.eval_blimp:
        result["blimp_student"] = blimp_accuracy(
            run.engine, run.tokenizer, document_start_id(run.cfg.data, run.tokenizer),
            read_pairs(run.cfg.eval_blimp), run.cfg.micro_batch_size, run.device,
            run.dist.rank, run.dist.world_size,
        )["accuracy"]
    run.engine.train()
    return None if interrupted else result


def train(cfg: TrainConfig) -> dict:
    run = build_run(cfg, init_distributed(cfg.distributed))
    cfg = run.cfg
    state = {"step": 0, "consumed": 0}
    if run.resume_tag:
        state = checkpoint.load(run.engine, run.run_dir, run.resume_tag, run.dist.rank,
                                run.dist.world_size, run.resume_universal)
    sampler = GlobalSampler(run.train_data.num_samples, cfg.seed)
    monitor = Monitor(run.run_dir, cfg.logging, cfg.max_steps,
                      cfg.global_batch_size * cfg.data.seq_len, run.dist.rank,
                      dataclasses.asdict(cfg))
    preemption, stop = PreemptionFlag(run.device), False
    while state["step"] < cfg.max_steps and not stop:
        micro_batches = [
            sampler.micro_batch_ids(state["consumed"], cfg.micro_batch_size, accum,
                                    run.dist.rank, run.dist.world_size)
            for accum in range(run.grad_accum)
        ]
        metrics = train_step(run, micro_batches)
        state = {"step": state["step"] + 1, "consumed": state["consumed"] + cfg.global_batch_size}
        monitor.step(state["step"], metrics)
        monitor.samples(state["step"], micro_batches)
        stop = preemption.agreed(run.dist.world_size)
        if not stop and cfg.eval_every and state["step"] % cfg.eval_every == 0 \
                and state["step"] < cfg.max_steps:
            scores = evaluate(run, lambda: preemption.agreed(run.dist.world_size), teacher=False)
            stop = scores is None
            if scores is not None:
                monitor.write({"step": state["step"], **scores})
        if stop or state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.max_steps:
            checkpoint.save(run.engine, run.run_dir, state, run.dist.rank,
                            run.dist.world_size, cfg.checkpoint_keep)
    # The final checkpoint is written: a signal during evaluation only cuts evaluation short.
    scores = None if stop else evaluate(run, lambda: preemption.agreed(run.dist.world_size))
    preemption.close()
    if scores is None:  # preempted: resume=auto continues from the checkpoint
        log.warning("stopped after step %d on %s", state["step"], preemption.received or
                    "another rank's signal")
        result = {"step": state["step"], "preempted": True}
    else:
        result = {"step": state["step"], **scores}
        monitor.write(result)
        log.info("validation after step %d: %s", state["step"],
                 "  ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "step"))
    monitor.close()
    dist.destroy_process_group()  # without it ZeRO-3 runs sometimes abort at exit
    return result
