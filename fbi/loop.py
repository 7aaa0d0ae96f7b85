"""The training loop. Everything it calls is assembled in ``fbi.run``; what happens after a
step besides the update (non-finite and spike guards, diagnostics) is a callback."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
import torch.distributed as dist

from fbi import checkpoint
from fbi.callbacks import Control, TrainingHalted
from fbi.callbacks.diagnostics import BinaryDiagnostics
from fbi.callbacks.hang import HangWatch
from fbi.callbacks.nonfinite import NonFiniteGuard, nonfinite_update, update_skipped
from fbi.callbacks.spikes import SkippedBatches, SpikeDetector
from fbi.config import TrainConfig
from fbi.data.mixture import make_sampler
from fbi.data.prepare import document_start_id
from fbi.deepspeed_setup import init_distributed
from fbi.distributed import detect
from fbi.distill.loss import distillation_loss
from fbi.eval.blimp import blimp_accuracy, read_pairs
from fbi.eval.perplexity import perplexity
from fbi.flops import Utilization
from fbi.metrics import Monitor, StepTimer
from fbi.preemption import PreemptionFlag, advise_after_save
from fbi.preflight import preflight
from fbi.run import Run, build_run
from fbi.run_lock import RunLock

log = logging.getLogger("fbi")


def train_step(run: Run, micro_batches: list[list[int]]) -> dict:
    """One optimizer step over this rank's ``grad_accum`` micro-batches of sample ids."""
    cfg, engine = run.cfg, run.engine
    # soft_ce: every teacher source's estimate of the full soft cross-entropy (fbi.distill.loss)
    names = ["loss", "ce"] if run.teacher.kind == "none" else ["loss", "distill", "soft_ce", "ce"]
    totals = torch.zeros(len(names), device=run.device)  # NCCL reduces device tensors only
    lr = engine.get_lr()[0]  # the rate this step uses; the scheduler moves on in engine.step
    timer, skipped_before, grad_norm, dropped = StepTimer(run.device), engine.skipped_steps, None, False
    for i, ids in enumerate(micro_batches):
        with timer("time_data_s"):
            batch = torch.from_numpy(run.train_data.batch(ids)).to(run.device)
            inputs, labels = batch[:, :-1], batch[:, 1:]
        with timer("time_teacher_s"):
            targets = run.teacher.targets(ids, inputs)  # dense logits, sparse targets or None
        with timer("time_forward_backward_s"):
            out = distillation_loss(
                engine(inputs), targets, labels,
                temperature=cfg.distill.temperature, ce_weight=cfg.distill.ce_weight,
            )
            engine.backward(out.loss)
        totals += torch.stack([getattr(out, n).detach().float() for n in names])
        if i == len(micro_batches) - 1:  # the update comes next: decide whether it may
            totals /= run.grad_accum
            if run.dist.world_size > 1:
                dist.all_reduce(totals)
                totals /= run.dist.world_size
            grad_norm, dropped = nonfinite_update(engine, totals)
        with timer("time_optimizer_s"), update_skipped(engine, dropped):
            engine.step()
    metrics = {**dict(zip(names, totals.tolist())), "lr": lr}
    if grad_norm is None:  # DeepSpeed's optimizer computed it
        grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["skipped"] = dropped or engine.skipped_steps > skipped_before
    return {**metrics, **timer.seconds}


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
    """A run from its start, each stage once and in this order: the refusals that only read
    (every rank refuses alike), rank 0's lock on the run directory, assembly (process group,
    teacher, shards, engine), the loop. The signal handlers come first: a signal during
    start-up is kept."""
    preemption = PreemptionFlag()
    env = detect(os.environ)
    run_dir = preflight(cfg, env.world_size)
    lock = RunLock(run_dir) if env.rank == 0 else None
    try:
        run = build_run(cfg, init_distributed(cfg.distributed, run_dir))
    except BaseException:
        preemption.close()
        if lock is not None:
            lock.release(refused=True)
        raise
    try:
        return train_run(run, preemption)
    finally:
        if lock is not None:
            lock.release()


