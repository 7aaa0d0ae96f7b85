"""Metrics: console progress, ``metrics.jsonl`` and (when enabled) wandb, on rank 0.

The console shows a progress bar when rank 0's stderr is a terminal, plain log lines
otherwise (a SLURM log, a pipe): the same text, either as the bar's postfix or as a line.

After a resume the steps between the checkpoint and the last logged step are trained
again; their rows (and a validation of a step already validated) carry ``"replayed": true``,
so a reader keeps the first row of each step, or the last, as it needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from fbi.config import LoggingConfig
from fbi.flops import Utilization

log = logging.getLogger("fbi")


class StepTimer:
    """Seconds per phase of one step (data, teacher, forward_backward, optimizer). On a GPU
    each phase ends with a synchronize, so that the time lands in the phase that caused it."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def package_versions() -> dict[str, str]:
    """The stack a run used, for its wandb config."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "deepspeed", "transformers", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def logged_steps(run_dir: Path) -> tuple[int, set[int]]:
    """(last training step, steps validated) already in ``metrics.jsonl``."""
    path, last, validated = run_dir / "metrics.jsonl", 0, set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut off by a kill
                continue
            if "loss" in row:
                last = max(last, row["step"])
            if any(k.startswith("val_ppl") for k in row):
                validated.add(row["step"])
    return last, validated


class Monitor:
    def __init__(
        self, run_dir: Path, cfg: LoggingConfig, max_steps: int, tokens_per_step: int,
        rank: int, config: dict, utilization: Utilization | None = None, start_step: int = 0,
    ) -> None:
        is_main = rank == 0
        self.cfg, self.max_steps, self.tokens_per_step = cfg, max_steps, tokens_per_step
        self.utilization = utilization
        self.is_main = is_main
        self.logged_until, self.validated = logged_steps(run_dir) if is_main else (0, set())
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if is_main else None
        self._samples = None
        if cfg.sample_ids:  # data provenance: which samples each rank trained on, per step
            (run_dir / "samples").mkdir(exist_ok=True)
            self._samples = open(run_dir / "samples" / f"rank{rank}.jsonl", "a")
        self._wandb = None
        if is_main and cfg.wandb != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project, dir=str(run_dir), mode=cfg.wandb,
                config={**config, "versions": package_versions()}, name=run_dir.name,
                resume="allow",
            )
        self._bar = None
        if is_main and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._started = time.perf_counter()
        self._steps_done = 0

    def step(self, step: int, metrics: dict, force: bool = False) -> None:
        self._window_steps += 1
        self._steps_done += 1
        if self._bar is not None:
            self._bar.n = step  # a rewind moves it back
            self._bar.refresh()
        if step % self.cfg.log_every and step != self.max_steps and not force:
            return
        now = time.perf_counter()
        step_time = (now - self._window_start) / self._window_steps
        record = {
            "step": step, **metrics,
            "tokens_per_s": self.tokens_per_step / step_time,
            "step_time_s": step_time,
        }
        if self.utilization is not None:
            record.update(self.utilization.metrics(record["tokens_per_s"]))
        if step <= self.logged_until:
            record["replayed"] = True
        eta = (now - self._started) / self._steps_done * (self.max_steps - step)
        self.write(record)
        self.logged_until = max(self.logged_until, step)
        if self.is_main:
            losses = "  ".join(
                f"{k} {metrics[k]:.4f}" for k in ("loss", "distill", "soft_ce", "ce")
                if k in metrics
            )
            text = "%s  lr %.2e  %.0f tok/s%s%s" % (
                losses, metrics["lr"], record["tokens_per_s"],
                f"  MFU {record['mfu']:.1%}" if "mfu" in record else "",
                "  (update skipped: non-finite)" if metrics.get("skipped") else "",
            )
            if self._bar is not None:
                self._bar.set_postfix_str(text)
            else:
                log.info("step %d/%d  %s  ETA %s", step, self.max_steps, text,
                         time.strftime("%H:%M:%S", time.gmtime(eta)))
        self._window_start, self._window_steps = time.perf_counter(), 0

    def samples(self, step: int, micro_batches: list[list[int]]) -> None:
        if self._samples is not None:
            self._samples.write(json.dumps({"step": step, "ids": micro_batches}) + "\n")
            self._samples.flush()

    def validation(self, record: dict) -> None:
        if record["step"] in self.validated:
            record = {**record, "replayed": True}
        self.validated.add(record["step"])
        self.write(record)

    def write(self, record: dict) -> None:
        if not self.is_main:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for f in (self._jsonl, self._samples):
            if f is not None:
                f.close()
        if self._wandb is not None:
            self._wandb.finish()
