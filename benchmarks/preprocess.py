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

from pathlib import Path

from .common import (GPT2_TOKENIZER, ROOT, Worker, data_file, env, figure, interleaved, median,
                     ratio_of_medians_per_rep, skipped, workers)

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
        figures = speed(quick) + [reasoning_vs_trl(quick), before_and_after(quick)]
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
    from sft_recipes.messages import chat_messages

    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    out = tokenizer.apply_chat_template(chat_messages(example["messages"]), tools=tools, chat_template=template,
                                        tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
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


# ---------------------------------------------------------------- reasoning: Qwen3's own template vs TRL
REASONING = "reasoning/reasoning_content.jsonl"


def reasoning_vs_trl(quick: bool) -> dict:
    """Qwen3's released template and the real Qwen3 vocabulary on reasoning_content.jsonl replicated x100:
    sft_recipes (`chat_template: trl:qwen3`; multi-turn rows become one example per turn) against TRL's own
    dataset preparation with `assistant_only_loss=True`, which swaps in its `qwen3_training.jinja` (TRL's
    `SFTTrainer._prepare_dataset`, timed on a trainer built once). Conversations per second, same rows."""
    name = "reasoning, Qwen3 template + tokenizer, reasoning_content x100, 1 proc: sft_recipes vs TRL assistant_only_loss"
    path, why = data_file(REASONING)
    tok_dir, why_tok = data_file("tokenizers/qwen3")
    if path is None or tok_dir is None:
        return skipped(SECTION, name, why or why_tok)
    from sft_recipes import masking, sources, templates

    tokenizer = _qwen3(tok_dir, templates)
    ds, _ = sources.load_conversations([spec(path, 100 * 100)], seed=42)
    opts = masking.MaskOptions(template=tokenizer.chat_template)
    trl_side = _TrlPreparation(ds, tokenizer)
    masking.tokenize(ds.select(range(64)), tokenizer, opts)  # untimed warm-up, both sides
    trl_side(64)
    outputs = {}

    def ours():
        start = time.perf_counter()
        outputs["ours"] = masking.tokenize(ds, tokenizer, opts)
        return time.perf_counter() - start

    t_ours, t_trl = interleaved(ours, lambda: trl_side(None), 2 if quick else REPS)
    speedup = ratio_of_medians_per_rep(t_trl, t_ours)
    out = outputs["ours"]
    trl_tokens = trl_side.tokens
    fig = figure(SECTION, name, round(speedup, 2), "x", goal=">= 1.5x", met=speedup >= 1.5, rows=len(ds),
                 ours_conv_per_s=round(len(ds) / median(t_ours)), trl_conv_per_s=round(len(ds) / median(t_trl)),
                 examples_per_row=round(len(out) / len(ds), 2), tokens_vs_trl=round(sum(out["n_tokens"]) / trl_tokens, 2),
                 rows_split=len({r for r, sp in zip(out["row"], out["split"]) if sp}),
                 ours_s=[round(t, 3) for t in t_ours], trl_s=[round(t, 3) for t in t_trl])
    d = fig["detail"]
    print(f"[{SECTION}] {name}: {speedup:.2f}x ({d['ours_conv_per_s']} vs {d['trl_conv_per_s']} conv/s; "
          f"{d['examples_per_row']} examples per row, {d['tokens_vs_trl']}x TRL's tokens)", flush=True)
    return fig


def _qwen3(tok_dir, templates):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    tokenizer.chat_template = templates.load_template("trl:qwen3", tokenizer)
    return tokenizer


class _TrlPreparation:
    """TRL's SFTTrainer preparation of the same conversations (as OpenAI messages) with
    assistant_only_loss: built once on a one-layer model; a call re-runs `_prepare_dataset` on all rows."""

    def __init__(self, ds, tokenizer):
        import copy

        from datasets import Dataset
        from transformers import AutoModelForCausalLM, GPT2Config
        from trl import SFTConfig, SFTTrainer

        from sft_recipes.messages import chat_messages

        self.rows = Dataset.from_list([{"messages": chat_messages(m)} for m in ds["messages"]])
        tok = copy.deepcopy(tokenizer)
        model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok)))
        self.args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="sft_bench_trl_"), assistant_only_loss=True,
                              report_to="none", use_cpu=True, bf16=False, max_length=None)
        self.trainer = SFTTrainer(model=model, args=self.args, train_dataset=self.rows.select(range(8)),
                                  processing_class=tok)
        self.tokens = None

    def __call__(self, n):
        rows = self.rows if n is None else self.rows.select(range(n))
        start = time.perf_counter()
        out = self.trainer._prepare_dataset(rows, self.trainer.processing_class, self.args, False, None, "bench")
        seconds = time.perf_counter() - start
        if n is None:
            self.tokens = sum(len(ids) for ids in out["input_ids"])
        return seconds


# ---------------------------------------------------------------- glaive before and after this change
BASE_COMMIT = "f04c7be"  # main before reasoning and structured tool calls (tool calls were content text)
CONTROL_TEMPLATE = Path(__file__).parent / "chatml_f04c7be_text.jinja"


