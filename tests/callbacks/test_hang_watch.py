"""The hang watch's timer: armed after a step, off while the loop waits on a teacher cache
(that wait has its own deadline), armed again after it."""

import subprocess
import sys
import textwrap

from fbi_testing import REPO

SCRIPT = textwrap.dedent("""
    import sys, time
    from fbi.callbacks import Control
    from fbi.callbacks.hang import HangWatch

    watch = HangWatch(0.4)  # stacks at 0.3 s without a step
    watch.after_step(None, {}, {}, Control())
    with watch.suspended():
        time.sleep(1.0)  # a long cache wait: no stacks
    print("wait over", file=sys.stderr, flush=True)
    time.sleep(1.0)  # a step that hangs: stacks
    print("step over", file=sys.stderr, flush=True)
    watch.close()
""")


def test_no_stacks_during_a_suspended_wait_and_stacks_for_a_step_after_it():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, _, after = proc.stderr.partition("wait over")
    assert "Timeout (" not in before, proc.stderr
    assert "Timeout (" in after.split("step over")[0], proc.stderr
    hanging = 1 + next(i for i, line in enumerate(SCRIPT.splitlines()) if "hangs" in line)
    assert f'File "<string>", line {hanging} in <module>' in after