def train_run(run: Run, preemption: PreemptionFlag | None = None) -> dict:
    cfg, rank, world = run.cfg, run.dist.rank, run.dist.world_size
    sampler = make_sampler(run.train_data, cfg.data, cfg.seed)
    skips = SkippedBatches(run.run_dir, cfg.global_batch_size, run.dist.is_main)
    newest = lambda: (checkpoint.complete_tags(run.run_dir) or [None])[-1]  # noqa: E731
    callbacks = [
        NonFiniteGuard(cfg.guard.max_nonfinite_steps, newest),
        SpikeDetector(cfg.guard, run.run_dir, skips, run.dist.is_main, lambda: bool(newest())),
        BinaryDiagnostics(run.engine.module, cfg.logging.diagnostics_every, rank, world),
        hangs := HangWatch(cfg.distributed.step_timeout_s),
    ]

    def load(tag: str) -> dict:
        saved = checkpoint.load(run.engine, run.run_dir, tag, rank, world,
                                run.resume_universal and tag == run.resume_tag)
        for callback in callbacks:
            callback.load_state_dict(saved["callbacks"].get(type(callback).__name__, {}))
        return {"step": saved["step"], "consumed": saved["consumed"]}

    state = load(run.resume_tag) if run.resume_tag else {"step": 0, "consumed": 0}
    utilization = Utilization.of(cfg.model, cfg.data.seq_len, getattr(run.teacher, "model", None),
                                 world, run.device, cfg.logging.peak_tflops)
    monitor = Monitor(run.run_dir, cfg.logging, cfg.max_steps,
                      cfg.global_batch_size * cfg.data.seq_len, rank, dataclasses.asdict(cfg),
                      utilization, start_step=state["step"])

    def save(state: dict, metrics: dict | None) -> None:
        saved = {cb.__class__.__name__: cb.state_dict() for cb in callbacks}
        started = time.monotonic()
        folder = checkpoint.save(run.engine, run.run_dir, {**state, "callbacks": saved}, rank,
                                 world, cfg.checkpoint_keep, cfg.checkpoint_keep_every)
        if run.dist.is_main and metrics:  # the grace a stop needs, from this save's measured rate
            advise_after_save(folder, time.monotonic() - started, metrics)

    preemption, stop, saveable, metrics = preemption or PreemptionFlag(), False, True, None
    preemption.device = run.device
    while state["step"] < cfg.max_steps and not stop:
        consumed = skips.cursor(state["consumed"])
        micro_batches = [
            sampler.micro_batch_ids(consumed, cfg.micro_batch_size, accum, rank, world)
            for accum in range(run.grad_accum)
        ]
        # A teacher cache still being written may make the step wait; a signal or the cache
        # job's death ends the wait, and the run stops as at this step boundary.
        with hangs.suspended():  # the wait has its own deadline (teacher.cache.dead_after_s)
            ended = run.teacher.wait(micro_batches, lambda: preemption.received)
        if ended is not None:
            if saveable and state["step"] > 0 and newest() != f"step_{state['step']:08d}":
                save(state, metrics)
            if ended.fatal:
                raise TrainingHalted(f"{ended.reason} (after step {state['step']}, "
                                     f"checkpoint {newest()}; resume=auto continues)")
            stop = True
            break
        metrics = train_step(run, micro_batches)
        state = {"step": state["step"] + 1, "consumed": consumed + cfg.global_batch_size}
        control = Control()
        for callback in callbacks:
            callback.after_step(run, state, metrics, control)
        monitor.step(state["step"], metrics, force=control.log)
        monitor.samples(state["step"], micro_batches)
        if control.halt:
            raise TrainingHalted(control.halt)
        if control.rewind:
            state = load(newest())
            continue
        stop = preemption.agreed(world)
        if not stop and cfg.eval_every and cfg.eval_batches \
                and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.max_steps:
            scores = evaluate(run, lambda: preemption.agreed(world), teacher=False)
            stop = scores is None
            if scores is not None:
                monitor.write({"step": state["step"], **scores})
        due = stop or state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.max_steps
        saveable = control.save_allowed
        if due and saveable:
            save(state, metrics)
    hangs.close()
    # The final checkpoint is written: a signal during evaluation only cuts evaluation short.
    scores = None
    if not stop and cfg.eval_batches:
        scores = evaluate(run, lambda: preemption.agreed(world))
    preemption.close()
    if stop or (scores is None and cfg.eval_batches):  # resume=auto continues from the checkpoint
        log.warning("stopped after step %d on %s", state["step"], preemption.received or
                    "another rank's signal")
        result = {"step": state["step"], "preempted": True}
    else:
        result = {"step": state["step"], **(scores or {})}
        if scores:
            monitor.validation(result)
            log.info("validation after step %d: %s", state["step"],
                     "  ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "step"))
    monitor.close()
    dist.destroy_process_group()  # without it ZeRO-3 runs sometimes abort at exit
    preemption.hand_over()  # submitit's USR2 handler requeues, now that the checkpoint exists
    return result
