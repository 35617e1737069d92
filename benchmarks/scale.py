"""How preparation grows: load + clean (exact and near dedup) + mask of a synthetic mixture at two sizes
(100k and 1M rows; 10k and 100k with --quick), one process and `num_proc=2`.

The mixture is generated into a temp folder, never committed: a third each of Alpaca rows (from
alpaca_en_demo), multi-turn ShareGPT rows with tool calls (glaive_toolcall_en_demo: function_call and
observation turns kept as they are) and OpenAI-messages rows with `reasoning_content`
(reasoning/reasoning_content.jsonl). Each generated row is its seed with 30 % of the words of every user and
assistant text replaced by words of the seeds, so no two rows are near duplicates. Every measurement runs in a
fresh spawned process with a fresh datasets cache (the JSON -> Arrow conversion and every map are computed, as on
a first run), through the same functions as `prepare`: sources.load_mixture, cleaning.clean, masking.tokenize
(GPT-2 tokenizer, chatml, max_length 2048). Peak RSS is the main process's (sampled by the parent) and the
largest `num_proc` worker's (getrusage); disk is the JSONL written and the datasets cache the run filled.
"""
from __future__ import annotations

import json
import re
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import GPT2_TOKENIZER, data_file, env, figure, mib, skipped, workers

SECTION = "scale"
SEEDS = {"alpaca": "alpaca_en_demo.json", "sharegpt_tools": "glaive_toolcall_en_demo.json",
         "reasoning": "reasoning/reasoning_content.jsonl"}
MAX_LENGTH = 2048
_WORD = re.compile(r"[A-Za-z]+")


def run(quick: bool) -> list[dict]:
    needed = [data_file(name) for name in (*SEEDS.values(), GPT2_TOKENIZER.name)]
    why = next((why for path, why in needed if path is None), None)
    if why:
        return [skipped(SECTION, "synthetic mixture", why)]
    with tempfile.TemporaryDirectory(prefix="sft_bench_scale_") as tmp:
        small, large = (10_000, 100_000) if quick else (100_000, 1_000_000)
        return figures(measure([(small, 1), (large, 1), (large, 2)], Path(tmp)))


