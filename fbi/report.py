"""A run directory at a glance: a text summary and one PNG of loss, throughput, sign-flip
rate and validation perplexity, several runs in one figure (e.g. fbi against fp).

    python -m fbi.report runs/demo runs/demo_fp --out report.png

Reads only ``metrics.jsonl``, ``spikes.jsonl``, ``skipped_batches.jsonl`` and the checkpoint
folders; a run may still be training. Of a step logged twice (replayed after a resume) the
first row counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fbi.checkpoint import complete_tags


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut off by a kill
            continue
    return out


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
    return {
        "name": run_dir.name, "train": train, "val": [vals[s] for s in sorted(vals)],
        "flips": flips, "spikes": read_rows(run_dir / "spikes.jsonl"),
        "skipped_batches": read_rows(run_dir / "skipped_batches.jsonl"),
        "replayed": sum(1 for r in rows if r.get("replayed")),
        "checkpoints": complete_tags(run_dir),
    }


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


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (loss_ax, speed_ax), (flip_ax, val_ax) = axes
    for run in runs:
        steps = [r["step"] for r in run["train"]]
        loss_ax.plot(steps, [r["loss"] for r in run["train"]], label=run["name"])
        speed_ax.plot(steps, [r.get("tokens_per_s", float("nan")) for r in run["train"]],
                      label=run["name"])
        if run["flips"]:
            flip_ax.plot(*zip(*run["flips"]), marker=".", label=run["name"])
        if run["val"]:
            val_ax.plot([r["step"] for r in run["val"]],
                        [r["val_ppl_student"] for r in run["val"]], marker="o", label=run["name"])
    for ax, title in ((loss_ax, "training loss"), (speed_ax, "tokens/s"),
                      (flip_ax, "share of latent weights whose sign flipped"),
                      (val_ax, "validation perplexity (student)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend()
    loss_ax.set_yscale("log")  # a blow-up and the slow descent after it on one plot
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("report.png"))
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not (d / "metrics.jsonl").exists()]
    if missing:
        parser.error(f"no metrics.jsonl in {', '.join(missing)}: not a run directory")
    runs = [load(d) for d in args.run_dirs]
    for run in runs:
        print(summary(run))
    plot(runs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
