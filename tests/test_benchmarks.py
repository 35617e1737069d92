"""The benchmark code no CI machine runs: the GPU section (no CUDA here) is stepped on CPU with a tiny
GPT-2 config, so what a GPU user runs is exercised, and its figures are read back."""
from __future__ import annotations

import json

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


TINY_QWEN3 = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True, "max_position_embeddings": 64}


def test_defaults_section_compares_plain_trl_with_ours_on_cpu():
    """The GPU run's plain-TRL-vs-ours part, whole (workers, the same rows, figures), at tiny shapes."""
    from benchmarks import gpu

    for name in ("gpt2-tokenizer", "tokenizers/qwen3", "alpaca_en_demo.json"):
        if not shared_file(name).exists():
            pytest.skip(f"../shared/data/{name} not found")
    shapes = {"gpt2": {**TINY_GPT2, "n_positions": 64}, "qwen3": TINY_QWEN3}  # 151,936 output rows: few tokens
    figures = gpu.defaults(True, "NVIDIA H200", shapes=shapes, steps=2, reps=1, bf16=False, batch=2, max_length=64)
    by_name = {f["name"]: f for f in figures}
    assert sorted(by_name) == sorted([
        "GPT-2 124M, plain TRL: processed tokens/s", "GPT-2 124M, sft_recipes vs GPT-2 124M, plain TRL: processed tokens/s",
        "Qwen3-0.6B-shaped, plain TRL: processed tokens/s",
        "Qwen3-0.6B-shaped, sft_recipes vs Qwen3-0.6B-shaped, plain TRL: processed tokens/s",
        "Qwen3-0.6B-shaped, sft_recipes LoRA vs Qwen3-0.6B-shaped, plain TRL: processed tokens/s",
        "Qwen3-0.6B-shaped, LoRA vs Qwen3-0.6B-shaped, full: processed tokens/s"])
    for f in figures:
        assert f["value"] > 0 and f["detail"]["mfu"] is not None and f["detail"]["trained_tokens_per_s"] > 0
    # plain TRL keeps SFTConfig's activation checkpointing; ours decides (no GPU here: off)
    assert by_name["GPT-2 124M, plain TRL: processed tokens/s"]["detail"]["activation_checkpointing"] is True
    assert by_name["GPT-2 124M, sft_recipes vs GPT-2 124M, plain TRL: processed tokens/s"]["detail"][
        "activation_checkpointing"] is False


def test_scale_section_measures_a_tiny_mixture(tmp_path):
    """The 1M-row benchmark's whole path at 30 and 60 rows: the mixture has its three kinds, each measurement
    runs in its own worker and cache, and the figures read the results."""
    from benchmarks import scale

    for name in (*scale.SEEDS.values(), "gpt2-tokenizer"):
        shared_file(name)
    files = scale.write_mixture(tmp_path / "mix", 31)
    lines = [[json.loads(x) for x in f.read_text().splitlines()] for f in files]
    assert [len(x) for x in lines] == [11, 10, 10]
    assert "instruction" in lines[0][0] and "conversations" in lines[1][0] and "messages" in lines[2][0]
    assert any(t["from"] == "function_call" for r in lines[1] for t in r["conversations"])
    assert any(m.get("reasoning_content") for r in lines[2] for m in r["messages"])
    results = scale.measure([(30, 1), (60, 1), (60, 2)], tmp_path)
    for (rows, n), r in results.items():
        assert r["rows"] == rows and r["examples"] - r["refused"] > rows / 2 and r["peak_rss_mib"] > 50
        assert r["cache_mib"] > 0 and r["total_s"] >= r["mask_s"] > 0
        assert 0 < r["peak_anon_mib"] < r["peak_rss_mib"] and r["peak_file_mib"] > 0  # file pages split off
        for stage in ("start", "load", "clean", "mask"):
            assert 0 < r[f"anon_after_{stage}_mib"] <= r[f"rss_now_after_{stage}_mib"]
            assert r[f"arrow_after_{stage}_mib"] >= 0
        assert ("exact_clean" in r) == (n == 1)
    exact = results[30, 1]["exact_clean"]  # load and clean only, dedup exact: no near duplicates counted
    assert exact["rows"] == 30 and "mask_s" not in exact and "near_duplicate" not in exact["cleaned"]
    assert exact["anon_after_clean_mib"] > 0 and exact["peak_anon_mib"] > 0
    assert results[60, 2]["worker_peak_rss_mib"] > 0  # the num_proc workers ran
    by_name = {f["name"]: f for f in scale.figures(results)}
    assert list(by_name)[0] == "load + clean + mask, 60 vs 30 rows: time" and len(by_name) == 7
    held = by_name["60 vs 30 rows: peak memory held by the process (anonymous: excludes Arrow's memory-mapped "
                   "file pages)"]
    assert held["goal"] == "<= 1.5x" and {"clean_bytes_per_row", "arrow_clean_bytes_per_row"} <= set(held["detail"])
    assert by_name["60 vs 30 rows: peak RSS, file pages included (no goal)"]["goal"] is None
    clean = by_name["clean, 30 -> 60 rows: memory held per added row, near dedup"]["detail"]
    assert all(isinstance(clean[k], int) for k in ("exact_dedup_bytes_per_row", "near_minus_exact_bytes_per_row"))
    assert "60 rows: num_proc 2 vs 1, speed" in by_name
    # the full run measures num_proc 2 at the small size only; the speedup is read there
    small = {k: v for k, v in results.items() if k != (60, 2)} | {(30, 2): results[60, 2]}
    assert "30 rows: num_proc 2 vs 1, speed" in {f["name"] for f in scale.figures(small)}
