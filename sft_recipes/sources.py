"""Load data from local files or the Hub, convert it to conversations, mix by weight, split.

A weight is either a fraction in (0, 1] (subsample that share of the rows; 1 keeps them all) or a
whole number above 1 (that many rows; above the rows available, every row is repeated as often as
fits and a random subset fills the rest; this repetition comes after cleaning, so a deliberate repeat
is not taken for a duplicate). Every row carries its provenance: `source` (the dataset's path) and
`record` (its number in that source, from 0, as errors count). The happy path is `datasets`' own
loaders and cache; we read a file ourselves only to explain a failure (bad JSON line, bytes that are
not UTF-8), or when `datasets` had to store a mixed-type field as Json, which does not keep strings
intact.

Check files before training: `python -m sft_recipes.sources PATH [PATH ...] [--format F] [--strict]
[--dedup none|exact|near] [--chat-template NAME ...] [--tokenizer PATH_OR_ID] [--max-length N]`.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import difflib
import glob
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import yaml
from datasets import Dataset, Features, Json, Value, concatenate_datasets, load_dataset
from datasets.exceptions import DatasetNotFoundError
from datasets.fingerprint import Hasher

from . import hub
from .errors import RecipeError, cli, data_error
from .formats import FORMATS, convert, detect_format
from .keys import docs
from .tiny import TINY_MODEL_ID

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Suffixes that make a missing path "a file not found" rather than a Hub id (ids may contain dots).
_PATH_SUFFIXES = set(_BUILDERS) | {".tsv", ".txt", ".arrow", ".gz", ".zip", ".zst", ".xz", ".bz2"}


@dataclass
class DatasetSpec:
    path: str
    format: str = "auto"
    split: str = "train"
    name: str | None = None
    data_files: str | list[str] | None = None
    weight: float | None = None
    columns: dict | None = None
    roles: dict | None = None

    @classmethod
    def from_dict(cls, d, where) -> "DatasetSpec":
        """A recipe entry: a dict of these fields, or just a path string."""
        if isinstance(d, str):
            d = {"path": d}
        if not isinstance(d, dict):
            raise data_error(where, f"expected a dataset entry (a path or a mapping), got {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                guess = f"Did you mean '{close[0]}'? " if close else ""
                raise data_error(where, f"unknown key '{key}'",
                                 hint=f"{guess}Valid keys: {', '.join(valid)}")
        if "path" not in d:
            raise data_error(where, "missing 'path'", hint="Give a file, folder, glob or Hub id")
        spec = cls(**d)
        spec._validate(where)
        return spec

    def _validate(self, where):
        if not isinstance(self.path, str) or not self.path:
            raise data_error(where, f"'path' must be a non-empty string, got {self.path!r}")
        if self.format not in ("auto", *FORMATS):
            close = difflib.get_close_matches(str(self.format), FORMATS, n=1)
            raise data_error(where, f"unknown format '{self.format}'",
                             hint=(f"Did you mean '{close[0]}'? " if close else "")
                             + f"Use auto or one of: {', '.join(FORMATS)}")
        w = self.weight
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
                raise data_error(where, f"weight must be a number above 0, got {w!r}",
                                 hint="A fraction in (0, 1] subsamples, a whole number > 1 is a "
                                      "row count")
            if w > 1 and not float(w).is_integer():
                raise data_error(where, f"weight {w} is neither a fraction nor a row count",
                                 hint="A fraction in (0, 1] subsamples, a whole number > 1 is a "
                                      "row count")
        for option in ("columns", "roles"):
            mapping = getattr(self, option)
            if mapping is not None and not (isinstance(mapping, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())):
                raise data_error(where, f"'{option}' must map names to names, got {mapping!r}")


# ---------------------------------------------------------------- public entry points

class Drops(collections.Counter):
    """Unusable rows by reason, and the first few of each named by file and record (`examples`)."""

    KEEP = 3

    def __init__(self, counts=(), examples: dict | None = None):
        super().__init__(counts)
        self.examples = examples or {}

    def add(self, other: "Drops") -> "Drops":
        self.update(other)
        for reason, found in getattr(other, "examples", {}).items():
            mine = self.examples.setdefault(reason, [])
            mine += found[:self.KEEP - len(mine)]
        return self


class Mixture(NamedTuple):
    rows: Dataset                 # every source's rows at most once, concatenated and shuffled
    drops: Drops                  # unusable rows by reason
    repeats: dict                 # source -> its row count, for weights above the rows it has


def load_mixture(specs, *, seed: int = 42, num_proc: int | None = None, strict: bool = False) -> Mixture:
    """Load, convert, drop unusable rows, subsample by weight, concatenate and shuffle: each row at most
    once. Weights above a source's row count are left to `repeat`, which runs after cleaning."""
    specs = [s if isinstance(s, DatasetSpec) else DatasetSpec.from_dict(s, f"datasets[{i}]")
             for i, s in enumerate(specs)]
    if not specs:
        raise RecipeError("no datasets given")
    parts, drops, repeats = [], Drops(), {}
    for spec, label in zip(specs, _labels(specs)):
        ds, _, dropped = _prepare(spec, num_proc=num_proc, strict=strict, label=label)
        drops.add(dropped)
        ds, count = _subsample(ds, spec.weight, seed)
        if count > len(ds):
            repeats[label] = count
        parts.append(ds)
    return Mixture(concatenate_datasets(parts).shuffle(seed=seed), drops, repeats)


