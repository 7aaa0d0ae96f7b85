"""How fbi's entry points leave the process: output flushed, then ``os._exit``.

DeepSpeed's CPU communication threads (gloo) can still be alive when the interpreter tears
down; their C++ destructors then abort the process (SIGABRT, "terminate called without an
active exception") after its work is done, and torchrun, the deepspeed launcher or SLURM
report a finished job as failed, killing the other ranks. ``os._exit`` skips that teardown,
and with it atexit handlers, finalizers and the wait for non-daemon threads: an entry point
closes what must reach disk (checkpoints, logs, wandb) before it returns.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Call ``main()``; when it returns, :func:`leave` with status 0.

    An exception, ``SystemExit`` included, propagates as it would without this: the
    interpreter prints its traceback (or message) before the teardown, and the status stays
    non-zero (its own, or SIGABRT's where the teardown aborts). So a failure is never hidden,
    and the entry point still runs in-process (runpy, tests) with its exceptions visible to the
    caller. An entry point whose exact failure status matters calls :func:`leave` itself."""
    main()
    leave(0)


def leave(status: int) -> NoReturn:
    """End the process now with ``status``: logging flushed and closed, stdout and stderr
    flushed, no interpreter teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
