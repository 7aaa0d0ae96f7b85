"""fbi.preemption: SIGUSR1/SIGTERM set the flag; nothing else does; handlers are restored."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fbi.preemption import PreemptionFlag


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_sets_the_flag_and_close_restores_the_handler(sig):
    before = signal.getsignal(sig)
    flag = PreemptionFlag(torch.device("cpu"))
    try:
        assert not flag.agreed(world_size=1)
        os.kill(os.getpid(), sig)  # delivered before kill() returns to this thread
        assert flag.received == sig.name and flag.agreed(world_size=1)
    finally:
        flag.close()
    assert signal.getsignal(sig) is before
