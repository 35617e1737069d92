"""GPU training (only where CUDA is available): GPT-2 124M architecture, random init, real GPT-2 tokenizer
with the chatml tokens, alpaca_en_demo masked by sft_recipes, bf16 autocast, TRL packing (bfd) at max_length
1024, batch 8, through sft_recipes' trainer (packed blocks kept as rows on sdpa, one padding-free row on
flash-attn-2). sdpa vs flash attention 2 (when installed), LoRA vs full fine-tuning.

Defaults: plain TRL (`SFTTrainer` with `SFTConfig`'s defaults: activation checkpointing on, one padding-free row
per step) vs sft_recipes' (`fit.apply`'s decisions, packed blocks as rows) on the same rows, for GPT-2 124M and
a Qwen3-0.6B-shaped model (random init, the shared Qwen3 tokenizer), and LoRA vs full on the latter.

MFU = model FLOPs/s over the device's dense bf16 peak, with model FLOPs = 6·N per processed token for full
training and 4·N with LoRA (frozen weights get no weight gradients), N every parameter (a tied embedding once);
attention FLOPs are not counted, so MFU is a lower bound. The device name is recorded; MFU is left out for a
device not in PEAK_BF16.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .common import DATA, GPT2_TOKENIZER, data_file, figure, median, skipped, workers
from .train import Meter, round_robin

SECTION = "gpu"
MAX_LENGTH = 1024
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12)]
GPT2_124M = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": MAX_LENGTH}
# Qwen/Qwen3-0.6B's config.json shape (596M parameters with this vocabulary)
QWEN3_06B = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True, "max_position_embeddings": 40960}
QWEN3_TOKENIZER = DATA / "tokenizers" / "qwen3"
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
    device = torch.cuda.get_device_name(0)
    return figures(results, device) + notes + defaults(quick, device) + qlora(quick)


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


def pretokenize(data_path, out: Path, tokenizer_dir=GPT2_TOKENIZER, max_length=MAX_LENGTH) -> str:
    from sft_recipes import trainer

    r = chatml_recipe(tokenizer_dir, datasets=[{"path": str(data_path)}], max_length=max_length)
    train, _, _ = trainer.build_datasets(r, trainer.load_tokenizer(r))
    train.save_to_disk(str(out))
    return str(out)


def chatml_recipe(tokenizer_dir, **keys):
    from sft_recipes import config

    return config.load_recipe(model_name_or_path=str(tokenizer_dir), chat_template="chatml", **keys)


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
        return measure(self.meter, self.flops_per_token, steps)


def measure(meter, flops_per_token, steps) -> dict:
    """`steps` steps of a `Meter`, with processed tokens/s, model FLOPs/s and the peak GPU memory."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = meter(steps)
    result["processed_tokens_per_s"] = result["real_tokens"] / result["seconds"]
    result["model_flops_per_s"] = flops_per_token * result["processed_tokens_per_s"]
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return result


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")


def peak_flops(device: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16 if key in device), None)


def figures(results: dict, device: str, baseline: str = BASELINE) -> list[dict]:
    base, peak, out = results[baseline], peak_flops(device), []
    for name, runs in results.items():
        tps = median(r["processed_tokens_per_s"] for r in runs)
        mfu = median(r["model_flops_per_s"] for r in runs) / peak if peak else None
        memory = median(r["peak_memory_gib"] for r in runs) if runs[0]["peak_memory_gib"] is not None else None
        detail = {"device": device, "processed_tokens_per_s": round(tps), "mfu": round(mfu, 3) if mfu else None,
                  "peak_memory_gib": round(memory, 2) if memory is not None else None,
                  "trained_tokens_per_s": round(median(r["tokens_per_s"] for r in runs))}
        if "activation_checkpointing" in runs[0]:
            detail["activation_checkpointing"] = runs[0]["activation_checkpointing"]
        if name == baseline:
            out.append(figure(SECTION, f"{name}: processed tokens/s", round(tps), "tokens/s", **detail))
            continue
        ratio = median(r["processed_tokens_per_s"] / b["processed_tokens_per_s"] for r, b in zip(runs, base))
        if memory is not None:
            detail["memory_vs_baseline"] = round(memory / median(b["peak_memory_gib"] for b in base), 2)
        out.append(figure(SECTION, f"{name} vs {baseline}: processed tokens/s", round(ratio, 2), "x", **detail))
    for f in out:
        print(f"[{SECTION}] {f['name']}: {f['value']} {f['unit']} ({f['detail']})", flush=True)
    return out