# ---------------------------------------------------------------- the mixture
def write_mixture(folder: Path, rows: int, seed: int = 0) -> list[Path]:
    """`rows` rows as three JSONL files (a third of each kind), streamed to disk."""
    rng = np.random.default_rng(seed)
    seeds = {kind: _read(data_file(name)[0]) for kind, name in SEEDS.items()}
    vocab = sorted({w for records in seeds.values() for r in records for t in _texts(r) for w in _WORD.findall(t)})
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (kind, records) in enumerate(seeds.items()):
        path = folder / f"{kind}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i in range(rows // 3 + (k < rows % 3)):
                f.write(json.dumps(_vary(records[i % len(records)], rng, vocab), ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def _read(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def _texts(record: dict) -> list[str]:
    """The texts a row's words are drawn from and varied in: what users and assistants write."""
    if "instruction" in record:
        return [record[k] for k in ("instruction", "input", "output")]
    if "conversations" in record:
        return [t["value"] for t in record["conversations"] if t["from"] in ("human", "gpt")]
    return [m.get(k) or "" for m in record["messages"] if m["role"] in ("user", "assistant")
            for k in ("content", "reasoning_content")]


def _vary(record: dict, rng, vocab: list[str]) -> dict:
    record = json.loads(json.dumps(record))
    swap = lambda text: _replace(text, rng, vocab)  # noqa: E731
    if "instruction" in record:
        for k in ("instruction", "input", "output"):
            record[k] = swap(record[k])
    elif "conversations" in record:
        for t in record["conversations"]:
            if t["from"] in ("human", "gpt"):
                t["value"] = swap(t["value"])
    else:
        for m in record["messages"]:
            if m["role"] in ("user", "assistant"):
                for k in ("content", "reasoning_content"):
                    if m.get(k):
                        m[k] = swap(m[k])
    return record


def _replace(text: str, rng, vocab: list[str], share: float = 0.3) -> str:
    pieces = _WORD.split(text)
    words = _WORD.findall(text)
    chosen = rng.random(len(words)) < share
    picks = rng.integers(len(vocab), size=int(chosen.sum()))
    it = iter(picks)
    new = [vocab[next(it)] if c else w for w, c in zip(words, chosen)]
    return "".join(p + w for p, w in zip(pieces, [*new, ""]))


# ---------------------------------------------------------------- one measurement, in its own process
class _Prepare:
    """Built once in the worker (imports, tokenizer); a call times load, clean and mask of `files`."""

    def __init__(self, tokenizer_dir: str):
        from sft_recipes import config, prepare
        from sft_recipes.models import load_tokenizer

        self.recipe = config.load_recipe(model_name_or_path=tokenizer_dir, chat_template="chatml",
                                         max_length=MAX_LENGTH, dedup="near")
        self.tokenizer = load_tokenizer(self.recipe)
        self.opts = prepare.mask_options(self.recipe, self.tokenizer)

    def __call__(self, files: list[str], num_proc: int | None) -> dict:
        from sft_recipes import cleaning, masking, sources
        from sft_recipes.config import clean_options

        out, start = {}, time.perf_counter()
        rows, drops, _ = sources.load_mixture([{"path": f} for f in files], seed=42, num_proc=num_proc)
        out["load_s"], out["rss_after_load_mib"] = self._lap(start), self._peak()
        kept, cleaned = cleaning.clean(rows, None, clean_options(self.recipe.data), num_proc=num_proc)
        out["clean_s"], out["rss_after_clean_mib"] = self._lap(start) - out["load_s"], self._peak()
        masked = masking.tokenize(kept, self.tokenizer, self.opts, num_proc=num_proc)
        out["mask_s"] = self._lap(start) - out["load_s"] - out["clean_s"]
        out.update(total_s=self._lap(start), rss_after_mask_mib=self._peak(), rows=len(rows),
                   dropped=sum(drops.values()),
                   cleaned=cleaned.counts, examples=len(masked),
                   refused=len(masked) - masked.data.column("drop").null_count,
                   worker_peak_rss_mib=mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
        return out

    @staticmethod
    def _lap(start: float) -> float:
        return round(time.perf_counter() - start, 2)

    @staticmethod
    def _peak() -> float:
        return mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure(plan: list[tuple[int, int]], tmp: Path) -> dict:
    """{(rows, num_proc): result} for each pair of `plan`, each in a fresh worker and datasets cache."""
    tokenizer_dir = str(data_file(GPT2_TOKENIZER.name)[0])
    results = {}
    for rows in sorted({rows for rows, _ in plan}):
        files = write_mixture(tmp / f"mix{rows}", rows)
        jsonl = sum(p.stat().st_size for p in files)
        for n in sorted(n for r, n in plan if r == rows):
            cache = tmp / f"cache{rows}_{n}"
            with env(HF_DATASETS_CACHE=cache):  # the worker's `datasets` reads it at import
                with workers({"w": (_Prepare, tokenizer_dir)}) as ws:
                    result = ws["w"].call([str(f) for f in files], None if n == 1 else n)
                    result["peak_rss_mib"] = mib(ws["w"].peak_rss)
            result.update(jsonl_mib=mib(jsonl), cache_mib=mib(sum(p.stat().st_size for p in cache.rglob("*")
                                                                 if p.is_file())))
            print(f"[{SECTION}] {rows:,} rows, num_proc {n}: {result}", flush=True)
            results[rows, n] = result
    return results


def figures(results: dict) -> list[dict]:
    small, large = sorted({rows for rows, _ in results})
    one, two = 1, max(n for _, n in results)
    a, b = results[small, one], results[large, one]
    time_ratio = b["total_s"] / a["total_s"]
    rss_ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
    speedup = results[large, one]["total_s"] / results[large, two]["total_s"]
    size = large / small
    out = [
        figure(SECTION, f"load + clean + mask, {large:,} vs {small:,} rows: time", round(time_ratio, 2), "x",
               goal=f"<= {1.1 * size:g}x", met=time_ratio <= 1.1 * size, small=a, large=b),
        figure(SECTION, f"{large:,} vs {small:,} rows: peak RSS (main process)", round(rss_ratio, 2), "x",
               goal="<= 1.5x", met=rss_ratio <= 1.5, small_mib=a["peak_rss_mib"], large_mib=b["peak_rss_mib"]),
        figure(SECTION, f"{large:,} rows: num_proc {two} vs {one}, speed", round(speedup, 2), "x",
               goal=">= 1.6x", met=speedup >= 1.6, **{f"num_proc_{two}": results[large, two]}),
    ]
    for rows in (small, large):
        r = results[rows, one]
        disk = round(r["jsonl_mib"] + r["cache_mib"])
        out.append(figure(SECTION, f"{rows:,} rows: disk (JSONL + datasets cache)", disk, "MiB",
                          jsonl_mib=r["jsonl_mib"], cache_mib=r["cache_mib"], cache_bytes_per_row=round(r["cache_mib"] * 2**20 / rows)))
    return out