def before_and_after(quick: bool) -> dict:
    """Masking glaive_toolcall_en_demo replicated to 10k rows (3k with --quick) with the chatml template and the
    GPT-2 tokenizer: this checkout against BASE_COMMIT (extracted with `git archive`), each in a fresh worker
    process, timed alternately. The new side prints tools and calls as structure (more text per row); a third
    worker runs this checkout's code on BASE_COMMIT's text (CONTROL_TEMPLATE), which splits the change into
    what the code costs (same text) and what the longer text costs (same code)."""
    rows = 3_000 if quick else 10_000
    name = f"glaive x{rows // 1000}k, chatml, 1 proc: masking now vs before structured tool calls ({BASE_COMMIT})"
    path, why = data_file(GLAIVE)
    if path is None:
        return skipped(SECTION, name, why)
    old = tempfile.mkdtemp(prefix="sft_bench_base_")
    try:
        import subprocess
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASE_COMMIT, "sft_recipes", "chat_templates"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        shutil.rmtree(old, ignore_errors=True)
        return skipped(SECTION, name, f"skipped: cannot extract {BASE_COMMIT} ({e})")
    sides = {"now": (_Masking, None, str(path), rows), "before": (_Masking, old, str(path), rows),
             "control": (_Masking, None, str(path), rows, str(CONTROL_TEMPLATE))}
    try:
        with workers(sides) as ws:
            pairs, t_before = interleaved(lambda: (ws["now"].call(), ws["control"].call()),
                                          lambda: ws["before"].call(), 2 if quick else REPS)
            tokens = {side: w.call("tokens") for side, w in ws.items()}
            same_text = ws["control"].call("digest") == ws["before"].call("digest")
    finally:
        shutil.rmtree(old, ignore_errors=True)
    t_now, t_control = [p[0] for p in pairs], [p[1] for p in pairs]
    speedup = ratio_of_medians_per_rep(t_before, t_now)
    per_token = speedup * tokens["now"] / tokens["before"]  # the new rows print more: the tool prompt, call tags
    fig = figure(SECTION, name, round(speedup, 2), "x", goal=">= 1x", met=speedup >= 1, rows=rows,
                 now_conv_per_s=round(rows / median(t_now)), before_conv_per_s=round(rows / median(t_before)),
                 now_tokens_per_row=round(tokens["now"] / rows, 1), before_tokens_per_row=round(tokens["before"] / rows, 1),
                 tokens_per_s_ratio=round(per_token, 2),
                 code_factor=round(ratio_of_medians_per_rep(t_before, t_control), 2),  # same text, new code
                 text_factor=round(ratio_of_medians_per_rep(t_control, t_now), 2),     # same code, new text
                 control_same_tokens_as_before=same_text,  # each distinct row's input_ids: the control is the old text
                 now_s=[round(t, 3) for t in t_now], before_s=[round(t, 3) for t in t_before],
                 control_s=[round(t, 3) for t in t_control])
    d = fig["detail"]
    print(f"[{SECTION}] {name}: {speedup:.2f}x ({d['now_conv_per_s']} vs {d['before_conv_per_s']} conv/s; "
          f"{d['now_tokens_per_row']} vs {d['before_tokens_per_row']} tokens a row: {per_token:.2f}x tokens/s; "
          f"new code on the old text {d['code_factor']:.2f}x (same tokens: {same_text}), new text on the new code "
          f"{d['text_factor']:.2f}x)", flush=True)
    return fig


class _Masking:
    """In a worker: sft_recipes from `code_dir` (None: this checkout), the GPT-2 tokenizer with that version's
    chatml template (or `template`, trusted as a shipped one is, so the same code path runs), canonical
    glaive rows; a call times `masking.tokenize` on them."""

    def __init__(self, code_dir, path, rows, template=None):
        import sys

        if code_dir:
            sys.path.insert(0, code_dir)
        import datasets

        from sft_recipes import config, masking, sources, templates, trainer
        assert code_dir is None or masking.__file__.startswith(code_dir)
        datasets.disable_caching()
        if template:
            templates.is_shipped = lambda source: True
        template = template or (str(Path(code_dir) / "chat_templates" / "chatml.jinja") if code_dir else "chatml")
        r = config.load_recipe(model_name_or_path=str(GPT2_TOKENIZER), chat_template=template)
        self.tokenizer = trainer.load_tokenizer(r)
        self.opts = trainer.mask_options(r, self.tokenizer)
        self.ds, _ = sources.load_conversations([spec(path, rows)], seed=42)
        self.masking = masking
        masking.tokenize(self.ds.select(range(64)), self.tokenizer, self.opts)

    def __call__(self, what="seconds"):
        if what == "tokens":  # of the last run, counted outside its timing
            return sum(self.out["n_tokens"])
        if what == "digest":
            import hashlib
            # Distinct rows: the two loaders fill the last partial copy of the 300 rows with different ones.
            return hashlib.sha256(json.dumps(sorted({tuple(ids) for ids in self.out["input_ids"]})).encode()).hexdigest()
        start = time.perf_counter()
        self.out = self.masking.tokenize(self.ds, self.tokenizer, self.opts)
        return time.perf_counter() - start

