"""A run directory at a glance: a text summary and one PNG, several runs in one figure (e.g.
fbi against fp), against training tokens: distillation loss and cross-entropy, validation
perplexity with the teacher's as a reference line, learning rate, gradient norm,
throughput, the time per step split into its parts, MFU and the sign-flip share. A panel
with nothing to show says why.

    python -m fbi.report runs/demo runs/demo_fp --out report.png

Reads only ``config.yaml``, ``metrics.jsonl``, ``spikes.jsonl``, ``skipped_batches.jsonl``
and the checkpoint folders; a run may still be training. Of a step logged twice (replayed
after a resume) the first row counts.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from fbi.checkpoint import complete_tags
from fbi.config import ConfigError
from fbi.trained import read_rows


def load(run_dir: Path) -> dict:
    rows = read_rows(run_dir / "metrics.jsonl")
    steps, vals = {}, {}
    for r in rows:
        if "loss" in r and r["step"] not in steps:
            steps[r["step"]] = r
        if "val_ppl_student" in r:
            vals[r["step"]] = r
    train = [steps[s] for s in sorted(steps)]
    flips = []
    for r in train:
        shares = [v for k, v in r.items() if k.startswith("flip/")]
        if shares:
            flips.append((r["step"], sum(shares) / len(shares)))
    cfg = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").exists() else None
    return {
        "name": run_dir.name, "train": train, "val": [vals[s] for s in sorted(vals)],
        "tokens_per_step": cfg.global_batch_size * cfg.data.seq_len if cfg else 1,
        "no_distill": None if any("distill" in r for r in train) else no_distill(run_dir.name, cfg),
        "no_mfu": None if any("mfu" in r for r in train) else
        f"{run_dir.name}: no MFU: the device's peak is unknown (CPU); set logging.peak_tflops",
        "no_flips": None if flips else no_flips(run_dir.name, cfg, train),
        "flips": flips, "spikes": read_rows(run_dir / "spikes.jsonl"),
        "skipped_batches": read_rows(run_dir / "skipped_batches.jsonl"),
        "replayed": sum(1 for r in rows if r.get("replayed")),
        "checkpoints": complete_tags(run_dir),
    }


def no_distill(name: str, cfg) -> str:
    """Why a run has logged no distillation loss."""
    kind = OmegaConf.select(cfg, "teacher.kind", default="none") if cfg is not None else "none"
    if kind != "none":
        return (f"{name}: teacher={kind}, but no step logged a distillation loss "
                "(distill.weight 0, or no step yet)")
    return f"{name}: no teacher (teacher=none), so no distillation loss"


def no_flips(name: str, cfg, train: list[dict]) -> str:
    """Why a run has logged no sign-flip share."""
    if cfg is not None and cfg.scheme.name == "fp":
        return f"{name}: full precision (scheme=fp): no binary weights to flip"
    every = cfg.logging.diagnostics_every if cfg is not None else "N"
    return (f"{name}: no sign flips logged: the first is measured at the second diagnostics "
            f"step (every logging.diagnostics_every={every} steps), the run has "
            f"{train[-1]['step'] if train else 0}")


def summary(run: dict) -> str:
    train, val = run["train"], run["val"]
    if not train:
        return f"{run['name']}: no training step logged yet"
    last = train[-1]
    parts = [
        f"{run['name']}: step {last['step']}, loss {last['loss']:.4f}",
        f"{sum(r.get('tokens_per_s', 0) for r in train[-10:]) / len(train[-10:]):.0f} tok/s",
        f"{sum(1 for r in train if r.get('skipped'))} updates skipped (non-finite)",
        f"{len(run['spikes'])} loss spikes, {len(run['skipped_batches'])} batches skipped",
        f"{run['replayed']} rows replayed after resumes",
        f"checkpoints {', '.join(run['checkpoints']) or 'none'}",
    ]
    if run["flips"]:
        parts.append(f"sign flips {run['flips'][-1][1]:.2%} per interval")
    if val:
        parts.append("val ppl " + ", ".join(f"{k[8:]} {v:.2f}" for k, v in val[-1].items()
                                            if k.startswith("val_ppl")))
    return "; ".join(parts)


TIME_PARTS = {"time_data_s": "data", "time_teacher_s": "teacher",
              "time_forward_backward_s": "forward + backward", "time_optimizer_s": "optimizer"}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def tokens(run: dict, rows: list[dict]) -> list[float]:
    """Training tokens read by the end of each row's step (global batch x seq_len per step)."""
    return [r["step"] * run["tokens_per_step"] for r in rows]


