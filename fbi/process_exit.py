"""How fbi's entry points leave the process: output flushed, then ``os._exit``.

DeepSpeed's CPU communication threads (gloo) can still be alive when the interpreter tears
down; their C++ destructors then abort the process (SIGABRT, "terminate called without an
active exception") after its work is done, and torchrun, the deepspeed launcher or SLURM
report a finished job as failed, sometimes killing the other ranks. ``os._exit`` skips that
teardown, and with it atexit handlers, finalizers and the wait for non-daemon threads: an
entry point closes what must reach disk (checkpoints, logs, wandb) before it returns.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """Call ``main()``, then end the process with the exit status the interpreter would give:
    0 on return, ``SystemExit``'s code (a message printed, status 1), 130 on Ctrl-C, and 1
    with the traceback on stderr for any other exception."""
    try:
        main()
        code = 0
    except SystemExit as err:
        code = exit_status(err)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130  # 128 + SIGINT, as a shell reports an interrupted command
    except BaseException:  # any other failure: its traceback, then status 1
        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def exit_status(err: SystemExit) -> int:
    """``sys.exit(x)``'s status as the interpreter computes it: None is 0, an int is itself,
    anything else is printed to stderr and gives 1."""
    if err.code is None:
        return 0
    if isinstance(err.code, int):
        return err.code
    sys.stderr.write(f"{err.code}\n")
    return 1
