"""What the launch tests train: the tiny student from the tiny teacher, with short timeouts."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def overrides(tiny_run) -> list[str]:
    return tiny_run + ["distributed.rendezvous_timeout_s=60", "distributed.timeout_s=120"]
