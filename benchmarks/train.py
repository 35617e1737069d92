"""CPU training: trained tokens/s packed vs padded, the padding share of each, and peak RSS.

Model: the tiny GPT-2 that `sft_recipes.tiny` builds (2 layers, 128 wide, its own 3,000-token BPE
tokenizer), with the chatml template's tokens added. Data: alpaca_en_demo masked once by sft_recipes
(`trainer.build_datasets`), max_length 512; every configuration trains on those same rows through a
plain TRL `SFTTrainer`, each in its own process.

Packing is TRL's (`bfd`). TRL's padding-free collator joins a step's 8 blocks into ONE row of up to 4,096
tokens whose per-document attention sdpa computes over the whole row (STACK-FACTS' cost trap);
sft_recipes' trainer keeps each block a row on sdpa/eager (sft_recipes/packing.py). Both are measured:
"packed b8" is sft_recipes' `packing.Trainer`, "packed b8, TRL one row" the plain `SFTTrainer`.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from .common import data_file, figure, median, mib, skipped, workers

SECTION = "train"
MAX_LENGTH = 512
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
CONFIGS = {"padded b8": {"packing": False, "batch": 8},
           "packed b8": {"packing": True, "batch": 8, "ours": True},
           "packed b8, TRL one row": {"packing": True, "batch": 8}}
BASELINE, GOAL = "padded b8", "packed b8"


def run(quick: bool) -> list[dict]:
    path, why = data_file("alpaca_en_demo.json")
    if path is None:
        return [skipped(SECTION, "alpaca_en_demo", why)]
    steps, reps = (4, 5) if quick else (10, 5)
    with tempfile.TemporaryDirectory(prefix="sft_bench_train_") as tmp:
        data = pretokenize(path, Path(tmp) / "data")
        specs = {name: (PlainTRL, data, str(Path(tmp) / "out"), cfg) for name, cfg in CONFIGS.items()}
        with workers(specs) as ws:
            results = round_robin(ws, reps, steps)
            rss = {name: w.peak_rss for name, w in ws.items()}
    return figures(results, rss)


# ---------------------------------------------------------------- shared with the overhead section
def tiny_recipe(data_path, out_dir, **sft):
    from sft_recipes import config, tiny

    return config.load_recipe(model_name_or_path=tiny.TINY_MODEL_ID, chat_template="chatml",
                              datasets=[{"path": str(data_path)}], max_length=MAX_LENGTH, output_dir=str(out_dir),
                              save_strategy="no", logging_steps=1000, disable_tqdm=True, report_to="none",
                              seed=42, **sft)


def pretokenize(data_path, out: Path) -> str:
    """alpaca_en_demo masked by sft_recipes (input_ids, labels), saved for the workers to load."""
    from sft_recipes import trainer

    recipe = tiny_recipe(data_path, out.parent / "unused")
    train, _, _ = trainer.build_datasets(recipe, trainer.load_tokenizer(recipe))
    train.save_to_disk(str(out))
    return str(out)


class PlainTRL:
    """A plain TRL script (runs in a worker): tokenizer and model from the tiny model's folder, chatml
    tokens added, SFTTrainer on the pre-tokenized rows; CPU settings written out as a user would.
    `ours` swaps in sft_recipes' SFTTrainer subclass (what `build_trainer` uses)."""

    def __init__(self, data_dir, out_dir, cfg):
        from datasets import load_from_disk
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from sft_recipes import packing, tiny

        path = tiny.tiny_model_path()  # just the folder (built once, cached)
        tokenizer = AutoTokenizer.from_pretrained(path)
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        model = AutoModelForCausalLM.from_pretrained(path)
        model.resize_token_embeddings(len(tokenizer))
        args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=cfg["batch"], max_length=MAX_LENGTH,
                         packing=cfg["packing"], use_cpu=True, bf16=False, activation_checkpointing=False,
                         dataloader_pin_memory=False, report_to="none", save_strategy="no", logging_steps=1000,
                         disable_tqdm=True, seed=42)
        trainer_class = packing.Trainer if cfg.get("ours") else SFTTrainer
        self.meter = Meter(trainer_class(model=model, args=args, train_dataset=load_from_disk(data_dir),
                                         processing_class=tokenizer))

    def __call__(self, steps):
        return self.meter(steps)


