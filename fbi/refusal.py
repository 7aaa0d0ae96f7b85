"""The one boundary between a command and its user: an error that an input can cause (a bad
argument, a missing or damaged file) ends the command with a refusal in one paragraph and
exit status 2, never a traceback. ``FBI_DEBUG=1`` re-raises it, traceback and all.

Every entry wraps its work in :func:`refusals` (``python -m fbi`` around all its verbs, and
``train.py``), so a new verb gets the same behaviour without code of its own. Readers still
raise ``ConfigError`` with a message naming the file, what is wrong and the fix; this
boundary is the net for what they did not foresee (``OSError``, ``ValueError``,
``EOFError``, ``IndexError``, decoding and JSON errors, which are ``ValueError`` s).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator, NoReturn

from fbi.config import ConfigError

INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, OSError, ValueError, EOFError,
                                                 IndexError)


def paragraph(err: BaseException, worded: tuple[type[BaseException], ...] = ()) -> str:
    """The error's message on one line; an error that no reader worded (not a ConfigError
    nor one of ``worded``) also names its kind and how to see where it came from."""
    text = " ".join(str(err).split()) or repr(err)
    # An OSError without errno is one of ours, worded like a ConfigError.
    if isinstance(err, (ConfigError, *worded)) or (isinstance(err, OSError) and err.errno is None):
        return text
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return (f"{type(err).__name__}: {text} (the input above could not be used; fix or replace "
            "it, or run with FBI_DEBUG=1 for the traceback)")


def _exit(code: int) -> NoReturn:
    raise SystemExit(code)


def _say(message: str) -> None:
    print(message, file=sys.stderr)


@contextlib.contextmanager
def refusals(prog: str | None, also: tuple[type[BaseException], ...] = (),
             halts: tuple[type[BaseException], ...] = (), say: Callable[[str], None] = _say,
             exit: Callable[[int], NoReturn] = _exit) -> Iterator[None]:
    """Run the body; an input error or one of ``also`` (refusals of the caller's own kinds)
    is said as ``"{prog}: {paragraph}"`` and exits 2; one of ``halts`` (a run that stopped on
    purpose, e.g. on a NaN loss; they explain themselves) exits 3."""
    try:
        yield
    except (*INPUT_ERRORS, *also, *halts) as err:
        if os.environ.get("FBI_DEBUG"):
            raise
        text = paragraph(err, also + halts)
        say(f"{prog}: {text}" if prog else text)
        exit(3 if isinstance(err, halts) else 2)
