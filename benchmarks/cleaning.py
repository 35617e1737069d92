"""Cleaning cost: exact + near dedup + decontamination (`cleaning.clean`) against masking the same rows
(`masking.tokenize`, GPT-2 tokenizer, chatml), one process, datasets caching off.

The rows: glaive_toolcall_en_demo replicated to 5k (quick) or 100k rows. Of every 20 copies one is an exact
copy (a reply upper-cased), one a light rewrite (2 words of the longest reply changed) and 18 are new rows
(30 % of the words of every user and assistant turn, and of a call's argument values, replaced by other
glaive words, so no two are near duplicates and every call stays valid); the first copy of each record is the record itself. 100 more rows each quote 13 words of an
eval answer. Eval rows: instruction-data. The figure's detail compares what was found with what was injected:
`duplicate` also counts glaive's own 35 copies, and `near_duplicate` only the rewrites whose Jaccard still
reaches 0.9 (two words changed in a short reply fall below it; see README, Cleaning).
"""
from __future__ import annotations

import json
import random
import re
import tempfile
import time
from pathlib import Path

from .common import data_file, figure, interleaved, median, ratio_of_medians_per_rep, skipped
from .preprocess import GPT2_TOKENIZER, load_tokenizer

SECTION = "cleaning"
GLAIVE, EVAL = "glaive_toolcall_en_demo.json", "instruction-data.json"
REPS = 3
_WORD = re.compile(r"\b[A-Za-z]{3,}\b")


def run(quick: bool) -> list[dict]:
    paths = [data_file(name) for name in (GLAIVE, EVAL, GPT2_TOKENIZER.name)]
    why = next((why for path, why in paths if path is None), None)
    if why:
        return [skipped(SECTION, "glaive variants", why)]
    import datasets

    rows = 5_000 if quick else 100_000
    datasets.disable_caching()  # every timed map computes
    try:
        with tempfile.TemporaryDirectory(prefix="sft_bench_cleaning_") as tmp:
            return [compare(*inputs(paths[0][0], paths[1][0], rows, Path(tmp)))]
    finally:
        datasets.enable_caching()


def variants(records: list[dict], evals: list[dict], rows: int, seed: int = 0) -> tuple[list[dict], dict]:
    """`rows` glaive-like records and how many copies, rewrites and eval quotes were injected."""
    rng = random.Random(seed)
    vocab = sorted({w for r in records for t in r["conversations"] for w in _WORD.findall(t["value"])})
    out, injected = [], {"exact copies": 0, "rewrites": 0, "eval quotes": 0}
    for k in range(rows - 100):
        record, kind = json.loads(json.dumps(records[k % len(records)])), (k // len(records)) % 20
        turns = [t for t in record["conversations"] if t["from"] in ("human", "gpt", "function_call")]
        longest = max(turns, key=lambda t: (t["from"] == "gpt", len(t["value"])))
        if k < len(records):  # the record itself
            pass
        elif kind == 1:
            longest["value"] = longest["value"].upper()
            injected["exact copies"] += 1
        elif kind == 2:
            longest["value"] = _replace(longest["value"], rng, vocab, k=2)
            injected["rewrites"] += 1
        else:
            for t in turns:
                t["value"] = (_replace_call(t["value"], rng, vocab) if t["from"] == "function_call"
                              else _replace(t["value"], rng, vocab, share=0.3))
        out.append(record)
    for e in rng.sample([e for e in evals if len(re.findall(r"\w+", e["output"])) >= 13], 100):
        quote = " ".join(re.findall(r"\w+", e["output"])[:13])
        out.append({"conversations": [{"from": "human", "value": "Say it again, in your words."},
                                      {"from": "gpt", "value": f"As I said: {quote}."}], "tools": ""})
        injected["eval quotes"] += 1
    return out, injected


def _replace_call(text: str, rng, vocab) -> str:
    """A function_call turn (the call as JSON) with words of its argument values replaced: still a valid call."""
    call = json.loads(text)
    args = call.get("arguments")
    parsed = json.loads(args) if isinstance(args, str) else args

    def walk(value):
        if isinstance(value, str):
            return _replace(value, rng, vocab, share=0.3)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return [walk(v) for v in value] if isinstance(value, list) else value

    call["arguments"] = json.dumps(walk(parsed)) if isinstance(args, str) else walk(parsed)
    return json.dumps(call)


def _replace(text: str, rng, vocab, *, k: int = 0, share: float = 0.0) -> str:
    """`k` of the words (or each with probability `share`) replaced by other glaive words."""
    spans = list(_WORD.finditer(text))
    chosen = (set(rng.sample(range(len(spans)), min(k, len(spans)))) if k
              else {i for i in range(len(spans)) if rng.random() < share})
    out, at = [], 0
    for i, m in enumerate(spans):
        out += [text[at:m.start()], rng.choice(vocab) if i in chosen else m.group()]
        at = m.end()
    return "".join(out) + text[at:]


def inputs(glaive: Path, evals: Path, rows: int, tmp: Path):
    from sft_recipes import sources

    records, injected = variants(json.loads(glaive.read_text()), json.loads(evals.read_text()), rows)
    (tmp / "variants.json").write_text(json.dumps(records))
    train, _ = sources.load_conversations([{"path": str(tmp / "variants.json")}], seed=42)
    eval_rows, _ = sources.load_conversations([{"path": str(evals)}], seed=42)
    return train, eval_rows, injected


def compare(train, evals, injected) -> dict:
    from sft_recipes import cleaning, masking

    tokenizer, opts = load_tokenizer()
    options = cleaning.CleanOptions(dedup="near", decontaminate=True)
    found = {}

    def clean():
        start = time.perf_counter()
        found.update(cleaning.clean(train, evals, options)[1].counts)
        return time.perf_counter() - start

    def mask():
        start = time.perf_counter()
        masking.tokenize(train, tokenizer, opts)
        return time.perf_counter() - start

    t_clean, t_mask = interleaved(clean, mask, REPS)
    ratio = ratio_of_medians_per_rep(t_clean, t_mask)
    fig = figure(SECTION, f"glaive x{len(train) // 1000}k: exact + near dedup + decontamination vs masking, time",
                 round(ratio, 2), "x", goal="< 1x", met=ratio < 1, rows=len(train), clean_s=round(median(t_clean), 2),
                 mask_s=round(median(t_mask), 2), found=found, injected=injected,
                 clean_reps_s=[round(t, 2) for t in t_clean], mask_reps_s=[round(t, 2) for t in t_mask])
    print(f"[{SECTION}] {fig['name']}: {ratio:.2f}x ({median(t_clean):.1f} s vs {median(t_mask):.1f} s); "
          f"found {found}, injected {injected}", flush=True)
    return fig
