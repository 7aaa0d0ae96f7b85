"""bench/gpu_check.sh on CPU: every row's code runs and compares (no GPU here: the rows whose
claim is about CUDA report SKIP with the reason after their comparison held); a perturbed
row is reported FAIL; a row past its limit, or the whole check past the overall limit, is
killed with everything it started and reported ERROR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fbi_testing import REPO

sys.path.insert(0, str(REPO / "bench"))
from gpu_rows import ROWS  # noqa: E402


def check(out: Path, *args: str, timeout: int = 2400, **env: str) -> tuple[int, dict, str]:
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--device", "cpu",
                           "--out", str(out), *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)
    result = out / "gpu_check.json"
    return proc.returncode, json.loads(result.read_text()) if result.exists() else {}, proc.stderr


def verdicts(result: dict) -> dict[str, str]:
    return {r["row"]: r["verdict"] for r in result["rows"]}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_every_row_runs_on_cpu_and_passes_or_skips_with_its_reason(tmp_path):
    code, result, err = check(tmp_path)
    assert code == 0, err[-4000:]
    assert list(verdicts(result)) == list(ROWS)
    for row in result["rows"]:
        assert row["verdict"] in ("PASS", "SKIP"), row
        assert row["figures"], row  # every verdict says what was compared or why not
    skipped = {r["row"]: r["figures"] for r in result["rows"] if r["verdict"] == "SKIP"}
    # the rows that compare on CPU as on a GPU say PASS; the CUDA-only claims say why not
    assert {"zero_stages", "resume", "distillation", "sign_route", "preemption"} \
        .isdisjoint(skipped)
    assert all("CUDA" in why or "GPU" in why or "allocator" in why for why in skipped.values())
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("row", ["distillation", "gpu_equals_cpu", "bimamba"])
def test_a_perturbed_row_is_reported_fail_and_the_check_exits_non_zero(tmp_path, row):
    code, result, err = check(tmp_path, "--only", f"environment,{row}",
                              FBI_GPU_CHECK_FAULT=row)
    assert code == 1, err[-3000:]
    assert verdicts(result) == {"environment": "PASS", row: "FAIL"}


@pytest.mark.slow
def test_a_row_past_its_limit_is_killed_and_reported(tmp_path):
    code, result, _ = check(tmp_path, "--only", "distillation", "--row-limit", "2")
    assert code == 1
    (row,) = result["rows"]
    assert row["verdict"] == "ERROR" and "timed out after 2 s" in row["figures"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_overall_limit_ends_the_check_with_its_table_and_no_process_left(tmp_path):
    """The resume row starts train.py runs; GPU_CHECK_TIMEOUT ends the check in the middle:
    the table so far is written, with an ERROR row, and nothing it started keeps running."""
    code, result, _ = check(tmp_path, "--only", "environment,resume", GPU_CHECK_TIMEOUT="10")
    assert code == 1
    assert result["rows"][-1]["row"] == "(time limit)"
    assert result["rows"][-1]["verdict"] == "ERROR"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps


def test_without_a_gpu_the_cuda_check_says_so_and_measures_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--device cpu" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_the_wheelhouse_fits_64_mib_and_installs_offline_beside_only_torch(tmp_path):
    """bench/gpu_wheels.sh (needs the package index), then a fresh venv holding only the
    project's CPU torch, then gpu_check.sh --wheels with pip's configuration and find-links
    removed: everything beyond torch comes from the wheelhouse, torch stays as it was, and the
    environment row (which imports DeepSpeed, Hydra, OmegaConf, transformers...) passes."""
    import torch

    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run(["bash", str(REPO / "bench" / "gpu_wheels.sh"), str(wheels)], check=True,
                   timeout=1200)
    files = list(wheels.iterdir())
    assert sum(f.stat().st_size for f in files) <= 64 * 2**20
    cuda_libraries = ("torch-", "triton-", "nvidia_cu", "nvidia_nccl", "nvidia_nvjitlink")
    assert not [f.name for f in files if f.name.lower().startswith(cuda_libraries)]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    version = torch.__version__.split("+")[0]
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"torch=={version}"],
                   check=True, timeout=1200)  # the project's own CPU wheel, from pip's config
    before = subprocess.run([str(python), "-c", "import torch; print(torch.__file__, "
                             "torch.__version__)"], capture_output=True, text=True).stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHON=str(python))
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--wheels", str(wheels),
                           "--device", "cpu", "--only", "environment", "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert verdicts(result) == {"environment": "PASS"}
    after = subprocess.run([str(python), "-c", "import torch; print(torch.__file__, "
                            "torch.__version__)"], capture_output=True, text=True).stdout
    assert before == after
