"""One exception type for user mistakes, and the CLI guard that turns it into one line + exit 2."""
from __future__ import annotations

import functools
import sys


class RecipeError(Exception):
    """A mistake the user can fix: bad data, bad recipe, unreachable model. Never a bug of ours."""


def data_error(file, problem: str, *, record: int | None = None, line: int | None = None,
               field: str | None = None, hint: str | None = None) -> RecipeError:
    """Build the standard message: `FILE: record N (line L), field 'F': problem. hint`."""
    where = [str(file)] if file is not None else []
    if record is not None:
        where.append(f"record {record}" + (f" (line {line})" if line is not None else ""))
    elif line is not None:
        where.append(f"line {line}")
    if field is not None:
        where.append(f"field '{field}'")
    msg = ", ".join(where)
    msg = f"{msg}: {problem}" if msg else problem
    if hint:
        msg = f"{msg.rstrip('.')}. {hint}"
    return RecipeError(msg)


def cli(main):
    """Decorator for `main()` of every command: RecipeError -> `error: ...` on stderr, exit 2."""

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return guarded
