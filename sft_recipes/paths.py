"""Where a recipe's relative paths point: beside the recipe when the path exists there, else in the working
directory (TRL's rule, and what paths typed on the command line always mean).

Data shipped beside a recipe then works from any folder (`cd /tmp && sft-recipes run /path/recipes/x.yaml`), and
a recipe written for the working directory keeps working. Only paths the run reads are resolved (data files, eval
files, a chat template file, a local model, a checkpoint to resume); what a run writes (output_dir,
dataset_prepared_path) and the files TRL reads while parsing (deepspeed, fsdp_config, accelerator_config) stay
relative to the working directory."""
from __future__ import annotations

import glob
from pathlib import Path

# (part of the recipe, key) of each path a run reads; `datasets`/`eval_datasets` entries are handled by `_entry`
_READ = (("data", "chat_template"), ("model", "model_name_or_path"), ("sft", "resume_from_checkpoint"))
_ENTRIES = ("datasets", "eval_datasets")
_BUILDERS = ("json", "csv", "parquet")  # `path: json` + `data_files: ...`, as in load_dataset


def beside(base: Path, value):
    """`value` joined to the recipe's folder `base` when that names something there (a glob: when it matches
    there), else `value` unchanged."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute() or "\n" in value:
        return value
    there = base / value
    try:
        found = bool(glob.glob(str(there))) if glob.has_magic(value) else there.exists()
    except OSError:  # e.g. inline Jinja too long to be a file name
        return value
    return str(there) if found else value


def resolve(recipe, from_cli: set[str]):
    """Resolve the recipe file's relative paths in place; keys given on the command line (`from_cli`) are left
    to the working directory."""
    base = Path(recipe.path).parent
    for part, key in _READ:
        if key not in from_cli:
            obj = getattr(recipe, part)
            setattr(obj, key, beside(base, getattr(obj, key)))
    for key in _ENTRIES:
        entries = getattr(recipe.data, key)
        if key not in from_cli and isinstance(entries, list):  # not a list: `_check_values` says so
            setattr(recipe.data, key, [_entry(base, e) for e in entries])


def _entry(base: Path, entry):
    if isinstance(entry, str):
        return beside(base, entry)
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return entry  # the entry's own checks say what is wrong with it
    if entry["path"] in _BUILDERS and entry.get("data_files"):
        files = entry["data_files"]
        files = beside(base, files) if isinstance(files, str) else [beside(base, f) for f in files]
        return {**entry, "data_files": files}
    return {**entry, "path": beside(base, entry["path"])}
