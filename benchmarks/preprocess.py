"""Preprocessing speed: conversations/s of sft_recipes' masking against TRL's native path, and the cost of
a datasets-cache hit.

Both sides start from the same canonical rows (`sources.load_conversations`) and the same tokenizer
(`trainer.load_tokenizer`: real GPT-2 tokenizer, chatml template, its tokens added):
- sft_recipes: `masking.tokenize` (render once, batch-tokenize with offsets, verify every row);
- TRL native: per row `apply_chat_template(..., return_assistant_tokens_mask=True)` in `Dataset.map`, as
  SFTTrainer does with `assistant_only_loss=True`. TRL then builds labels and truncates in two more maps;
  here both are folded into the same map, so the baseline is if anything faster than TRL itself.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time

from .common import (GPT2_TOKENIZER, Worker, data_file, env, figure, interleaved, median,
                     ratio_of_medians_per_rep, skipped)

SECTION = "preprocess"
GLAIVE = "glaive_toolcall_en_demo.json"
# (label, file, rows: None = as is, N = replicated to N rows by a `weight: N` dataset entry, multi-turn)
DATASETS = [("alpaca_en_demo", "alpaca_en_demo.json", None, False),
            ("instruction-data", "instruction-data.json", None, False),
            ("glaive_toolcall", GLAIVE, None, True),
            ("glaive x10k", GLAIVE, 10_000, True),
            ("glaive x100k", GLAIVE, 100_000, True)]
AGREEMENT_ROWS = 2000  # rows whose tokens and labels are compared between the two sides
REPS = 3


def plan(quick: bool) -> list[tuple]:
    """(label, file, rows, multi_turn, process counts); 100k rows only in full runs, two processes only."""
    out = []
    for label, file, rows, multi in DATASETS:
        if rows == 100_000 and quick:
            continue
        out.append((label, file, rows, multi, (2,) if rows == 100_000 else (1, 2)))
    return out


def run(quick: bool) -> list[dict]:
    tokenizer_dir, why = data_file(GPT2_TOKENIZER.name)
    if tokenizer_dir is None:
        return [skipped(SECTION, "all datasets", why)]
    import datasets

    datasets.disable_caching()  # every timed map computes; nothing is a cache hit
    try:
        figures = speed(quick)
    finally:
        datasets.enable_caching()
    return figures + cache_hits()


def speed(quick: bool) -> list[dict]:
    tokenizer, opts = load_tokenizer()
    figures = []
    for label, file, rows, multi, procs in plan(quick):
        path, why = data_file(file)
        if path is None:
            figures.append(skipped(SECTION, label, why))
            continue
        ds = canonical(path, rows)
        if all(f["value"] is None for f in figures):  # before the first timed comparison
            warm_up(ds, tokenizer, opts)
        figures += [compare(label, ds, tokenizer, opts, num_proc, REPS, multi) for num_proc in procs]
    return figures


# ---------------------------------------------------------------- inputs
def recipe(**overrides):
    from sft_recipes import config

    return config.load_recipe(model_name_or_path=str(GPT2_TOKENIZER), chat_template="chatml", **overrides)


def load_tokenizer():
    from sft_recipes import trainer

    r = recipe()
    tokenizer = trainer.load_tokenizer(r)
    return tokenizer, trainer.mask_options(r, tokenizer)


def spec(path, rows) -> dict:
    return {"path": str(path)} if rows is None else {"path": str(path), "weight": rows}


def canonical(path, rows):
    from sft_recipes import sources

    ds, _ = sources.load_conversations([spec(path, rows)], seed=42)
    return ds


# ---------------------------------------------------------------- the two sides
def ours(ds, tokenizer, opts, num_proc):
    from sft_recipes import masking

    return masking.tokenize(ds, tokenizer, opts, num_proc=num_proc)


def native(ds, tokenizer, opts, num_proc):
    fn_kwargs = {"tokenizer": tokenizer, "template": opts.template, "max_length": opts.max_length}
    return ds.map(_native_row, fn_kwargs=fn_kwargs, num_proc=num_proc)


def _native_row(example, tokenizer, template, max_length):
    """TRL's `tokenize_fn` for a conversational row with assistant_only_loss, plus its labels and
    truncation steps, in one function."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    out = tokenizer.apply_chat_template(example["messages"], tools=tools, chat_template=template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    ids = out["input_ids"]
    labels = [t if m else -100 for t, m in zip(ids, out["assistant_masks"])]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def warm_up(ds, tokenizer, opts):
    """Once, untimed: whatever either side does only on its first call (template compile, lazy imports)."""
    head = ds.select(range(min(64, len(ds))))
    ours(head, tokenizer, opts, None)
    native(head, tokenizer, opts, None)


