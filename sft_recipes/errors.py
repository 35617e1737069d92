"""One exception type for user mistakes, and the CLI guard that turns it into one line + exit 2 and keeps
third-party noise that asks nothing of the user out of our commands (library use sees everything)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

# Messages of the stack under us that need no action: muted while one of our commands runs.
_MUTED = (
    "fan_in_fan_out is set to False but the target module is `Conv1D`",  # PEFT on GPT-2; it sets it itself
    "`is_gradient_checkpointing` is deprecated",  # TRL/PEFT calling transformers
    "Setting `save_embedding_layers` to `True`",  # PEFT saves the resized embeddings, as it must
    "The new embeddings will be initialized from a multivariate normal",  # transformers, on every resize
    # PEFT, saving an adapter on a .gguf base (no config.json to compare vocabularies with): the template's new
    # tokens travel as trainable tokens anyway; only an added pad row, never attended to, is left out
    ".gguf - will assume that the vocabulary was not modified",
    # transformers' Trainer on resume: safetensors saves a tied head once, under the embedding's name, and the
    # Trainer's check for that reads a v4 attribute; an untied model's checkpoint holds its head, so this is tying
    "There were missing keys in the checkpoint model loaded: ['lm_head.weight']",
)
_MUTED_LOGGERS = ("transformers.modeling_utils", "transformers.trainer")


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


def kind_of(value) -> str:
    """A JSON value's type in words, for errors: "a list", "a number (3)", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Where(NamedTuple):
    """Where a value came from, so every error names file, record and the user's own field name."""
    source: str
    record: int
    names: dict

    def field(self, canonical: str) -> str:
        return self.names.get(canonical, canonical)

    def error(self, problem: str, field: str | None = None, hint: str | None = None) -> RecipeError:
        return data_error(self.source, problem, record=self.record, field=field, hint=hint)


def cli(main):
    """Decorator for `main()` of every command: RecipeError -> `error: ...` on stderr, exit 2."""

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            with _quiet():
                return main(*args, **kwargs)
        except RecipeError as e:
            say_once(f"error: {e}")
            sys.exit(2)
        except KeyboardInterrupt:
            say_once("interrupted")
            sys.exit(130)
        except BrokenPipeError:
            reader_gone()
        finally:  # on return and on sys.exit (argparse's --help) alike
            flush_stdout()

    return guarded


def say_once(line: str):
    """`line` on stderr, once per machine under `accelerate launch`/torchrun: every process meets the same recipe
    error, and the first to fail with it prints it (a different error, e.g. in one rank's data shard, prints
    too). The marker lives in the launch's own temp folder (beside each rank's TORCHELASTIC_ERROR_FILE), which
    the launcher removes."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        marker = Path(error_file).parents[1] / f"sft_recipes-said-{hashlib.sha1(line.encode()).hexdigest()[:16]}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # another process of this launch said it
        except OSError:
            pass  # no folder to mark in: say it
    print(line, file=sys.stderr)


def flush_stdout():
    """Flush now, where a closed pipe can be handled, instead of at exit, where Python prints a traceback."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        reader_gone()


def reader_gone():
    """The reader of our stdout left (`... | head -1`): stop quietly, as a Unix tool killed by SIGPIPE does (exit
    141); what is still buffered goes to /dev/null so the flush at exit cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)


class _Muted(logging.Filter):
    def filter(self, record):
        return not any(m in record.getMessage() for m in _MUTED)


_BARS = None  # inside a command: [] then transformers' logging module once its bars are off; None outside one


def quiet_stack():
    """Turn transformers' progress bars (loading and writing weights) off for the rest of the command. `_quiet`
    calls it at the start; a command that imports the stack only after parsing its arguments (so that `--help`
    is quick) calls it again once it has. Outside a command (library use) it does nothing."""
    hf = sys.modules.get("transformers.utils.logging")
    if _BARS == [] and hf is not None and hf.is_progress_bar_enabled():
        hf.disable_progress_bar()
        _BARS.append(hf)


@contextlib.contextmanager
def _quiet():
    """Mute `_MUTED` and transformers' own progress bars, print our warnings as bare lines; restore it all after."""
    global _BARS
    outer, _BARS = _BARS, []
    quiet_stack()
    muted, loggers = _Muted(), [logging.getLogger(name) for name in _MUTED_LOGGERS]
    root = logging.getLogger()
    # Our warnings go through one handler for the whole command: else the first library to log through absl
    # (rouge_score, under evaluate) calls basicConfig mid-run and the later ones read `WARNING:sft_recipes:...`.
    ours = logging.StreamHandler() if not root.handlers else None
    if ours:
        root.addHandler(ours)
    with warnings.catch_warnings():
        for message in _MUTED:
            warnings.filterwarnings("ignore", message=".*" + re.escape(message))
        for logger in loggers:
            logger.addFilter(muted)
        try:
            yield
        finally:
            if ours:
                root.removeHandler(ours)
            for logger in loggers:
                logger.removeFilter(muted)
            for hf in _BARS:
                hf.enable_progress_bar()
            _BARS = outer