def series(ax, run: dict, key: str, rows: list[dict] | None = None, **style) -> None:
    rows = [r for r in (run["train"] if rows is None else rows) if key in r]
    if rows:
        ax.plot(tokens(run, rows), [r[key] for r in rows], label=run["name"], **style)


def explain(ax, why: str) -> None:
    """An empty panel says why it is empty instead of showing blank axes."""
    ax.text(0.5, 0.5, "\n".join(textwrap.fill(line, 44) for line in why.splitlines()),
            ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig = figure(runs)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def figure(runs: list[dict]):
    """The report's 3 x 3 panels (a matplotlib Figure)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    (distill, ce, val), (lr, grad, speed), (split, mfu, flips) = axes
    for run in runs:
        # soft_ce compares runs whose teacher sources differ; older logs have distill only
        series(distill, run, "soft_ce" if any("soft_ce" in r for r in run["train"])
               else "distill")
        series(ce, run, "ce")
        series(lr, run, "lr")
        series(grad, run, "grad_norm")
        series(speed, run, "tokens_per_s")
        series(mfu, run, "mfu")
        series(val, run, "val_ppl_student", run["val"], marker="o")
        teacher = [r["val_ppl_teacher"] for r in run["val"] if "val_ppl_teacher" in r]
        if teacher:  # the teacher does not change: one line, the best the student can reach
            val.axhline(teacher[-1], ls="--", color=val.lines[-1].get_color(),
                        label=f"{run['name']}: teacher {teacher[-1]:.2f}")
        if run["flips"]:
            flips.plot([s * run["tokens_per_step"] for s, _ in run["flips"]],
                       [f for _, f in run["flips"]], marker=".", label=run["name"])
    bottom = [0.0] * len(runs)
    for key, part in TIME_PARTS.items():  # mean seconds per step, stacked per run
        heights = [mean(r.get(key, 0) for r in run["train"]) for run in runs]
        split.bar([run["name"] for run in runs], heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    rest = [max(mean(r.get("step_time_s", 0) for r in run["train"]) - b, 0)
            for run, b in zip(runs, bottom)]
    split.bar([run["name"] for run in runs], rest, bottom=bottom, label="other (logging, ...)")
    panels = [
        (distill, "distillation loss", "soft cross-entropy to the teacher (nats/token)"),
        (ce, "cross-entropy on the data", "nats/token"),
        (val, "validation perplexity", "perplexity (held-out split)"),
        (lr, "learning rate", "learning rate"),
        (grad, "gradient norm (before clipping)", "L2 norm"),
        (speed, "throughput", "tokens/s"),
        (mfu, "model FLOPs utilization", "MFU (fraction of peak)"),
        (flips, "sign flips between diagnostics", "share of latent weights"),
    ]
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
    split.set_title("time per step")
    split.set_ylabel("mean seconds per step")
    for ax, reasons in ((distill, [run["no_distill"] for run in runs]),
                        (mfu, [run["no_mfu"] for run in runs]),
                        (flips, [run["no_flips"] for run in runs]),
                        (val, ["no validation logged yet (eval_every)"] * len(runs))):
        if not ax.lines:
            explain(ax, "\n".join(dict.fromkeys(r for r in reasons if r)))
    for ax in (ce, grad, val):  # a blow-up and the slow descent after it on one plot
        if ax.lines:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 6.3, not 6.3 x 10^0
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
    for ax in axes.flat:
        if ax.lines or ax.patches:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        parser.error(f"no metrics.jsonl in {', '.join(missing)}: not a run directory")
    if not args.out.parent.expanduser().is_dir():
        raise ConfigError(f"--out: the folder {args.out.parent} of {args.out} does not exist; "
                          "create it, or name a picture in an existing folder")
    runs = [load(d) for d in args.run_dirs]
    empty = [str(d) for d, run in zip(args.run_dirs, runs) if not run["train"]]
    if empty:
        raise ConfigError(f"{', '.join(empty)}: metrics.jsonl holds no training step yet; "
                          "report a run once it has logged a step (logging.every)")
    for run in runs:
        print(summary(run))
    plot(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
