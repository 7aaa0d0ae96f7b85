"""fbi.preemption: SIGUSR1/SIGUSR2/SIGTERM/SIGINT set the flag; USR1/USR2 are preemption,
TERM/INT cancellation; handlers are restored, and a preemption signal is handed to the handler
that was there before (submitit's, which requeues)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fbi.preemption import PreemptionFlag


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_flag_and_close_restores_the_handler(sig):
    before = signal.getsignal(sig)
    flag = PreemptionFlag(torch.device("cpu"))
    try:
        assert not flag.agreed(world_size=1)
        os.kill(os.getpid(), sig)  # delivered before kill() returns to this thread
        assert flag.received == sig.name and flag.agreed(world_size=1)
        assert flag.preempted == (sig in (signal.SIGUSR1, signal.SIGUSR2))
    finally:
        flag.close()
    assert signal.getsignal(sig) is before


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_only_a_preemption_signal_is_handed_to_the_previous_handler(sig):
    """submitit installs its USR2 (requeue) and TERM (ignore) handlers before the job runs;
    fbi's take over, and after the checkpoint USR2 goes on to submitit's."""
    seen = []
    originals = {s: signal.signal(s, lambda signum, frame: seen.append(signum))
                 for s in (signal.SIGUSR2, signal.SIGTERM)}
    try:
        flag = PreemptionFlag()
        os.kill(os.getpid(), sig)
        assert seen == []  # fbi's handler ran, not the previous one
        flag.close()
        flag.hand_over()
        assert seen == ([signal.SIGUSR2] if sig == signal.SIGUSR2 else [])
    finally:
        for s, handler in originals.items():
            signal.signal(s, handler)


def test_hand_over_without_a_previous_python_handler_does_nothing():
    flag = PreemptionFlag()
    os.kill(os.getpid(), signal.SIGUSR1)
    flag.close()
    flag.hand_over()  # SIG_DFL before: nothing to call (calling it would end the process)
    assert flag.preempted


def test_a_signal_during_evaluation_ends_it_at_the_next_round(tmp_path):
    """The flag is checked inside evaluation too: a signal arriving while perplexity runs
    stops it after the current round instead of finishing every batch."""
    import numpy as np

    from fbi.data.shards import Manifest, ShardWriter, TokenShards
    from fbi.eval.perplexity import perplexity

    writer = ShardWriter(tmp_path, "val", np.dtype(np.uint16), 10_000)
    writer.write(np.arange(400) % 50)
    Manifest("f", "test", 50, "uint16", {"val": writer.close()}).save(tmp_path)
    data = TokenShards(tmp_path, "val", seq_len=8)
    calls = []

    def logits(inputs):
        calls.append(len(inputs))
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return torch.zeros(*inputs.shape, 50)

    flag = PreemptionFlag(torch.device("cpu"))
    try:
        args = (data, 10, 2, 0, 1, torch.device("cpu"))
        assert perplexity(logits, *args, should_stop=lambda: flag.agreed(1)) is None
        assert len(calls) == 2  # of 10 batches: stopped right after the signalled round
    finally:
        flag.close()
    assert perplexity(logits, *args) == pytest.approx(50.0)  # uniform logits: ppl = vocab


def test_grace_counts_the_step_the_write_and_the_exit():
    from fbi.preemption import grace_s

    # 98 GB (7B parameters x 14 bytes) at 1 GB/s, 20 s steps: 20 + 1.25 x 98 + 30
    assert grace_s(98e9, 1.0, 20.0) == 173
    assert grace_s(98e9, 2.0, 20.0) < grace_s(98e9, 1.0, 20.0)


@pytest.mark.parametrize("timeout,warned", [("30", True), ("600", False)])
def test_a_torchrun_shutdown_timeout_shorter_than_the_grace_is_flagged(
        timeout, warned, monkeypatch, caplog):
    from fbi.preemption import advise_grace, grace_s

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "j")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", timeout)
    caplog.set_level("INFO")
    advise_grace(98e9, 1.0)
    need = grace_s(98e9, 1.0)
    assert f"USR1@{need}" in caplog.text and "98.0 GB" in caplog.text
    assert ("killed mid-write" in caplog.text) == warned


def test_the_grace_after_a_save_uses_its_size_and_time(tmp_path, caplog):
    from fbi.preemption import advise_after_save, grace_s

    (tmp_path / "step_00000010").mkdir()
    (tmp_path / "step_00000010" / "a.pt").write_bytes(b"x" * 3_000_000)
    caplog.set_level("INFO")
    advise_after_save(tmp_path / "step_00000010", 0.5, {"time_data_s": 1.0, "loss": 9.0,
                                                       "time_optimizer_s": 2.0})
    assert f"USR1@{grace_s(3e6, 3e6 / 1e9 / 0.5, 3.0)}" in caplog.text
    assert "0.01 GB/s" in caplog.text and "a step of 3 s" in caplog.text