def agreement(a, b) -> str:
    """How many of the first rows have the same tokens and labels on both sides (refused rows excepted)."""
    n = min(len(a), AGREEMENT_ROWS)
    a, b = a.select(range(n)), b.select(range(n))
    kept = [i for i, d in enumerate(a["drop"]) if d is None]
    same = sum(a[i]["input_ids"] == b[i]["input_ids"] and a[i]["labels"] == b[i]["labels"] for i in kept)
    return f"{same}/{len(kept)} rows identical ({n - len(kept)} refused by sft_recipes)"


def compare(label, ds, tokenizer, opts, num_proc, reps, multi_turn) -> dict:
    outputs = {}

    def side(name, fn):
        def go():
            with _children_quiet(num_proc):
                start = time.perf_counter()
                outputs[name] = fn(ds, tokenizer, opts, in_process_if_one(num_proc))
                return time.perf_counter() - start
        return go

    t_ours, t_native = interleaved(side("ours", ours), side("native", native), reps)
    speedup = ratio_of_medians_per_rep(t_native, t_ours)  # time ratio = throughput ratio
    goal = ">= 2x" if multi_turn else None
    fig = figure(SECTION, f"{label}, {num_proc} proc: sft_recipes vs TRL native", round(speedup, 2), "x",
                 goal=goal, met=speedup >= 2 if multi_turn else None, rows=len(ds), num_proc=num_proc,
                 ours_conv_per_s=round(len(ds) / median(t_ours)), native_conv_per_s=round(len(ds) / median(t_native)),
                 ours_s=[round(t, 3) for t in t_ours], native_s=[round(t, 3) for t in t_native],
                 agreement=agreement(outputs["ours"], outputs["native"]) if num_proc == 1 and len(ds) <= 10_000
                 else None)
    _print(fig)
    return fig


def in_process_if_one(num_proc):
    """One process means in this process: `datasets` 5.2 runs num_proc=1 in a one-worker pool (the recipe
    loader maps dataset_num_proc 1 to None for the same reason)."""
    return num_proc if num_proc > 1 else None


def _children_quiet(num_proc):
    """Forked map workers disable tokenizers' thread pool anyway (it was used in this process); saying so
    up front only spares the warning each child would print. One-process runs keep the user's setting."""
    return env(TOKENIZERS_PARALLELISM="false") if num_proc and num_proc > 1 else env()


def _print(fig):
    d = fig["detail"]
    print(f"[{SECTION}] {fig['name']}: {fig['value']}x ({d['ours_conv_per_s']} vs {d['native_conv_per_s']} conv/s)",
          flush=True)


# ---------------------------------------------------------------- cache hit
def cache_hits(rows: int = 10_000) -> list[dict]:
    """Run `trainer.build_datasets` on glaive replicated to `rows` in two fresh processes sharing a fresh
    datasets cache: the second should be nearly free. Reported for the whole call and for the part spent in
    `load_conversations` and `masking.tokenize`."""
    names = {"tokenize": f"cache hit, load_conversations -> masking.tokenize (glaive x{rows // 1000}k)",
             "build": f"cache hit, whole trainer.build_datasets (glaive x{rows // 1000}k)"}
    path, why = data_file(GLAIVE)
    if path is None:
        return [skipped(SECTION, name, why) for name in names.values()]
    cache = tempfile.mkdtemp(prefix="sft_bench_cache_")
    try:
        with env(HF_DATASETS_CACHE=cache):
            first, second = (_run_in_fresh_process(path, rows) for _ in range(2))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return [_cache_figure(name, first[key], second[key]) for key, name in names.items()]


def _cache_figure(name, first, second) -> dict:
    fraction = second / first
    fig = figure(SECTION, f"{name}: second identical run / first", round(100 * fraction, 1), "%", goal="< 5 %",
                 met=fraction < 0.05, first_s=round(first, 3), second_s=round(second, 3))
    print(f"[{SECTION}] {fig['name']}: {fig['value']} % ({second:.2f} s / {first:.2f} s)", flush=True)
    return fig


def _run_in_fresh_process(path, rows) -> dict:
    worker = Worker(_Preparation, str(path), rows)
    try:
        worker.ready()
        return worker.call()
    finally:
        worker.close()


class _Preparation:
    """In a worker: the tokenizer is loaded up front; a call times `build_datasets`, and the time spent
    inside `load_conversations` and `masking.tokenize` (wrapped with a stopwatch)."""

    def __init__(self, path, rows):
        from sft_recipes import masking, sources

        self.recipe = recipe(datasets=[spec(path, rows)])
        self.tokenizer, _ = load_tokenizer()
        self.inner = []
        for module, name in ((sources, "load_conversations"), (masking, "tokenize")):
            setattr(module, name, _stopwatch(getattr(module, name), self.inner))

    def __call__(self):
        from sft_recipes import trainer

        start = time.perf_counter()
        trainer.build_datasets(self.recipe, self.tokenizer)
        return {"build": time.perf_counter() - start, "tokenize": sum(self.inner)}


def _stopwatch(fn, seconds: list):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)
    return timed
