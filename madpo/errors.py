"""User errors: what the command line reports as one `madpo: error: <message>` line (exit status 2) instead of a
traceback.

A *user error* is a problem the user fixes in their input (a data file, a config value, a path), not in madpo:

- `UserError` (a `ValueError`, so `pytest.raises(ValueError)` and library callers keep working), raised where madpo
  validates input, e.g. `InvalidRowError`, an empty data file, a malformed JSON line;
- a `ValueError` raised by a `raise` statement in madpo's own code: the library's input checks (`beta must be > 0`,
  `val_fraction must be in [0, 1)`), which predate `UserError`. A `ValueError` that surfaces from a library madpo
  calls (numpy, pyarrow, torch) or from a madpo line that is not a `raise` (`a, b = xs`) is a bug and keeps its
  traceback;
- an `OSError` (a missing file, a model path transformers cannot resolve, a full disk): the environment, not the code;
- a pipeline `StageError` raised on its own (a stage refusing its configuration); one that wraps another exception
  counts only when the wrapped exception does.

Everything else (TypeError, AttributeError, RuntimeError, ...) is a bug and shows its traceback. Wrappers are
unwrapped along `__cause__` (`raise ... from e`: jsonargparse wraps a failing `__init__`, `StageError` wraps a stage's
exception), never along `__context__` (an exception raised while handling another one is a new problem).
`MADPO_DEBUG=1` (or `--debug` on the command line) shows the traceback of user errors too.
"""

from __future__ import annotations

import linecache
import os
import sys

EXIT_USER_ERROR = 2  # as argparse/jsonargparse exit on a bad argument; a crash (traceback) exits 1
DEBUG_ENV = "MADPO_DEBUG"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class UserError(ValueError):
    """A problem with the user's input (data, config, paths); the message says what and where (file, row, field)."""


def debug_enabled() -> bool:
    """True when `MADPO_DEBUG` is set to anything but empty/0/false/no: user errors show their traceback too."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _raised_by_madpo(exc: BaseException) -> bool:
    """True when the innermost frame of `exc` is a `raise` statement in the madpo package (a deliberate check)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not filename.startswith(_PACKAGE_DIR):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def _stage_error_type() -> type | None:
    # only when the pipeline is loaded: no StageError can exist otherwise, and importing it costs seconds
    stages = sys.modules.get("madpo.pipeline.stages")
    return getattr(stages, "StageError", None)


def _is_user_error(exc: BaseException, stage_error: type | None) -> bool:
    if isinstance(exc, (UserError, OSError)):
        return True
    if stage_error is not None and isinstance(exc, stage_error):
        return exc.__cause__ is None
    return type(exc) is ValueError and _raised_by_madpo(exc)


def find_user_error(exc: BaseException) -> tuple[BaseException, str] | None:
    """(the user error, the message to print) when `exc` is or explicitly wraps a user error, else None (a bug).

    The message is the user error's own, or the outermost `StageError`'s when the chain passes through one (it adds
    the stage name to the cause's message).
    """
    stage_error = _stage_error_type()
    outer_stage: BaseException | None = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_user_error(current, stage_error):
            shown = outer_stage if outer_stage is not None else current
            return current, str(shown) or type(current).__name__
        if stage_error is not None and isinstance(current, stage_error) and outer_stage is None:
            outer_stage = current
        current = current.__cause__
    return None


def report_user_error(exc: BaseException) -> int | None:
    """Print `madpo: error: <message>` on stderr (rank 0 only) and return the exit status, or None when `exc` is a
    bug (or `MADPO_DEBUG` is set) and should propagate with its traceback."""
    if debug_enabled():
        return None
    found = find_user_error(exc)
    if found is None:
        return None
    from madpo.distributed import launcher_rank  # torch only once there is an error to print

    if launcher_rank() == 0:
        message = found[1].strip().replace("\n", "\n  ")  # keep a multi-line message readable under the prefix
        print(f"madpo: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