# ---------------------------------------------------------------- measuring a trainer
class Meter:
    """Wraps a trainer's collator (counts every batch's tokens) and clocks step ends. A call trains
    `steps` steps from a fresh start; the first step (loader and optimizer set-up) is not timed."""

    def __init__(self, trainer):
        from transformers import PrinterCallback, TrainerCallback

        ends = self.ends = []

        class Clock(TrainerCallback):
            def on_step_end(self, *args, **kwargs):
                ends.append(time.perf_counter())

        self.trainer = trainer
        self.batches = _Counting(trainer.data_collator)
        trainer.data_collator = self.batches
        trainer.add_callback(Clock())
        trainer.remove_callback(PrinterCallback)  # its end-of-train metrics line would bury the table

    def __call__(self, steps: int) -> dict:
        self.ends.clear()
        self.batches.reset()
        self.trainer.args.max_steps = steps
        self.trainer.train()
        counted = self.batches.rows[1:steps]  # a loader may collate one batch ahead
        seconds = self.ends[steps - 1] - self.ends[0]
        trained, real, tensor = (sum(r[i] for r in counted) for i in range(3))
        return {"seconds": seconds, "timed_steps": steps - 1, "trained_tokens": trained, "real_tokens": real,
                "tensor_tokens": tensor, "tokens_per_s": trained / seconds, "steps_per_s": (steps - 1) / seconds,
                "digest": self.batches.digest(steps)}


class _Counting:
    """Collator wrapper: per batch (trained tokens, non-pad tokens, tokens in the tensor) and its ids."""

    def __init__(self, inner):
        self.inner = inner
        self.reset()

    def reset(self):
        self.rows, self.ids = [], []

    def __call__(self, examples):
        out = self.inner(examples)
        labels, real = out["labels"], sum(len(e["input_ids"]) for e in examples)
        self.rows.append((int((labels != -100).sum()), real, labels.numel()))
        self.ids.append(out["input_ids"].numpy().tobytes())
        return out

    def digest(self, steps) -> str:
        return hashlib.sha256(b"".join(self.ids[:steps])).hexdigest()[:12]


def round_robin(ws: dict, reps: int, steps: int, section: str = SECTION) -> dict:
    """One untimed warm-up call per worker, then each repetition runs every worker once, in an order
    rotated per repetition."""
    names, results = list(ws), {name: [] for name in ws}
    for w in ws.values():
        w.call(steps)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            results[name].append(ws[name].call(steps))
            print(f"[{section}] rep {rep + 1} {name}: "
                  f"{results[name][-1]['tokens_per_s']:.0f} trained tokens/s", flush=True)
    return results


# ---------------------------------------------------------------- figures
def figures(results: dict, rss: dict) -> list[dict]:
    base = results[BASELINE]
    out = []
    for name, runs in results.items():
        tps = [r["tokens_per_s"] for r in runs]
        pad = padding(runs)
        if name != BASELINE:
            per_rep = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, base)]
            ratio = median(per_rep)
            out.append(figure(SECTION, f"{name} vs {BASELINE}: trained tokens/s", round(ratio, 2), "x",
                              goal=">= 2.5x" if name == GOAL else None, met=ratio >= 2.5 if name == GOAL else None,
                              per_rep=[round(x, 2) for x in per_rep],
                              tokens_per_s=round(median(tps)),
                              baseline_tokens_per_s=round(median(r["tokens_per_s"] for r in base)),
                              timed_steps=runs[0]["timed_steps"]))
        out.append(figure(SECTION, f"{name}: padding share of tokens", round(100 * pad, 2), "%",
                          goal="<= 1 %" if name != BASELINE else None, met=pad <= 0.01 if name != BASELINE else None,
                          tokens_per_step=round(runs[0]["real_tokens"] / runs[0]["timed_steps"]),
                          trained_per_step=round(runs[0]["trained_tokens"] / runs[0]["timed_steps"])))
        out.append(figure(SECTION, f"{name}: peak RSS", mib(rss[name]), "MiB",
                          vs_baseline=round(rss[name] / rss[BASELINE], 2)))
    for f in out:
        print(f"[{SECTION}] {f['name']}: {f['value']} {f['unit']}", flush=True)
    return out


def padding(runs) -> float:
    tensor = sum(r["tensor_tokens"] for r in runs)
    return (tensor - sum(r["real_tokens"] for r in runs)) / tensor
