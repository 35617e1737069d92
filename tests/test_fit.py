"""Defaults that fit the model and the device (sft_recipes.fit): activation checkpointing only when the memory
estimate says training would not fit without it, Liger only where it can run, fused AdamW from the stack; a key the
recipe sets is never changed. Device memory figures are given, so this runs without a GPU."""
from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen3Config

from sft_recipes import fit, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_alpaca.yaml")
GiB = 2**30
QWEN3_06B = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}


def on_meta(config):
    """The model's parameters without their memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def recipe(tmp_path, **keys):
    return load_recipe(TINY, output_dir=str(tmp_path), bf16=True, per_device_train_batch_size=8, max_length=1024, **keys)


def test_the_estimate_counts_weights_optimizer_and_activations(tmp_path):
    model = on_meta(Qwen3Config(**QWEN3_06B))
    s = fit.shape(model, recipe(tmp_path).sft)
    n = sum(p.numel() for p in model.parameters())
    assert 590e6 < n < 600e6 and s.weight_bytes == 4 * n and s.trainable == n  # float32, full fine-tuning
    assert (s.layers, s.hidden, s.intermediate, s.tokens, s.activation_bytes) == (28, 1024, 3072, 8 * 1024, 2)
    state = 16 * n  # weights, gradients, two AdamW moments: 4 bytes each
    activations = 28 * (8 * 1024 + 3 * 3072) * 8192 * 2
    assert fit.training_bytes(s, checkpointed=False) == state + activations  # 16.3 GiB
    checkpointed = fit.training_bytes(s, checkpointed=True)
    assert state < checkpointed < state + activations / 10  # layer inputs only, and one layer recomputed
    lora = fit.shape(model, recipe(tmp_path).sft, peft=True)
    assert lora.trainable == int(0.02 * n)  # LoRA: frozen weights, state for its share only; the same activations
    assert fit.training_bytes(lora, False) == 4 * n + 12 * lora.trainable + activations


@pytest.mark.parametrize("gib, on", [(80, False), (24, False), (16, True)])
def test_checkpointing_is_on_only_when_training_would_not_fit(tmp_path, gib, on):
    s = fit.shape(on_meta(Qwen3Config(**QWEN3_06B)), recipe(tmp_path).sft)
    decided, why = fit.needs_checkpointing(s, gib * GiB)
    assert decided is on and why.startswith(f"activation checkpointing {'on' if on else 'off'}")
    assert f"of {gib}.0 GiB" in why and "even with it" not in why


def test_a_model_too_big_even_with_checkpointing_says_so(tmp_path):
    seven_b = GPT2Config(n_layer=32, n_embd=4096, n_head=32, vocab_size=32000)  # about 6.6B parameters
    on, why = fit.needs_checkpointing(fit.shape(on_meta(seven_b), recipe(tmp_path).sft), 80 * GiB)
    assert on and "even with it: lower the batch or shard (FSDP)" in why
    assert fit.needs_checkpointing(fit.shape(on_meta(seven_b), recipe(tmp_path).sft), None) == (
        False, "activation checkpointing off (no GPU)")


def test_gpt2_124m_packed_8x1024_needs_no_checkpointing_on_one_h100(tmp_path):
    """benchmarks/gpu.py's model: the 2026-11-26 run had checkpointing on (8.4 GiB peak of 80)."""
    s = fit.shape(on_meta(GPT2Config(n_layer=12, n_embd=768, n_head=12)), recipe(tmp_path).sft)
    assert s.intermediate == 4 * 768
    assert fit.training_bytes(s, False) < 6 * GiB and fit.needs_checkpointing(s, 80 * GiB)[0] is False


def fake_liger(monkeypatch, model_types):
    """A stand-in `liger_kernel` package that supports `model_types` (the real one needs CUDA and Triton)."""
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["liger_kernel.transformers.monkey_patch"].MODEL_TYPE_TO_APPLY_LIGER_FN = dict.fromkeys(model_types)


