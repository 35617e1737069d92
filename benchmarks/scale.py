"""How preparation grows: load + clean (exact and near dedup) + mask of a synthetic mixture at two sizes
(100k and 1M rows; 10k and 100k with --quick) in one process, and `num_proc=2` at one size (100k; 100k with
--quick too) for the speedup.

The mixture is generated into a temp folder, never committed: a third each of Alpaca rows (from
alpaca_en_demo), multi-turn ShareGPT rows with tool calls (glaive_toolcall_en_demo: function_call and
observation turns kept as they are) and OpenAI-messages rows with `reasoning_content`
(reasoning/reasoning_content.jsonl). Each generated row is its seed with 30 % of the words of every user and
assistant text replaced by words of the seeds, so no two rows are near duplicates. Every measurement runs in a
fresh spawned process with a fresh datasets cache (the JSON -> Arrow conversion and every map are computed, as on
a first run), through the same functions as `prepare`: sources.load_mixture, cleaning.clean, masking.tokenize
(GPT-2 tokenizer, chatml, max_length 2048). Peak RSS is the main process's (sampled by the parent) and the
largest `num_proc` worker's (getrusage). RSS counts the touched pages of the memory-mapped Arrow files (page
cache the kernel can reclaim), so the memory goal is on anonymous memory (RSS less file-backed pages: what the
process holds itself); RSS and anonymous memory are also recorded after each stage, to attribute the growth.
At each size a second worker loads (from the first's cache) and cleans with dedup exact, the bounded
alternative, so the clean stage's memory per row is known for near and exact dedup apart. Disk is the JSONL
written and the datasets cache the run filled.
"""
from __future__ import annotations

