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
    return figures(results, torch.cuda.get_device_name(0)) + notes + qlora(quick)


def plan() -> tuple[dict, list[dict]]:
    from transformers.utils import is_flash_attn_2_available

    configs = {BASELINE: {"attn": "sdpa", "lora": False}, "sdpa LoRA": {"attn": "sdpa", "lora": True},
               # the same packed blocks as TRL collates them (one padding-free row per step), and no packing
               "sdpa full, TRL one row": {"attn": "sdpa", "lora": False, "trl": True},
               "sdpa full, padded": {"attn": "sdpa", "lora": False, "packing": False}}
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
        from trl import SFTConfig, SFTTrainer

        from sft_recipes import packing, trainer

        from .preprocess import recipe

        tokenizer = trainer.load_tokenizer(recipe())
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **model_config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg["attn"])
        self.params = sum(p.numel() for p in model.parameters())
        args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=8, max_length=model_config["n_positions"],
                         packing=cfg.get("packing", True), bf16=bf16, activation_checkpointing=False, report_to="none",
                         save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=42,
                         use_cpu=not torch.cuda.is_available())
        self.flops_per_token = (4 if cfg["lora"] else 6) * self.params
        trainer_class = SFTTrainer if cfg.get("trl") else packing.Trainer
        self.meter = Meter(trainer_class(model=model, args=args, train_dataset=load_from_disk(data_dir),
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


# ---------------------------------------------------------------- QLoRA through sft_recipes
LLAMA = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16, "num_attention_heads": 16,
         "num_key_value_heads": 4, "max_position_embeddings": MAX_LENGTH, "tie_word_embeddings": False}


def qlora(quick: bool) -> list[dict]:
    """A randomly initialised Llama (about 0.3B parameters, saved locally in bf16) trained by sft_recipes'
    own trainer (`build_trainer`: recipe keys `use_peft`, `lora_target_modules: all-linear`, packing, bf16)
    with and without `load_in_4bit` (NF4, bitsandbytes): steps/s, peak GPU memory, and the loss after N
    steps, which must fall in both."""
    name = "QLoRA 4-bit vs bf16 LoRA, Llama 0.3B, all-linear r=16, packed 8x1024"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return [skipped(SECTION, name, "skipped: bitsandbytes is not installed")]
    path, why = data_file("alpaca_en_demo.json")
    if path is None:
        return [skipped(SECTION, name, why)]
    steps = 20 if quick else 60
    with tempfile.TemporaryDirectory(prefix="sft_bench_qlora_") as tmp:
        model_dir = build_llama(Path(tmp) / "llama")
        specs = {k: (QLoraRun, model_dir, str(path), str(Path(tmp) / k), four_bit)
                 for k, four_bit in (("bf16 LoRA", False), ("QLoRA", True))}
        results = {}
        for k, spec in specs.items():  # one at a time: each measures its own peak memory
            with workers({k: spec}) as ws:
                results[k] = ws[k].call(steps)
    base, q = results["bf16 LoRA"], results["QLoRA"]
    out = [figure(SECTION, f"{name}: peak GPU memory, QLoRA / bf16 LoRA", round(q["peak_gib"] / base["peak_gib"], 2),
                  "x", qlora_gib=round(q["peak_gib"], 2), bf16_gib=round(base["peak_gib"], 2)),
           figure(SECTION, f"{name}: steps/s, QLoRA / bf16 LoRA", round(q["steps_per_s"] / base["steps_per_s"], 2), "x",
                  qlora_steps_per_s=round(q["steps_per_s"], 2), bf16_steps_per_s=round(base["steps_per_s"], 2)),
           figure(SECTION, f"{name}: train loss first -> last logged (QLoRA; bf16 LoRA)",
                  round(q["losses"][-1], 3), "", goal="falls", met=q["losses"][-1] < q["losses"][0],
                  qlora=[round(x, 3) for x in q["losses"]], bf16=[round(x, 3) for x in base["losses"]],
                  trainable=q["trainable"], total=q["total"])]
    for f in out:
        print(f"[{SECTION}] {f['name']}: {f['value']} {f['unit']} ({f['detail']})", flush=True)
    return out


def build_llama(out: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_recipes import trainer

    from .preprocess import recipe

    tokenizer = trainer.load_tokenizer(recipe())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         **LLAMA)).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


class QLoraRun:
    """In a worker: `build_trainer` on the recipe a user would write; a call trains `steps` steps."""

    def __init__(self, model_dir, data, out_dir, four_bit):
        from sft_recipes import config, trainer

        r = config.load_recipe(model_name_or_path=model_dir, chat_template="chatml", datasets=[{"path": data}],
                               use_peft=True, lora_r=16, lora_alpha=32, lora_target_modules="all-linear",
                               load_in_4bit=four_bit, bnb_4bit_quant_type="nf4", dtype="bfloat16",
                               max_length=MAX_LENGTH, packing=True, per_device_train_batch_size=8,
                               learning_rate=1e-3, logging_steps=5, save_strategy="no", output_dir=out_dir,
                               disable_tqdm=True, report_to="none", seed=42)
        self.trainer = trainer.build_trainer(r)
        params = list(self.trainer.model.parameters())
        self.trainable, self.total = sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def __call__(self, steps):
        import time

        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.trainer.args.max_steps = steps
        start = time.perf_counter()
        self.trainer.train()
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in self.trainer.state.log_history if "loss" in h]
        return {"steps_per_s": steps / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "losses": losses, "trainable": self.trainable, "total": self.total}