def test_liger_only_on_a_gpu_with_the_package_and_kernels_for_the_architecture(monkeypatch):
    assert fit.liger_supported("qwen3", cuda=False) == (False, "Liger kernels off (no GPU)")
    if "liger_kernel" not in sys.modules and importlib.util.find_spec("liger_kernel") is None:
        assert fit.liger_supported("qwen3", cuda=True) == (False, "Liger kernels off (liger_kernel is not installed)")
    fake_liger(monkeypatch, ["llama", "qwen3"])
    assert fit.liger_supported("qwen3", cuda=True) == (True, "Liger kernels on")
    assert fit.liger_supported("gpt2", cuda=True) == (False, "Liger kernels off (no kernels for gpt2)")


def test_apply_decides_only_the_keys_the_recipe_left_unset(tmp_path, monkeypatch):
    fake_liger(monkeypatch, ["qwen3"])
    model = on_meta(Qwen3Config(**QWEN3_06B))
    r = recipe(tmp_path)
    notes = fit.apply(r, model, device_bytes=16 * GiB, cuda=True)
    assert r.sft.activation_checkpointing is True and r.sft.use_liger_kernel is True
    assert notes[0].startswith("activation checkpointing on") and notes[1] == "Liger kernels on"
    assert fit.apply(r, model, device_bytes=80 * GiB, cuda=False) and r.sft.activation_checkpointing is False
    assert r.sft.use_liger_kernel is False

    for key in ("activation_checkpointing", "gradient_checkpointing"):  # the recipe's word wins, either name
        given = recipe(tmp_path, **{key: False}, use_liger_kernel=False)
        assert fit.apply(given, model, device_bytes=16 * GiB, cuda=True) == []
        assert given.sft.activation_checkpointing is False and given.sft.use_liger_kernel is False
    forced = recipe(tmp_path, activation_checkpointing=True)
    assert fit.apply(forced, model, device_bytes=80 * GiB, cuda=True)[0] == "Liger kernels on"
    assert forced.sft.activation_checkpointing is True


def test_yaml_keys_count_as_set(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(Path(TINY).read_text() + "activation_checkpointing: true\n")
    r = load_recipe(str(path), output_dir=str(tmp_path / "out"))
    assert {"activation_checkpointing", "max_length", "output_dir"} <= r.given and "use_liger_kernel" not in r.given


def test_the_built_trainer_uses_fused_adamw_and_shows_its_defaults(tmp_path):
    from rich.console import Console

    from sft_recipes import build_trainer
    from sft_recipes.summary import print_summary

    trainer = build_trainer(load_recipe(TINY, max_steps=1, eval_strategy="no", eval_split=0, output_dir=str(tmp_path)))
    assert trainer.args.optim == "adamw_torch_fused"  # transformers' own default with torch >= 2.8
    assert trainer.create_optimizer().defaults["fused"] is True
    assert trainer.args.activation_checkpointing is False and trainer.args.use_liger_kernel is False  # no GPU here
    console = Console(record=True, width=200)
    print_summary(trainer, console)
    line = next(l for l in console.export_text().splitlines() if l.startswith("defaults"))
    assert "activation checkpointing off (no GPU)" in line and "Liger kernels off (no GPU)" in line


def test_under_fsdp_the_state_is_split_and_fsdps_own_checkpointing_is_left_alone(tmp_path):
    model = on_meta(Qwen3Config(**QWEN3_06B))
    alone = fit.shape(model, recipe(tmp_path).sft, env={})
    split = fit.shape(model, recipe(tmp_path).sft, env={"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"})
    assert split.shards == 8 and alone.shards == 1
    activations = 28 * (8 * 1024 + 3 * 3072) * 8192 * 2
    assert fit.training_bytes(split, False) == 16 * 596049920 // 8 + activations
    r = recipe(tmp_path)
    notes = fit.apply(r, model, device_bytes=16 * GiB, cuda=False, env={"FSDP_ACTIVATION_CHECKPOINTING": "true"})
    assert r.sft.activation_checkpointing is False and notes[0] == "activation checkpointing by FSDP (fsdp_activation_checkpointing)"
