"""Evaluation during training and after it is one code path: the numbers agree."""

from __future__ import annotations

import json

import pytest

from fbi_testing import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

PAIRS = REPO / "data" / "blimp" / "anaphor_number_agreement.jsonl"  # the zero3_run's eval_blimp


def test_eval_after_training_reproduces_the_runs_own_numbers(tmp_path, zero3_run, capsys):
    from fbi.cli import main

    records = [json.loads(line) for line in (zero3_run / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if "val_ppl_student" in r and r["step"] == 2]
    assert len(periodic) == 1 and "val_ppl_teacher" not in periodic[0]  # eval_every=2
    final = records[-1]
    assert final["step"] == 3 and {"val_ppl_teacher", "blimp_student"} <= final.keys()

    # 2 ranks during training, 1 process here: the same windows and pairs, the same numbers
    main(["export", str(zero3_run), "--format", "packed", "--fp-dtype", "float32",
          "--out", str(tmp_path / "packed")])
    capsys.readouterr()
    # the packed export unpacked (bit-identical weights), and on the packed kernels (fp32 rounding)
    for model, kernel, rel in ((zero3_run, [], 1e-12), (tmp_path / "packed", ["--kernel", "dense"], 1e-12),
                               (tmp_path / "packed", ["--kernel", "packed"], 1e-5)):
        main(["eval", str(model), "--val", str(zero3_run), "--blimp", str(PAIRS),
              "--batch-size", "4", *kernel])
        result = json.loads(capsys.readouterr().out)
        assert result["val_ppl"] == pytest.approx(final["val_ppl_student"], rel=rel)
        assert result["blimp"]["accuracy"] == final["blimp_student"]
        assert result["blimp"]["pairs"] == 30


def test_generate_command_prints_samples(zero3_run, capsys):
    from fbi.cli import main

    main(["generate", str(zero3_run), "--prompt", "The history of", "--max-new-tokens", "5",
          "--samples", "2", "--temperature", "1.0"])
    samples = json.loads(capsys.readouterr().out)["samples"]
    assert len(samples) == 2 and samples[0] != samples[1]  # seeds 0 and 1
    main(["generate", str(zero3_run), "--prompt", "The history of", "--max-new-tokens", "5",
          "--samples", "2", "--temperature", "1.0"])
    assert json.loads(capsys.readouterr().out)["samples"] == samples  # seeded: reproducible