def load_conversations(specs, *, seed: int = 42, num_proc: int | None = None,
                       strict: bool = False) -> tuple[Dataset, Drops]:
    """Load, convert, drop unusable rows, weight, concatenate and shuffle; drops by reason."""
    rows, drops, repeats = load_mixture(specs, seed=seed, num_proc=num_proc, strict=strict)
    return repeat(rows, repeats, seed), drops


def repeat(ds: Dataset, repeats: dict, seed: int) -> Dataset:
    """Bring each source in `repeats` up to its row count: every row of it as often as fits, a random
    subset for the rest (30 from 12 rows: all twice, 6 a third time); then shuffle again."""
    if not repeats:
        return ds
    sources, rng, extra = np.asarray(ds["source"]), np.random.default_rng(seed), []
    for label, count in repeats.items():
        rows = np.flatnonzero(sources == label)
        if len(rows):  # cleaning may have removed them all
            times, rest = divmod(count, len(rows))
            extra += [np.tile(rows, times - 1), np.sort(rng.permutation(rows)[:rest])]
    return ds.select(np.concatenate([np.arange(len(ds)), *extra])).shuffle(seed=seed)


def split_eval(ds: Dataset, ratio: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a `ratio` share of `ds` for evaluation."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise RecipeError(f"eval split must be a fraction between 0 and 1, got {ratio!r}")
    try:
        parts = ds.train_test_split(test_size=ratio, seed=seed)
    except ValueError as e:  # too few rows for this ratio
        raise RecipeError(f"cannot hold out {ratio} of {len(ds)} rows for eval: {e}") from None
    return parts["train"], parts["test"]


# ---------------------------------------------------------------- one spec

def _labels(specs) -> list[str]:
    """Each spec's `source`: its path, with config and split when they are not the defaults."""
    labels = [s.path + (f":{s.name}" if s.name else "") + (f"[{s.split}]" if s.split != "train" else "")
              for s in specs]
    return [f"{label}#{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _prepare(spec: DatasetSpec, *, num_proc, strict, label=None):
    """(canonical rows without drops, tagged with `source` and `record`, format, Counter of drop reasons)."""
    spec._validate(spec.path)
    files = _local_files(spec)
    try:
        raw = _load(spec, files)
        fmt = spec.format
        if fmt == "auto":
            fmt = detect_format(raw.column_names, spec.path, columns=spec.columns)
        rows = convert(raw, fmt, source=spec.path, columns=spec.columns, roles=spec.roles,
                       num_proc=num_proc)
    except UnicodeDecodeError as e:  # Arrow keeps bad bytes; they surface when first read
        for file in files or ():
            _check_utf8(file)
        raise data_error(spec.path, f"text is not valid UTF-8 ({e})") from None
    rows, drops = _remove_drops(_tag(rows, label or spec.path), spec.path, num_proc=num_proc, strict=strict)
    return rows, fmt, drops


def _tag(rows: Dataset, label: str) -> Dataset:
    """Provenance columns, so every later report can name the source file and record."""
    fingerprint = Hasher.hash([rows._fingerprint, "provenance", label])
    rows = rows.add_column("source", [label] * len(rows), new_fingerprint=fingerprint + "s")
    return rows.add_column("record", np.arange(len(rows)), new_fingerprint=fingerprint + "r")


def _remove_drops(rows: Dataset, where, *, num_proc, strict):
    """(rows without drops, Drops). Malformed rows carry their own error; `strict` raises the first."""
    reasons = rows.data.column("drop").to_pylist()
    drops = Drops(r for r in reasons if r is not None)
    if drops:
        details, records = rows.data.column("detail").to_pylist(), rows.data.column("record").to_pylist()
        for reason, detail, record in zip(reasons, details, records):
            if reason is not None and len(drops.examples.setdefault(reason, [])) < Drops.KEEP:
                drops.examples[reason].append(f"{where}, " + (detail or f"record {record}"))
        summary = ", ".join(f"{n} {r}" for r, n in drops.most_common())
        if strict and "malformed" in drops:
            raise RecipeError(drops.examples["malformed"][0])
        if strict:
            first = next(i for i, r in enumerate(reasons) if r is not None)
            raise data_error(where, f"{drops.total()} of {len(rows)} records are unusable "
                             f"({summary}; first: record {records[first]})",
                             hint="Fix them, or turn `strict` off to drop them instead")
        if drops.total() == len(rows):
            reason = drops.most_common(1)[0][0]
            raise data_error(where, f"all {len(rows)} records are unusable ({summary}; first {reason}: "
                             f"{drops.examples[reason][0].removeprefix(f'{where}, ')})",
                             hint="Nothing is left to train on")
        rows = rows.filter(_keep, input_columns="drop", batched=True, num_proc=num_proc)
    return rows.remove_columns(["drop", "detail"]), drops


def _keep(drop):
    return [d is None for d in drop]


def _subsample(ds: Dataset, weight, seed: int) -> tuple[Dataset, int]:
    """(the rows a weight keeps, each at most once; the row count the weight asks for)."""
    n = len(ds)
    if weight is None or weight == 1:
        return ds, n
    count = max(1, round(weight * n)) if weight < 1 else int(weight)
    if count >= n:
        return ds, count
    return ds.select(np.sort(np.random.default_rng(seed).permutation(n)[:count])), count


# ---------------------------------------------------------------- loading

def _local_files(spec: DatasetSpec) -> list[str] | None:
    """The local files `spec` names, or None when it is a Hub id."""
    path = spec.path
    if path in ("json", "parquet", "csv") and spec.data_files:  # `load_dataset("json", ...)` style
        files = _expand(spec.data_files, Path("."), path)
    elif glob.has_magic(path):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise data_error(path, "no files match this pattern")
    elif Path(path).expanduser().is_dir():
        folder = Path(path).expanduser()
        files = (_expand(spec.data_files, folder, path) if spec.data_files else sorted(
            str(p) for p in folder.rglob("*")
            if p.suffix.lower() in _BUILDERS and not any(s.startswith(".") for s in p.parts)))
        if not files:
            raise data_error(path, "the folder has no data files",
                             hint=f"Supported: {', '.join(_BUILDERS)}")
    elif Path(path).expanduser().is_file():
        files = [str(Path(path).expanduser())]
    elif _looks_like_path(path):
        raise data_error(path, "file not found",
                         hint=f"A relative path starts from the recipe's folder when it exists there, else from "
                              f"the working directory, {Path.cwd()}")
    else:
        return None
    kinds = {_BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in _BUILDERS)
        raise data_error(bad, f"unsupported file type '{Path(bad).suffix}'",
                         hint=f"Use one of {', '.join(_BUILDERS)}")
    if len(kinds) > 1:
        raise data_error(path, f"mixes file types ({', '.join(sorted(kinds))})",
                         hint="List each kind as its own dataset")
    for f in files:
        if Path(f).stat().st_size == 0:
            raise data_error(f, "the file is empty", hint="It has no records")
    return files


def _expand(data_files, base: Path, where) -> list[str]:
    files = []
    for pattern in [data_files] if isinstance(data_files, str) else data_files:
        found = sorted(glob.glob(str(base / pattern), recursive=True))
        if not found:
            raise data_error(where, f"data_files: nothing matches '{pattern}'")
        files += found
    return files


def _looks_like_path(path: str) -> bool:
    return hub.looks_like_path(path) or Path(path).suffix.lower() in _PATH_SUFFIXES


def _load(spec, files) -> Dataset | Records:
    raw = _load_local(files, spec) if files else _load_hub(spec)
    if files and spec.split == "train" and isinstance(raw, Dataset) and _uses_json_type(raw.features):
        # datasets stores mixed-type fields as Json, which turns strings that look like JSON
        # ("42", '{"temp": 20}') into numbers and objects: read such files ourselves.
        raw = Records(files)
    if len(raw) == 0:
        raise data_error(spec.path, "no records", hint="The file or split is empty")
    return raw


def _load_local(files, spec) -> Dataset | Records:
    builder = _BUILDERS[Path(files[0]).suffix.lower()]
    options = _csv_options(files[0]) if builder == "csv" else {}
    try:
        return load_dataset(builder, data_files=files, split=spec.split, **options)
    except Exception as e:  # whatever `datasets` says, the user's file is the likely cause
        for file in files:  # explained at its line when it is not JSON or not UTF-8
            _read_json_records(file) if builder == "json" else _check_utf8(file)
        if builder == "json" and spec.split == "train":  # valid JSON that Arrow can't type: judge row by row
            return Records(files)
        cause = e.__cause__ or e
        raise data_error(spec.path, f"could not load: {cause}") from None


def _csv_options(file) -> dict:
    """CSV cells are text: keep "42" and "NA" as written (pandas would make 42.0 and null)."""
    with open(file, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return {"features": Features({name: Value("string") for name in header}),
            "keep_default_na": False}


def _load_hub(spec) -> Dataset:
    hub.offline_if_unreachable()  # otherwise an unreachable Hub costs a minute of retries
    try:
        return load_dataset(spec.path, spec.name, split=spec.split, data_files=spec.data_files)
    except DatasetNotFoundError:
        raise data_error(spec.path, "not a local file or folder, and no such dataset on the "
                         "Hugging Face Hub", hint="Check the path or the dataset id") from None
    except (ConnectionError, TimeoutError) as e:
        raise data_error(spec.path, f"not a local file or folder, and the Hugging Face Hub is "
                         f"unreachable ({e})", hint="To use local data, give a file path "
                         "instead, e.g. ./data/train.jsonl") from None
    except (FileNotFoundError, ValueError) as e:  # unknown config, split or data_files
        raise data_error(spec.path, f"could not load: {e}") from None


def _uses_json_type(feature) -> bool:
    if isinstance(feature, Json):
        return True
    if isinstance(feature, dict):
        return any(_uses_json_type(f) for f in feature.values())
    inner = getattr(feature, "feature", None)  # List, LargeList
    return inner is not None and _uses_json_type(inner)


def _check_utf8(file) -> str:
    data = Path(file).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise data_error(file, f"not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}",
                         line=data.count(b"\n", 0, e.start) + 1,
                         hint="Re-save the file as UTF-8") from None


class Records:
    """The records of JSON files that `datasets` cannot type (mixed-type fields), read one at a time: a first
    pass checks every record (an error names its line) and collects the field names; `formats.convert` reads
    them again in chunks into an Arrow file, so no file is ever held in memory as Python objects."""

    def __init__(self, files):
        self.files, names, self.n = list(files), {}, 0
        for record in self:
            self.n += 1
            names.update(dict.fromkeys(record))
        self.column_names = list(names)
        stats = [(str(f), Path(f).stat()) for f in self.files]
        self.fingerprint = Hasher.hash([(f, st.st_size, st.st_mtime_ns) for f, st in stats])

    def __iter__(self):
        for file in self.files:
            yield from _iter_json_records(file)

    def __len__(self):
        return self.n


def _read_json_records(file) -> list[dict]:
    return list(_iter_json_records(file))


def _iter_json_records(file):
    """A JSON array's or JSON Lines file's records; any problem is a RecipeError at its exact line."""
    with open(file, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head[:1] != b"[":
        yield from _iter_json_lines(file)
        return
    text = _check_utf8(file).removeprefix("\ufeff")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        problem, line, hint = _json_problem(text, e)
        raise data_error(file, problem, line=line, hint=hint or "Fix the syntax there") from None
    if not records:
        raise data_error(file, "no records (the JSON array is empty)",
                         hint="Add records or remove the file")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise data_error(file, f"expected a JSON object, got {type(record).__name__}", record=i)
    yield from records


def _iter_json_lines(file):
    """JSON Lines read a line at a time (split at \\n only: \\u2028 is valid JSON)."""
    n, offset = 0, 0
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise data_error(file, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at offset {offset + e.start}",
                                 line=lineno, hint="Re-save the file as UTF-8") from None
            offset += len(raw)
            line = line.removeprefix("\ufeff") if lineno == 1 else line
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if n == 0 and _is_single_object(_check_utf8(file)):
                    raise data_error(file, "one JSON object, not a list of records",
                                     hint="Use a JSON array of records or JSON Lines "
                                          "(one object per line)") from None
                problem, _, hint = _json_problem(line, e)
                raise data_error(file, problem, record=n, line=lineno,
                                 hint=hint or "Each line must be one complete JSON object") from None
            if not isinstance(record, dict):
                raise data_error(file, f"expected a JSON object, got {type(record).__name__}", record=n, line=lineno)
            n += 1
            yield record
    if n == 0:
        raise data_error(file, "the file is empty", hint="It has no records")


def _json_problem(text: str, e: json.JSONDecodeError) -> tuple[str, int, str | None]:
    """(problem, line, hint) of a JSON error. Python reports a trailing comma at the bracket after it, often a
    line later, as "Expecting value": name the comma and its own line instead."""
    before = text[:e.pos].rstrip()
    if before.endswith(",") and text[e.pos:e.pos + 1] in ("]", "}"):
        line = before.count("\n") + 1
        column = len(before) - before.rfind("\n") - 1
        return (f"invalid JSON: trailing comma (column {column}) before the closing '{text[e.pos]}'", line,
                "JSON allows no comma after the last item; remove it")
    return f"invalid JSON: {e.msg} (column {e.colno})", e.lineno, None


def _is_single_object(text) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


# ---------------------------------------------------------------- the data checker

def flag_value(text: str):
    """A structured value typed on the command line, read as YAML, so JSON works too: `--roles '{agent: assistant}'`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"not YAML or JSON: {text!r}") from None


def add_file_options(parser, which: str = "the file"):
    """A dataset entry's `format`, `columns` and `roles` as flags, for the commands that read one data file."""
    parser.add_argument("--format", help=f"the layout of {which}: auto (the default) or one of {', '.join(FORMATS)}")
    parser.add_argument("--columns", type=flag_value, metavar="YAML",
                        help="map fields to your column names, e.g. '{instruction: question, output: answer}'")
    parser.add_argument("--roles", type=flag_value, metavar="YAML",
                        help="map your role names to ours, e.g. '{customer: user, agent: assistant}'")


@cli
def main(argv=None):
    from . import cleaning  # the next stage: the checker reports what cleaning would remove

    ap = argparse.ArgumentParser(prog="python -m sft_recipes.sources",
                                 description="Check data files before training: the format found, rows kept and "
                                             "dropped (and why), the roles seen, what cleaning would remove, "
                                             "the first conversation and, with --chat-template, the masks under "
                                             "each template.", epilog=docs("data", "cleaning", "masks"))
    ap.add_argument("paths", nargs="+", metavar="path", help="file, folder, glob or Hub id")
    add_file_options(ap)
    ap.add_argument("--num-proc", type=int, default=None)
    ap.add_argument("--strict", action="store_true", help="unusable rows are an error")
    ap.add_argument("--dedup", default="exact", choices=cleaning.DEDUP,
                    help="count duplicates across all the paths (default: exact)")
    ap.add_argument("--dedup-threshold", type=float, default=0.9, help="Jaccard of a near duplicate")
    ap.add_argument("--chat-template", action="append", default=[], metavar="NAME",
                    help="also mask the rows kept under this template and say, per template, the examples, "
                         "refusals and rows split per turn (and why); repeatable: a shipped name, trl:NAME for "
                         "TRL's released templates, a .jinja path, or tokenizer")
    ap.add_argument("--tokenizer", default=TINY_MODEL_ID, metavar="PATH_OR_ID",
                    help=f"the tokenizer for --chat-template (default: {TINY_MODEL_ID}, the embedded tiny one)")
    ap.add_argument("--max-length", type=int, default=None,
                    help="max_length for --chat-template, as the recipe key (default: the recipe default)")
    args = ap.parse_args(argv)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # we explain load failures ourselves
    options = cleaning.CleanOptions(dedup=args.dedup, dedup_threshold=args.dedup_threshold)
    maskers = [_masker(spec, args.tokenizer, args.max_length) for spec in args.chat_template]  # a bad name stops before any loading

    found = []  # every file read and cleaned before the report starts: their progress bars come first, not inside
    for path in args.paths:
        spec = DatasetSpec.from_dict({"path": path, "format": args.format or "auto", "columns": args.columns,
                                      "roles": args.roles}, path)
        found.append((path, spec, *_prepare(spec, num_proc=args.num_proc, strict=args.strict)))
    kept = concatenate_datasets([f[2] for f in found])
    if args.dedup != "none":  # in file order: the first copy is the one kept
        kept, cleaned = cleaning.clean(kept, None, options, num_proc=args.num_proc)
    masks = [(recipe, _mask_stats(kept, recipe, tokenizer, args.num_proc)) for recipe, tokenizer in maskers]
    for path, spec, ds, fmt, drops in found:
        _describe(ds, fmt, drops, detected=spec.format == "auto", header=len(args.paths) > 1 and path)
    if args.dedup != "none":
        print(f"cleaning (dedup {args.dedup}" + (f", threshold {args.dedup_threshold}" if args.dedup == "near"
                                                   else "") + "):")
        for reason, n in cleaned.counts.items():
            print(f"  {reason}: {n}" + "".join(f"\n    {ex}" for ex in cleaned.examples.get(reason, [])))
        if cleaned.groups:
            print("largest duplicate groups:" + "".join(f"\n  {g}" for g in cleaned.groups))
    for recipe, st in masks:
        _describe_masks(recipe, len(kept), st)


def _masker(spec: str, tokenizer_name: str, max_length: int | None):
    """(recipe, tokenizer) as training would build them for `chat_template: spec`, the other keys at their
    defaults; each template gets its own tokenizer, since loading adds the special tokens it declares."""
    from .config import load_recipe
    from .models import load_tokenizer

    keys = {"max_length": max_length} if max_length else {}
    recipe = load_recipe(model_name_or_path=tokenizer_name, chat_template=spec, **keys)
    return recipe, load_tokenizer(recipe)


def _mask_stats(ds, recipe, tokenizer, num_proc) -> dict:
    """The stats the training summary reads, from the library's own masking of `ds`."""
    from . import masking, prepare  # they import this module

    masked = masking.tokenize(ds, tokenizer, prepare.mask_options(recipe, tokenizer), num_proc=num_proc,
                              desc="Masking")
    return prepare._stats(masked, Drops())


def _describe_masks(recipe, rows: int, st: dict):
    from .summary import _template_name, note_lines

    refused = sum(st["refused"].values())
    print(f"masks with {_template_name(recipe.data.chat_template)} (tokenizer {recipe.model.model_name_or_path}, "
          f"max_length {recipe.sft.max_length}):")
    print(f"  examples: {st['examples']:,} from {rows:,} rows, {st['tokens']:,} tokens "
          f"({st['trained_fraction']:.1%} trained); refused: {refused:,}"
          + (" (" + ", ".join(f"{k}: {v:,}" for k, v in st["refused"].items()) + ")" if refused else ""))
    if st["truncated"]:
        print(f"  truncated to max_length: {st['truncated']:,} examples")
    if not st["split_rows"]:
        print("  no row split per turn")
    for line in note_lines(st):
        print(f"  {line}")
    for reason, examples in st["examples_refused"].items():
        print(f"  first {reason}: {examples[0]}")


def _describe(ds, fmt, drops, *, detected: bool, header):
    if header:
        print(f"== {header}")
    print(f"format:  {fmt}" + (" (detected)" if detected else ""))
    print(f"kept:    {len(ds)} rows")
    print(f"dropped: {drops.total()}" + "".join(f"\n  {r}: {n}" + "".join(f"\n    {ex}" for ex in drops.examples.get(r, []))
                                               for r, n in drops.most_common()))
    roles = _role_counts(ds)
    if roles:
        print("roles:   " + ", ".join(f"{r} {n}" for r, n in roles.most_common()))
    counts = _message_counts(ds)
    if any(counts.values()):
        print("carried: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n))
    unused = collections.Counter(name for names in ds["unused"] for name in names)
    if unused:
        print("not used (ignored fields): " + ", ".join(f"{k} ({n} rows)" for k, n in unused.most_common()))
    print("first conversation:")
    row = ds[0]
    if row["text"] is not None:
        print(_indent(row["text"]))
    for m in row["messages"]:
        flag = "" if m["train"] is None else f" train={str(m['train']).lower()}"
        who = f" {m['name']}" if m["name"] else ""
        print(f"  [{m['role']}{who}{flag}]")
        if m["reasoning_content"]:
            print(f"  (reasoning)\n{_indent(m['reasoning_content'])}")
        if m["content"]:
            print(_indent(m["content"]))
        if m["tool_calls"]:
            print(f"  (tool calls) {_clip(m['tool_calls'])}")
    if row["tools"]:
        print(f"  tools: {_clip(row['tools'])}")


def _role_counts(ds) -> collections.Counter:
    import pyarrow.compute as pc
    messages = ds.select_columns(["messages"]).with_format("arrow")[:]["messages"]
    roles = pc.struct_field(pc.list_flatten(messages), "role")
    return collections.Counter({v["values"].as_py(): v["counts"].as_py()
                                for v in pc.value_counts(roles)})


def _message_counts(ds) -> dict:
    """Assistant turns with reasoning, tool calls, and tool results that name their call."""
    import pyarrow.compute as pc
    flat = pc.list_flatten(ds.select_columns(["messages"]).with_format("arrow")[:]["messages"])
    present = lambda key: pc.sum(pc.is_valid(pc.struct_field(flat, key))).as_py() or 0  # noqa: E731
    return {"turns with reasoning": present("reasoning_content"), "turns with tool calls": present("tool_calls"),
            "tool results with a name": present("name")}


def _indent(text, width=500):
    return "\n".join("    " + line for line in _clip(text, width).split("\n"))


def _clip(text, width=200):
    return text if len(text) <= width else text[:width] + f"... ({len(text)} chars)"


if __name__ == "__main__":
    main()
