"""Prepare the data once: load, clean and mask a recipe's rows (sources -> cleaning -> masking), every process
masking its share, and optionally keep them in `dataset_prepared_path` for `run` to read instead of masking again.

    python -m sft_recipes.prepare RECIPE.yaml --dataset_prepared_path data/prepared
    accelerate launch --num_processes N -m sft_recipes.prepare RECIPE.yaml   (each process masks 1/N)

The folder holds `train/` and `eval/` (the trained columns, `datasets`' save_to_disk Arrow shards) and
`manifest.json`, written last: the recipe keys that decide the rows, fingerprints of the tokenizer and the chat
template, the counts and every drop reason. `run` refuses a manifest that differs from its recipe, naming the key;
with no manifest there yet it prepares the folder first. The folder is all a node needs: copy it to nodes that share
nothing else.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from accelerate import PartialState
from datasets import Dataset, concatenate_datasets, load_from_disk
from datasets.table import InMemoryTable

from . import __version__, cleaning, masking, sources
from .config import Recipe, ScriptArguments, clean_options, parse_recipe, recipe_help_parser
from .errors import RecipeError, cli
from .models import load_tokenizer

logger = logging.getLogger("sft_recipes")
PROG = "python -m sft_recipes.prepare"
MANIFEST = "manifest.json"
_OURS = {MANIFEST, f"{MANIFEST}.tmp", "train", "eval", ".parts"}  # what a prepared folder may hold
_NOT_ROWS = {"early_stopping_patience", "overwrite_output_dir", "dataset_prepared_path"}  # data keys that change no row
_SFT_KEYS = ("seed", "max_length")  # the training keys that do (mixture order and split; truncation)
_CODE = ("sources.py", "formats.py", "messages.py", "tool_calls.py", "cleaning.py", "templates.py", "masking.py")


# ---------------------------------------------------------------- masks
def mask_options(recipe: Recipe, tokenizer) -> masking.MaskOptions:
    d = recipe.data
    return masking.MaskOptions(template=tokenizer.chat_template, end_of_turn=getattr(tokenizer, "end_of_turn", None),
                               train_on=d.train_on, train_on_inputs=d.train_on_inputs,
                               max_length=recipe.sft.max_length, truncation=d.truncation, verify=d.verify_masks,
                               multi_turn=d.multi_turn, reasoning=d.reasoning, train_on_reasoning=d.train_on_reasoning,
                               chat_template_kwargs=d.chat_template_kwargs)


# ---------------------------------------------------------------- datasets
def build_datasets(recipe: Recipe, tokenizer):
    """Canonical conversations -> masked token rows ready for TRL. Returns (train, eval or None, stats). With
    `dataset_prepared_path`, the rows come from that folder (prepared first when it holds none yet)."""
    if recipe.data.dataset_prepared_path:
        if not (Path(recipe.data.dataset_prepared_path) / MANIFEST).is_file():
            prepare(recipe, tokenizer)
        return read(recipe, tokenizer)
    train, evals, stats = masked_datasets(recipe, tokenizer)
    return _trainable(train), _trainable(evals) if evals is not None else None, stats


def masked_datasets(recipe: Recipe, tokenizer, parts: Path | None = None):
    """Like `build_datasets`, keeping every column (messages, drop reason, counts) and refused rows. With `parts`
    (a folder every process can read), each of N processes masks a contiguous 1/N of the rows there."""
    d, s = recipe.data, recipe.sft
    if not d.datasets:
        raise RecipeError(f"{recipe.path or 'recipe'}: no `datasets:` to train on")
    with PartialState().main_process_first():  # rank 0 fills the datasets cache, the others read it
        train, drops, repeats = sources.load_mixture(d.datasets, seed=s.seed, num_proc=s.dataset_num_proc,
                                                     strict=d.strict)
        evals, eval_drops = None, sources.Drops()
        if d.eval_datasets:
            evals, eval_drops = sources.load_conversations(d.eval_datasets, seed=s.seed,
                                                           num_proc=s.dataset_num_proc, strict=d.strict)
        elif d.eval_split:
            train, evals = sources.split_eval(train, d.eval_split, s.seed)
        train, cleaned = cleaning.clean(train, evals, clean_options(d), num_proc=s.dataset_num_proc)
        train = sources.repeat(train, repeats, s.seed)  # after dedup, so a deliberate repeat still repeats
    opts = mask_options(recipe, tokenizer)
    train = _mask(train, tokenizer, opts, s.dataset_num_proc, parts and parts / "train", "Masking train")
    if evals is not None:
        evals = _mask(evals, tokenizer, opts, s.dataset_num_proc, parts and parts / "eval", "Masking eval")
    stats = {"train": _stats(train, drops, cleaned), "eval": _stats(evals, eval_drops) if evals is not None else None}
    for split, st in stats.items():
        if st and st["rows"] == 0:
            reason, n = next(iter(st["refused"].items()), ("none", 0))
            example = st["examples_refused"].get(reason, [""])[0]
            raise RecipeError(f"no {split} rows left to train on: {n} refused ({reason}: {example}); "
                              "check chat_template, max_length and the data with `python -m sft_recipes.inspect`")
    if d.strict:
        for split, st in stats.items():
            if st and st["refused"]:
                reason, n = next(iter(st["refused"].items()))
                raise RecipeError(f"strict: {n} {split} examples refused ({reason}: {st['examples_refused'][reason][0]}); "
                                  "fix the data or template, or turn `strict` off to drop them")
            if st and st["reasoning_unprinted"]:
                raise RecipeError(f"strict: the template prints no reasoning for {st['reasoning_unprinted']} {split} "
                                  "turns that have some; choose a template that prints it, set `reasoning: drop`, "
                                  "or turn `strict` off")
    return train, evals, stats


def _mask(ds, tokenizer, opts, num_proc, parts: Path | None, desc: str):
    """Mask `ds`. Split across processes when there is a shared folder for the pieces: process r masks the r-th
    contiguous shard, saves it, and every process reads the N pieces back in rank order, so the rows (and their
    `row` numbers) are those one process makes."""
    state = PartialState()
    if parts is None or state.num_processes == 1:
        with state.main_process_first():
            return masking.tokenize(ds, tokenizer, opts, num_proc=num_proc, desc=desc)
    n, rank = state.num_processes, state.process_index
    start = sum(len(ds.shard(n, r, contiguous=True)) for r in range(rank))
    mine = masking.tokenize(ds.shard(n, rank, contiguous=True), tokenizer, opts, num_proc=num_proc,
                            desc=f"{desc} ({rank + 1}/{n})")
    _numbered_from(mine, start).save_to_disk(str(parts / f"{rank:05d}"))
    state.wait_for_everyone()
    pieces = [parts / f"{r:05d}" for r in range(n)]
    missing = [p.name for p in pieces if not p.is_dir()]
    if missing:
        raise RecipeError(f"{parts.parent.parent}: process {rank} cannot see the pieces of processes "
                          f"{', '.join(m.lstrip('0') or '0' for m in missing)}: the folder is not shared; run "
                          f"`sft-recipes prepare` on one machine and copy the folder to every node")
    return concatenate_datasets([load_from_disk(str(p)) for p in pieces])


def _numbered_from(ds: Dataset, start: int) -> Dataset:
    """`ds` with its `row` numbers (conversation index in the shard) counted from `start`, as in the whole
    dataset; the other columns stay the memory-mapped ones, written once by the save that follows."""
    table = (ds.flatten_indices() if ds._indices is not None else ds).data.table
    row = pc.add(table.column("row"), pa.scalar(start, pa.int32()))
    return Dataset(InMemoryTable(table.set_column(table.schema.get_field_index("row"), "row", row)), info=ds.info)


def _stats(ds, drops: sources.Drops, cleaned: cleaning.Cleaned | None = None) -> dict:
    cols = ["drop", "detail", "n_tokens", "n_trained", "truncated", "row", "split", "reasoning_trained",
            "reasoning_unprinted", "notes", "unused", "source", "record"]
    c = ds.select_columns([k for k in cols if k in ds.column_names]).to_dict()  # one read
    refused, examples = Counter(), {}
    where = zip(c.get("source") or [None] * len(c["drop"]), c.get("record") or [None] * len(c["drop"]))
    for reason, detail, (source, record) in zip(c["drop"], c["detail"], where):
        if reason:
            refused[reason] += 1
            if refused[reason] <= 3:  # named by file and record, as data errors are
                examples.setdefault(reason, []).append(f"{source}, record {record}: {detail}" if source else detail)
    kept = [i for i, reason in enumerate(c["drop"]) if reason is None]
    n_tokens, n_trained = sum(c["n_tokens"][i] for i in kept), sum(c["n_trained"][i] for i in kept)
    rows = {c["row"][i] for i in kept}
    split = {}  # row -> token counts of its examples
    for i in kept:
        if c["split"][i]:
            split.setdefault(c["row"][i], []).append(c["n_tokens"][i])
    first = {}  # each conversation's unused fields once (its per-turn examples share them)
    for row, names in zip(c["row"], c.get("unused") or [[]] * len(c["row"])):
        first.setdefault(row, names or [])
    cleaned = cleaned or cleaning.Cleaned()
    return {"rows": len(rows), "examples": len(kept), "dropped": dict(drops),
            "drop_examples": drops.examples, "cleaned": cleaned.counts,
            "cleaning_examples": cleaned.examples, "refused": dict(refused.most_common()),
            "examples_refused": examples, "truncated": sum(c["truncated"]), "tokens": n_tokens,
            "trained_tokens": n_trained, "trained_fraction": n_trained / max(n_tokens, 1),
            "split_rows": len(split), "split_examples": sum(map(len, split.values())),
            # what one example per row would have cost: its longest (last) example
            "split_extra_tokens": sum(sum(t) - max(t) for t in split.values()),
            "reasoning_trained": sum(c["reasoning_trained"][i] for i in kept),
            "reasoning_unprinted": sum(c["reasoning_unprinted"][i] for i in kept),
            "notes": dict(Counter(n for i in kept for n in c["notes"][i]).most_common()),
            "unused": dict(Counter(n for names in first.values() for n in names).most_common())}


def _trainable(ds):
    ds = ds.filter(lambda drop: [d is None for d in drop], input_columns="drop", batched=True, desc="Dropping refused")
    return ds.select_columns(["input_ids", "labels"])


# ---------------------------------------------------------------- the prepared folder
def prepare(recipe: Recipe, tokenizer):
    """Load, clean and mask (split across processes), then write the trained columns and the manifest to
    `dataset_prepared_path`, replacing what an earlier `prepare` wrote there. Returns (train, eval or None, stats)."""
    folder, state = _folder(recipe), PartialState()
    parts = folder / ".parts" if state.num_processes > 1 else None
    _refuse_foreign(folder)  # on every process, so none is left waiting for one that stopped
    if state.is_main_process:
        _clear(folder)
    state.wait_for_everyone()
    train, evals, stats = masked_datasets(recipe, tokenizer, parts)
    if state.is_main_process:
        _trainable(train).save_to_disk(str(folder / "train"))
        if evals is not None:
            _trainable(evals).save_to_disk(str(folder / "eval"))
        text = json.dumps({**manifest(recipe, tokenizer), "stats": stats}, indent=1, ensure_ascii=False)
        (folder / f"{MANIFEST}.tmp").write_text(text)
        (folder / f"{MANIFEST}.tmp").rename(folder / MANIFEST)  # last: a folder with a manifest is complete
        logger.warning("prepared %d train examples%s into %s", stats["train"]["examples"],
                       f" and {stats['eval']['examples']} eval" if stats["eval"] else "", folder)
    state.wait_for_everyone()
    if parts is not None and state.is_main_process:
        shutil.rmtree(parts, ignore_errors=True)
    return train, evals, stats


def read(recipe: Recipe, tokenizer):
    """The prepared rows, after checking that the manifest matches this recipe and tokenizer."""
    folder = _folder(recipe)
    try:
        saved = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"dataset_prepared_path {folder}: cannot read {MANIFEST} ({e}); run `sft-recipes "
                          "prepare RECIPE` again") from None
    _check(saved, manifest(recipe, tokenizer), folder)
    train = load_from_disk(str(folder / "train"))
    evals = load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    if PartialState().is_main_process:
        logger.warning("read %d prepared train rows%s from %s (no masking pass)", len(train),
                       f" and {len(evals)} eval" if evals is not None else "", folder)
    return train, evals, saved["stats"]


def manifest(recipe: Recipe, tokenizer) -> dict:
    """What decides the prepared rows: the recipe's data keys, seed and max_length, the tokenizer, the template."""
    keys = {f.name: getattr(recipe.data, f.name) for f in fields(ScriptArguments) if f.name not in _NOT_ROWS}
    keys.update({k: getattr(recipe.sft, k) for k in _SFT_KEYS})
    backend = tokenizer.backend_tokenizer.to_str() + json.dumps(tokenizer.special_tokens_map, sort_keys=True)
    code = "".join((Path(__file__).parent / f).read_text() for f in _CODE)
    return {"keys": json.loads(json.dumps(keys, default=str)), "tokenizer": _hash(backend),
            "chat_template": _hash(tokenizer.chat_template or ""),
            "model_name_or_path": recipe.model.model_name_or_path,
            "sft_recipes": __version__, "code": _hash(code), "processes": PartialState().num_processes,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _check(saved: dict, now: dict, folder: Path):
    """One line naming the first key that differs; changed code is only warned about (a rebuild is the user's call)."""
    again = "run `sft-recipes prepare RECIPE` again, or point dataset_prepared_path at another folder"
    old, new = saved.get("keys", {}), now["keys"]
    for key in [*new, *(k for k in old if k not in new)]:
        if old.get(key) != new.get(key):
            raise RecipeError(f"dataset_prepared_path {folder} was prepared with {key}: {json.dumps(old.get(key))}, "
                              f"this recipe has {key}: {json.dumps(new.get(key))}; {again}")
    for key in ("tokenizer", "chat_template"):
        if saved.get(key) != now[key]:
            raise RecipeError(f"dataset_prepared_path {folder} was prepared with another {key.replace('_', ' ')} "
                              f"(model_name_or_path {saved.get('model_name_or_path')} then, "
                              f"{now['model_name_or_path']} now); {again}")
    if saved.get("code") != now["code"] and PartialState().is_main_process:
        logger.warning("%s was prepared by other sft_recipes code (%s); if the masking changed, prepare again",
                       folder, saved.get("sft_recipes"))


def _folder(recipe: Recipe) -> Path:
    path = recipe.data.dataset_prepared_path
    if not path:
        raise RecipeError("set `dataset_prepared_path: FOLDER` in the recipe (or --dataset_prepared_path FOLDER): "
                          "where the prepared rows go")
    return Path(path)


def _refuse_foreign(folder: Path):
    """A preparation replaces only what an earlier one wrote: a folder holding anything else is refused."""
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"dataset_prepared_path {folder} is a file; give a folder")
    others = sorted(p.name for p in folder.iterdir() if p.name not in _OURS) if folder.is_dir() else []
    if others:
        raise RecipeError(f"dataset_prepared_path {folder} holds files `prepare` did not write "
                          f"({', '.join(others[:3])}); give an empty or new folder")


def _clear(folder: Path):
    for name in _OURS:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


# ---------------------------------------------------------------- command
@cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    helper = recipe_help_parser(PROG, "Load, clean and mask a recipe's data once and save the rows (Arrow) with a "
                                      "manifest in `dataset_prepared_path`; `run` with the same recipe reads them.",
                                ("large-data",))
    if {"-h", "--help"} & set(argv):
        helper.print_help()
        return
    if not argv:
        helper.error("give a recipe (e.g. recipes/tiny_alpaca.yaml) and --dataset_prepared_path FOLDER")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING, force=True)
    recipe = parse_recipe(argv)
    folder, started = _folder(recipe), time.time()
    train, evals, stats = prepare(recipe, load_tokenizer(recipe))
    if PartialState().is_main_process:
        from rich.console import Console

        from .summary import print_data

        print_data(Console(), stats)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"prepared {stats['train']['rows']:,} train rows ({stats['train']['examples']:,} examples) in "
              f"{time.time() - started:.1f} s: {folder} ({size / 1e6:.1f} MB). `sft-recipes run` with the same "
              "recipe reads them.")


if __name__ == "__main__":
    main()
