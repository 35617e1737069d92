"""Wrapper overhead: `sft_recipes.trainer.build_trainer(recipe).train()` against a plain TRL `SFTTrainer`
script on the same pre-tokenized rows (alpaca_en_demo masked by sft_recipes), same tiny model, batch 8
padded, max_length 512, same number of steps. Only `train()` is timed (first step excluded); the batch
digest shows both sides trained on the very same tensors."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .common import data_file, figure, median, skipped, workers
from .train import BASELINE, CONFIGS, Meter, PlainTRL, pretokenize, round_robin, tiny_recipe

SECTION = "overhead"


def run(quick: bool) -> list[dict]:
    """Fresh worker pairs, several: within one pair the per-repetition ratios agree closely, but from one
    pair of processes to the next they moved between 0.8x and 1.07x (same code, same batches), so one pair
    measures its processes more than the wrapper."""
    path, why = data_file("alpaca_en_demo.json")
    if path is None:
        return [skipped(SECTION, "alpaca_en_demo", why)]
    steps, reps, pairs = (11, 2, 4) if quick else (16, 3, 6)
    ours, plain = [], []
    with tempfile.TemporaryDirectory(prefix="sft_bench_overhead_") as tmp:
        data = pretokenize(path, Path(tmp) / "data")
        for pair in range(pairs):
            specs = {"sft_recipes": (RecipeTrainer, str(path), str(Path(tmp) / f"recipe{pair}")),
                     "plain TRL": (PlainTRL, data, str(Path(tmp) / f"plain{pair}"), CONFIGS[BASELINE])}
            with workers(specs) as ws:
                results = round_robin(ws, reps, steps, f"{SECTION} pair {pair + 1}")
            ours += results["sft_recipes"]
            plain += results["plain TRL"]
    return [overhead_figure(ours, plain, steps, reps)]


class RecipeTrainer:
    """The library path, in a worker: recipe -> build_trainer (its own data preparation, untimed)."""

    def __init__(self, data_path, out_dir):
        from sft_recipes import trainer

        recipe = tiny_recipe(data_path, out_dir, per_device_train_batch_size=CONFIGS[BASELINE]["batch"])
        self.meter = Meter(trainer.build_trainer(recipe))

    def __call__(self, steps):
        return self.meter(steps)


def overhead_figure(ours: list[dict], plain: list[dict], steps: int, reps: int) -> dict:
    per_rep = [o["steps_per_s"] / p["steps_per_s"] for o, p in zip(ours, plain)]
    ratio = median(per_rep)
    same = all(o["digest"] == p["digest"] for o, p in zip(ours, plain))
    fig = figure(SECTION, "build_trainer().train() vs plain TRL SFTTrainer: steps/s", round(ratio, 3), "x",
                 goal=">= 0.98x", met=ratio >= 0.98, timed_steps=steps - 1,
                 ours_steps_per_s=round(median(o["steps_per_s"] for o in ours), 3),
                 plain_steps_per_s=round(median(p["steps_per_s"] for p in plain), 3),
                 per_rep=[round(r, 3) for r in per_rep],
                 per_pair=[round(median(per_rep[i:i + reps]), 3) for i in range(0, len(per_rep), reps)],
                 same_batches=same)
    print(f"[{SECTION}] {fig['name']}: {fig['value']}x (same batches: {same})", flush=True)
    return fig
