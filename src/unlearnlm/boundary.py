"""The command line's one error boundary: bad input and every foreseeable failure (files, decoding,
weights, memory) become one line on stderr and exit code 2, Ctrl-C one line and 130; a bug keeps its
traceback."""

from __future__ import annotations

import errno
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Optional

import typer
from typer.exceptions import TyperException

from unlearnlm.errors import Interrupted, UserError, with_notes
from unlearnlm.paths import release_outputs


def guarded(command: Callable[[], Optional[int]]) -> int:
    """Entry point, the one error boundary: bad input and every foreseeable failure (files, decoding,
    weights, memory) become one line on stderr and exit code 2, Ctrl-C one line and 130, never a
    traceback or a usage box; a launched process group is closed by every process before it exits."""
    code = 0
    restore = _interrupts_raise()
    try:
        with _warnings_only_on_success():
            code = command() or 0
    except UserError as err:
        code = _fail(with_notes(err))
    except TyperException as err:  # a missing or unknown option, a value of the wrong kind
        code = _usage_failure(err)
    except (Interrupted, KeyboardInterrupt, typer.Abort) as err:
        _fail(with_notes(Interrupted("interrupted"), notes=getattr(err, "__notes__", [])))
        code = 130
    except Exception as err:
        message = describe_failure(err)
        if message is None:
            raise
        code = _fail(message)
    else:
        # Imported here, not above: it loads torch, which must wait until the kernels are pinned.
        from unlearnlm.distributed import leave_process_group

        leave_process_group()
    finally:
        release_outputs()
        restore()
    return code


def _interrupts_raise():
    """Ctrl-C raises ``Interrupted`` (see errors.py) while a command runs; returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupted(signum, frame):
        raise Interrupted("interrupted")

    previous = signal.signal(signal.SIGINT, interrupted)
    return lambda: signal.signal(signal.SIGINT, previous)


@contextmanager
def _warnings_only_on_success():
    """Library warnings are shown once a command succeeded; after a failure they would only restate
    the one error line (transformers' warning about the very file the error names)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)


def describe_failure(err: Exception) -> Optional[str]:
    """One line for a failure no input check could foresee (a full disk, a file changed under us, a
    model too large for memory); None for a bug, which keeps its traceback."""
    kind = type(err).__name__
    if isinstance(err, OSError):
        where = f"{err.filename}: " if err.filename else ""
        reason = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
                  errno.EBUSY: "device or resource busy"}.get(err.errno, err.strerror or str(err))
        text = f"{where}{reason}"
    elif isinstance(err, UnicodeError):
        text = f"text that is not valid UTF-8 ({err})"
    elif isinstance(err, MemoryError) or kind == "OutOfMemoryError" or "can't allocate memory" in str(err):
        text = "out of memory (a smaller --set optim.batch_size, max_length or dtype=bfloat16 needs less)"
    elif kind == "SafetensorError":
        text = f"a safetensors file is damaged ({err})"
    else:
        return None
    return with_notes(Exception(text), notes=getattr(err, "__notes__", []))


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _usage_failure(err: Exception) -> int:
    message = err.format_message() if hasattr(err, "format_message") else str(err)
    if not message:  # no arguments at all: the help was printed
        return 2
    context = getattr(err, "ctx", None)
    command = context.command_path if context is not None else "unlearnlm"
    return _fail(f"{command}: {message.rstrip('.')} (see '{command} --help')")
