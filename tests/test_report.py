"""fbi report: panels against training tokens, labelled; the teacher's perplexity as a
reference line; an empty panel says why."""

from __future__ import annotations

import json

import matplotlib
import pytest
from omegaconf import OmegaConf

from fbi.report import figure, load, main

matplotlib.use("Agg")


def write_run(directory, rows, scheme="fbi", teacher=True):
    directory.mkdir()
    OmegaConf.save({"global_batch_size": 8, "data": {"seq_len": 32}, "scheme": {"name": scheme},
                    "logging": {"diagnostics_every": 50}}, directory / "config.yaml")
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return directory


def step_rows(n, teacher=True, mfu=False):
    rows = []
    for step in range(1, n + 1):
        row = {"step": step, "loss": 5.0 / step, "ce": 6.0 / step, "lr": 1e-3 * step,
               "grad_norm": 1.0 + step, "tokens_per_s": 100.0, "step_time_s": 1.0,
               "time_data_s": 0.1, "time_teacher_s": 0.2, "time_forward_backward_s": 0.5,
               "time_optimizer_s": 0.1}
        if teacher:
            row["distill"] = row["loss"]
        if mfu:
            row["mfu"] = 0.3
        rows.append(row)
    rows.append({"step": n, "val_ppl_student": 300.0, "val_ppl_teacher": 50.0})
    return rows


def panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def test_panels_are_against_tokens_with_the_teacher_as_reference(tmp_path):
    run = load(write_run(tmp_path / "a", step_rows(4, mfu=True)))
    axes = panels(figure([run]))
    for title in ("distillation loss", "cross-entropy on the data", "learning rate",
                  "gradient norm (before clipping)", "throughput", "model FLOPs utilization"):
        ax = axes[title]
        assert ax.get_xlabel() == "training tokens" and ax.get_ylabel()
        assert list(ax.lines[0].get_xdata()) == [s * 8 * 32 for s in range(1, 5)]
    val = axes["validation perplexity"]
    teacher = [line for line in val.lines if "teacher" in line.get_label()]
    assert len(teacher) == 1 and set(teacher[0].get_ydata()) == {50.0}
    assert list(axes["learning rate"].lines[0].get_ydata()) == [1e-3 * s for s in range(1, 5)]
    split = axes["time per step"]
    heights = [p.get_height() for p in split.patches]
    assert heights == pytest.approx([0.1, 0.2, 0.5, 0.1, 0.1])  # other: 1.0 - 0.9


def test_empty_panels_say_why(tmp_path):
    run = load(write_run(tmp_path / "b", step_rows(3, teacher=False)))
    axes = panels(figure([run]))
    said = {title: " ".join(t.get_text() for t in ax.texts) for title, ax in axes.items()}
    assert "teacher=none" in said["distillation loss"]
    assert "logging.peak_tflops" in said["model FLOPs utilization"]
    assert "diagnostics_every=50" in said["sign flips between diagnostics"]
    fp = load(write_run(tmp_path / "c", step_rows(3), scheme="fp"))
    assert "scheme=fp" in fp["no_flips"]


def test_command_writes_a_png(tmp_path, capsys):
    write_run(tmp_path / "d", step_rows(3))
    main([str(tmp_path / "d"), "--out", str(tmp_path / "r.png")])
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "step 3" in capsys.readouterr().out


def test_distillation_panel_plots_the_comparable_soft_ce_when_logged(tmp_path):
    rows = step_rows(3)
    for row in rows[:-1]:
        row["soft_ce"] = row["distill"] + 2.0
    axes = panels(figure([load(write_run(tmp_path / "d", rows)),
                          load(write_run(tmp_path / "e", step_rows(3)))]))
    new, old = axes["distillation loss"].lines
    assert list(new.get_ydata()) == [5.0 / s + 2.0 for s in range(1, 4)]
    assert list(old.get_ydata()) == [5.0 / s for s in range(1, 4)]  # logs before soft_ce


def test_a_run_with_a_teacher_but_no_distillation_row_does_not_claim_teacher_none(tmp_path):
    run_dir = write_run(tmp_path / "t", step_rows(3, teacher=False))
    config = run_dir / "config.yaml"
    config.write_text(config.read_text() + "teacher: {kind: hf}\n")
    assert "teacher=hf, but no step logged a distillation loss" in load(run_dir)["no_distill"]
