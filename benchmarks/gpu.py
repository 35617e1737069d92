"""GPU training (only where CUDA is available): GPT-2 124M architecture, random init, real GPT-2 tokenizer
with the chatml tokens, alpaca_en_demo masked by sft_recipes, bf16 autocast, TRL packing (bfd) at max_length
1024, batch 8, through sft_recipes' trainer (packed blocks kept as rows on sdpa, one padding-free row on
flash-attn-2). sdpa vs flash attention 2 (when installed), LoRA vs full fine-tuning.

MFU = model FLOPs/s over the device's dense bf16 peak, with model FLOPs = 6·N per processed token for full
training and 4·N with LoRA (frozen weights get no weight gradients); attention FLOPs are not counted, so MFU
is a lower bound. The device name is recorded; MFU is left out for a device not in PEAK_BF16.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .common import GPT2_TOKENIZER, data_file, figure, median, skipped, workers
from .train import Meter, round_robin

SECTION = "gpu"
MAX_LENGTH = 1024
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12)]
GPT2_124M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": MAX_LENGTH}
BASELINE = "sdpa full"


def run(quick: bool) -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        print(f"[{SECTION}] skipped: no CUDA", flush=True)
        return [figure(SECTION, "GPT-2 124M training", None, "", skipped="skipped: no CUDA")]
    (path, why), (tokenizer_dir, why_tok) = data_file("alpaca_en_demo.json"), data_file(GPT2_TOKENIZER.name)
    if path is None or tokenizer_dir is None:
        return [skipped(SECTION, "alpaca_en_demo", why or why_tok)]
    steps, reps = (10, 3) if quick else (30, 3)
    configs, notes = plan()
    with tempfile.TemporaryDirectory(prefix="sft_bench_gpu_") as tmp:
        data = pretokenize(path, Path(tmp) / "data")
        specs = {name: (GpuTrainer, data, str(Path(tmp) / "out"), cfg) for name, cfg in configs.items()}
        with workers(specs) as ws:
            results = round_robin(ws, reps, steps, SECTION)
    return figures(results, torch.cuda.get_device_name(0)) + notes


def plan() -> tuple[dict, list[dict]]:
    from transformers.utils import is_flash_attn_2_available

    configs = {BASELINE: {"attn": "sdpa", "lora": False}, "sdpa LoRA": {"attn": "sdpa", "lora": True}}
    if is_flash_attn_2_available():
        configs["flash-attn-2 full"] = {"attn": "flash_attention_2", "lora": False}
        return configs, []
    return configs, [skipped(SECTION, "flash-attn-2 full vs sdpa full", "skipped: flash_attn is not installed")]


def pretokenize(data_path, out: Path) -> str:
    from sft_recipes import trainer

    from .preprocess import recipe

    r = recipe(datasets=[{"path": str(data_path)}], max_length=MAX_LENGTH)
    train, _, _ = trainer.build_datasets(r, trainer.load_tokenizer(r))
    train.save_to_disk(str(out))
    return str(out)


class GpuTrainer:
    """In a worker: a randomly initialised GPT-2 124M and sft_recipes' SFTTrainer with packing on one GPU."""

    def __init__(self, data_dir, out_dir, cfg, model_config=GPT2_124M, bf16=True):
        import torch
        from datasets import load_from_disk
        from transformers import AutoModelForCausalLM, GPT2Config
        from trl import SFTConfig

        from sft_recipes import packing, trainer

        from .preprocess import recipe

        tokenizer = trainer.load_tokenizer(recipe())
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **model_config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg["attn"])
        self.params = sum(p.numel() for p in model.parameters())
        args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=8, max_length=model_config["n_positions"],
                         packing=True, bf16=bf16, activation_checkpointing=False, report_to="none", save_strategy="no",
                         logging_steps=1000, disable_tqdm=True, seed=42, use_cpu=not torch.cuda.is_available())
        self.flops_per_token = (4 if cfg["lora"] else 6) * self.params
        self.meter = Meter(packing.Trainer(model=model, args=args, train_dataset=load_from_disk(data_dir),
                                           processing_class=tokenizer, peft_config=lora() if cfg["lora"] else None))

    def __call__(self, steps):
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = self.meter(steps)
        result["processed_tokens_per_s"] = result["real_tokens"] / result["seconds"]
        result["model_flops_per_s"] = self.flops_per_token * result["processed_tokens_per_s"]
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return result


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")


def peak_flops(device: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16 if key in device), None)


def figures(results: dict, device: str) -> list[dict]:
    base, peak, out = results[BASELINE], peak_flops(device), []
    for name, runs in results.items():
        tps = median(r["processed_tokens_per_s"] for r in runs)
        mfu = median(r["model_flops_per_s"] for r in runs) / peak if peak else None
        memory = median(r["peak_memory_gib"] for r in runs) if runs[0]["peak_memory_gib"] is not None else None
        detail = {"device": device, "processed_tokens_per_s": round(tps), "mfu": round(mfu, 3) if mfu else None,
                  "peak_memory_gib": round(memory, 2) if memory is not None else None,
                  "trained_tokens_per_s": round(median(r["tokens_per_s"] for r in runs))}
        if name == BASELINE:
            out.append(figure(SECTION, f"{name}: processed tokens/s", round(tps), "tokens/s", **detail))
            continue
        ratio = median(r["processed_tokens_per_s"] / b["processed_tokens_per_s"] for r, b in zip(runs, base))
        if memory is not None:
            detail["memory_vs_baseline"] = round(memory / median(b["peak_memory_gib"] for b in base), 2)
        out.append(figure(SECTION, f"{name} vs {BASELINE}: processed tokens/s", round(ratio, 2), "x", **detail))
    for f in out:
        print(f"[{SECTION}] {f['name']}: {f['value']} {f['unit']} ({f['detail']})", flush=True)
    return out