import json
import re
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import GPT2_TOKENIZER, data_file, env, figure, mib, rss_split, skipped, workers

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
        both = large if quick else small  # the full run's speedup at 100k: 1M at num_proc 2 costs too long
        return figures(measure(sorted({(small, 1), (large, 1), (both, 2)}), Path(tmp)))


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

    def __call__(self, files: list[str], num_proc: int | None, dedup: str = "near", mask: bool = True) -> dict:
        """`mask=False`: load and clean only (the exact-dedup comparison of the clean stage)."""
        from dataclasses import replace

        from sft_recipes import cleaning, masking, sources
        from sft_recipes.config import clean_options

        out, start = self._memory("start"), time.perf_counter()
        rows, drops, _ = sources.load_mixture([{"path": f} for f in files], seed=42, num_proc=num_proc)
        out.update(load_s=self._lap(start), **self._memory("load"))
        options = replace(clean_options(self.recipe.data), dedup=dedup)
        kept, cleaned = cleaning.clean(rows, None, options, num_proc=num_proc)
        out.update(clean_s=self._lap(start) - out["load_s"], **self._memory("clean"))
        out.update(rows=len(rows), dropped=sum(drops.values()), cleaned=cleaned.counts)
        if not mask:
            return out
        masked = masking.tokenize(kept, self.tokenizer, self.opts, num_proc=num_proc)
        out["mask_s"] = self._lap(start) - out["load_s"] - out["clean_s"]
        out.update(total_s=self._lap(start), **self._memory("mask"), examples=len(masked),
                   refused=len(masked) - masked.data.column("drop").null_count,
                   worker_peak_rss_mib=mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
        return out

    @staticmethod
    def _lap(start: float) -> float:
        return round(time.perf_counter() - start, 2)

    @staticmethod
    def _memory(stage: str) -> dict:
        """After `stage`: peak RSS so far (getrusage), and the RSS, anonymous memory and Arrow buffers (not
        memory-mapped ones) held now; every stage's datasets are still referenced, so the growth from one stage to
        the next is what that stage holds."""
        import psutil
        import pyarrow as pa

        rss, anon, _ = rss_split(psutil.Process())
        return {f"rss_after_{stage}_mib": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
                f"rss_now_after_{stage}_mib": mib(rss), f"anon_after_{stage}_mib": mib(anon),
                f"arrow_after_{stage}_mib": mib(pa.total_allocated_bytes())}


def measure(plan: list[tuple[int, int]], tmp: Path, exact: bool = True) -> dict:
    """{(rows, num_proc): result} for each pair of `plan`, each in a fresh worker and datasets cache. With
    `exact`, each size's num_proc 1 result also gets `exact_clean`: load and clean with dedup exact in a fresh
    worker, over that run's cache (the load is read back, the clean computed), to tell near dedup's memory
    per row apart from exact dedup's."""
    tokenizer_dir = str(data_file(GPT2_TOKENIZER.name)[0])
    results = {}
    for rows in sorted({rows for rows, _ in plan}):
        files = [str(f) for f in write_mixture(tmp / f"mix{rows}", rows)]
        jsonl = sum(Path(f).stat().st_size for f in files)
        for n in sorted(n for r, n in plan if r == rows):
            cache = tmp / f"cache{rows}_{n}"
            result = _in_worker(tokenizer_dir, cache, files, None if n == 1 else n)
            result.update(jsonl_mib=mib(jsonl), cache_mib=mib(sum(p.stat().st_size for p in cache.rglob("*")
                                                                 if p.is_file())))
            if exact and n == 1:
                result["exact_clean"] = _in_worker(tokenizer_dir, cache, files, None, dedup="exact", mask=False)
            print(f"[{SECTION}] {rows:,} rows, num_proc {n}: {result}", flush=True)
            results[rows, n] = result
    return results


def _in_worker(tokenizer_dir: str, cache: Path, files: list[str], num_proc, dedup="near", mask=True) -> dict:
    with env(HF_DATASETS_CACHE=cache):  # the worker's `datasets` reads it at import
        with workers({"w": (_Prepare, tokenizer_dir)}) as ws:
            w = ws["w"]
            result = w.call(files, num_proc, dedup, mask)
            return {**result, "peak_rss_mib": mib(w.peak_rss), "peak_anon_mib": mib(w.peak_anon),
                    "peak_file_mib": mib(w.peak_file)}


def figures(results: dict) -> list[dict]:
    small, large = sorted({rows for rows, _ in results})
    a, b = results[small, 1], results[large, 1]
    size = large / small
    time_ratio = b["total_s"] / a["total_s"]
    anon_ratio = b["peak_anon_mib"] / a["peak_anon_mib"]
    rss_ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
    out = [
        figure(SECTION, f"load + clean + mask, {large:,} vs {small:,} rows: time", round(time_ratio, 2), "x",
               goal=f"<= {1.1 * size:g}x", met=time_ratio <= 1.1 * size, small=a, large=b),
        figure(SECTION, f"{large:,} vs {small:,} rows: peak memory held by the process (anonymous: excludes "
               "Arrow's memory-mapped file pages)", round(anon_ratio, 2), "x", goal="<= 1.5x",
               met=anon_ratio <= 1.5, small_mib=a["peak_anon_mib"], large_mib=b["peak_anon_mib"],
               **_growth(a, b, "anon"), **{f"arrow_{k}": v for k, v in _growth(a, b, "arrow").items()}),
        figure(SECTION, f"{large:,} vs {small:,} rows: peak RSS, file pages included (no goal)", round(rss_ratio, 2),
               "x", small_mib=a["peak_rss_mib"], large_mib=b["peak_rss_mib"], **_growth(a, b, "rss_now")),
    ]
    if all("exact_clean" in r for r in (a, b)):
        near = _growth(a, b, "anon")["clean_bytes_per_row"]
        exact = _growth(a["exact_clean"], b["exact_clean"], "anon")["clean_bytes_per_row"]
        out.append(figure(SECTION, f"clean, {small:,} -> {large:,} rows: memory held per added row, near dedup",
                          near, "B", exact_dedup_bytes_per_row=exact, near_minus_exact_bytes_per_row=near - exact,
                          exact_small=a["exact_clean"], exact_large=b["exact_clean"]))
    both = sorted(rows for rows in (small, large) if (rows, 2) in results)
    if both:
        rows = both[-1]
        speedup = results[rows, 1]["total_s"] / results[rows, 2]["total_s"]
        out.append(figure(SECTION, f"{rows:,} rows: num_proc 2 vs 1, speed", round(speedup, 2), "x",
                          goal=">= 1.6x", met=speedup >= 1.6, num_proc_2=results[rows, 2]))
    for rows in (small, large):
        r = results[rows, 1]
        disk = round(r["jsonl_mib"] + r["cache_mib"])
        out.append(figure(SECTION, f"{rows:,} rows: disk (JSONL + datasets cache)", disk, "MiB",
                          jsonl_mib=r["jsonl_mib"], cache_mib=r["cache_mib"], cache_bytes_per_row=round(r["cache_mib"] * 2**20 / rows)))
    return out


def _stage_growth(r: dict, kind: str) -> dict:
    """MiB each stage added to `kind` (anon, arrow or rss_now) memory held, from the worker's start."""
    before, out = r[f"{kind}_after_start_mib"], {}
    for stage in ("load", "clean", "mask"):
        if f"{kind}_after_{stage}_mib" in r:
            now = r[f"{kind}_after_{stage}_mib"]
            out[stage], before = round(now - before, 1), now
    return out


def _growth(a: dict, b: dict, kind: str) -> dict:
    """Per stage: bytes of `kind` memory held per row added from the small run to the large one."""
    ga, gb = _stage_growth(a, kind), _stage_growth(b, kind)
    added = b["rows"] - a["rows"]
    return {f"{stage}_bytes_per_row": round((gb[stage] - ga[stage]) * 2**20 / added) for stage in ga}