# ---------------------------------------------------------------- plain TRL defaults vs sft_recipes
def defaults(quick: bool, device: str, shapes: dict | None = None, steps: int | None = None, reps: int = 3,
             bf16: bool = True, batch: int = 8, max_length: int = MAX_LENGTH) -> list[dict]:
    """Per model, workers on the same pretokenized rows: plain TRL, sft_recipes, and (Qwen3 only) sft_recipes with
    LoRA. `shapes` ({kind: model config}), `bf16`, `batch` and `max_length` let the tests run it tiny on CPU."""
    shapes = shapes or {"gpt2": GPT2_124M, "qwen3": QWEN3_06B}
    names = {"gpt2": ("GPT-2 124M", GPT2_TOKENIZER), "qwen3": ("Qwen3-0.6B-shaped", QWEN3_TOKENIZER)}
    path, why = data_file("alpaca_en_demo.json")
    if path is None:
        return [skipped(SECTION, "plain TRL vs sft_recipes defaults", why)]
    steps, out = steps or (10 if quick else 30), []
    for kind, shape in shapes.items():
        name, tokenizer_dir = names[kind]
        if not Path(tokenizer_dir).is_dir():
            out.append(skipped(SECTION, f"{name}: plain TRL vs sft_recipes defaults", f"skipped: {tokenizer_dir} not found"))
            continue
        sides = {"plain TRL": ("trl", False), "sft_recipes": ("ours", False)}
        if kind == "qwen3":  # the LoRA goal: at least the tokens/s of full fine-tuning
            sides["sft_recipes LoRA"] = ("ours", True)
        with tempfile.TemporaryDirectory(prefix="sft_bench_defaults_") as tmp:
            data = pretokenize(path, Path(tmp) / "data", tokenizer_dir, max_length)
            specs = {f"{name}, {side}": (DefaultsRun, data, str(Path(tmp) / side.replace(" ", "_")), kind, str(tokenizer_dir),
                                         shape, impl, lora, bf16, batch, max_length)
                     for side, (impl, lora) in sides.items()}
            with workers(specs) as ws:
                results = round_robin(ws, reps, steps, SECTION)
        out += figures(results, device, baseline=f"{name}, plain TRL")
        if kind == "qwen3":
            lora = {f"{name}, {k}": results[f"{name}, sft_recipes{s}"] for k, s in (("full", ""), ("LoRA", " LoRA"))}
            out += [f for f in figures(lora, device, baseline=f"{name}, full") if f["unit"] == "x"]
    return out


class DefaultsRun:
    """In a worker: a randomly initialised model and either TRL's `SFTTrainer` with `SFTConfig`'s defaults, or
    sft_recipes' trainer with the defaults `fit.apply` decides for a recipe that sets nothing but the batch."""

    def __init__(self, data_dir, out_dir, kind, tokenizer_dir, shape, side, lora, bf16=True, batch=8,
                 max_length=MAX_LENGTH):
        import torch
        from datasets import load_from_disk
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, GPT2Config, Qwen3Config
        from trl import SFTConfig, SFTTrainer

        from sft_recipes import fit, packing, trainer

        cuda = torch.cuda.is_available()
        r = chatml_recipe(tokenizer_dir, output_dir=out_dir, per_device_train_batch_size=batch, packing=True,
                          max_length=max_length, bf16=bf16, save_strategy="no",
                          logging_steps=1000, disable_tqdm=True, seed=42, use_peft=lora)
        tokenizer = trainer.load_tokenizer(r)
        ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config((GPT2Config if kind == "gpt2" else Qwen3Config)(**ids, **shape))
        self.params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = (4 if lora else 6) * self.params
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear") if lora else None
        if side == "trl":  # what a user gets from TRL itself: only the batch, length, packing and precision set
            args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_length=max_length,
                             packing=True, bf16=bf16, report_to="none", save_strategy="no", logging_steps=1000,
                             disable_tqdm=True, seed=42, use_cpu=not cuda)
            run = SFTTrainer(model=model, args=args, train_dataset=load_from_disk(data_dir), processing_class=tokenizer,
                             peft_config=peft)
        else:
            self.fit = fit.apply(r, model)
            run = packing.Trainer(model=model, args=r.sft, train_dataset=load_from_disk(data_dir),
                                  processing_class=tokenizer, peft_config=peft)
        self.activation_checkpointing = run.args.activation_checkpointing
        self.meter = Meter(run)

    def __call__(self, steps):
        return {**measure(self.meter, self.flops_per_token, steps), "activation_checkpointing": self.activation_checkpointing}


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

