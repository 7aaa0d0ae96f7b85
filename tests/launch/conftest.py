"""What the launch tests train: the tiny student from the tiny teacher, with short timeouts."""

from __future__ import annotations

import logging

import pytest

from cluster import SlurmCluster, why_not_slurm

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A SLURM controller and two slurmd nodes on this machine (skipped where it cannot be)."""
    reason = why_not_slurm()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        seconds = cluster.start()
        log.warning("SLURM fixture up in %.1f s", seconds)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def overrides(tiny_run) -> list[str]:
    return tiny_run + ["distributed.rendezvous_timeout_s=60", "distributed.timeout_s=120"]
