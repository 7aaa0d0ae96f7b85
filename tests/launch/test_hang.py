"""Hang diagnostics on a real 2-process gloo group under torchrun: after the first step the
collective timeout is distributed.step_timeout_s, so a rank stuck far below distributed.timeout_s
ends the job, and the stuck rank prints its own Python stack (faulthandler)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fbi_testing import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_a_stuck_rank_ends_the_job_at_the_step_timeout_and_shows_its_stack(tmp_path):
    stuck_s, step_timeout_s = 40, 8
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--log-dir", str(tmp_path / "logs"), "--redirects", "3", "--tee", "3",
         str(REPO / "tests" / "launch" / "stuck_rank.py"), str(stuck_s), str(step_timeout_s)],
        cwd=tmp_path, capture_output=True, text=True, timeout=stuck_s * 4,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    # With distributed.timeout_s (4 x the stall) rank 0 would have waited the stall out.
    assert "rank 0: step 3 collective failed" in out, out[-4000:]
    assert "all steps done" not in out
    rank1 = "".join(p.read_text() for p in (tmp_path / "logs").rglob("1/stderr.log"))
    assert "Timeout (0:00:06)!" in rank1, rank1[-3000:]  # at 3/4 of the step timeout
    assert "stuck_rank.py\", line" in rank1 and "in <module>" in rank1
