"""The benchmark code no CI machine runs: the GPU section (no CUDA here) is stepped on CPU with a tiny
GPT-2 config, so what a GPU user runs is exercised, and its figures are read back."""
from __future__ import annotations

import pytest
from conftest import shared_file

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}


def test_gpu_section_trains_and_reports_on_cpu(tmp_path):
    from benchmarks import gpu

    if not shared_file("gpt2-tokenizer").is_dir():
        pytest.skip("../shared/data/gpt2-tokenizer not found")
    data = gpu.pretokenize(shared_file("alpaca_en_demo.json"), tmp_path / "data")
    runs = {}
    for name, cfg in {gpu.BASELINE: {"attn": "sdpa", "lora": False}, "sdpa LoRA": {"attn": "sdpa", "lora": True}}.items():
        trainer = gpu.GpuTrainer(data, str(tmp_path / name.replace(" ", "_")), cfg, model_config=TINY_GPT2, bf16=False)
        assert trainer.meter.trainer.packed_rows  # sdpa: the packed blocks reach the model as rows
        runs[name] = [trainer(3)]
    for (run,) in runs.values():
        per_step = run["tensor_tokens"] / run["timed_steps"]
        assert per_step == 8 * TINY_GPT2["n_positions"]  # 8 packed blocks, each a full row
        assert 0.98 * run["tensor_tokens"] <= run["real_tokens"] <= run["tensor_tokens"]  # packed: almost no padding
        assert 0 < run["trained_tokens"] < run["real_tokens"]  # prompts are masked
    assert runs[gpu.BASELINE][0]["digest"] == runs["sdpa LoRA"][0]["digest"]  # the same batches

    figures = {f["name"]: f for f in gpu.figures(runs, "NVIDIA H100 80GB HBM3")}
    base, lora = figures["sdpa full: processed tokens/s"], figures["sdpa LoRA vs sdpa full: processed tokens/s"]
    assert base["value"] > 0 and base["detail"]["mfu"] is not None and base["detail"]["peak_memory_gib"] is None
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert lora["unit"] == "x" and lora["value"] > 0
