"""Training mechanics a user relies on without seeing them: a packed batch scores every token exactly as the
same rows unpacked; a LoRA adapter (with the template's new tokens) merges into a standalone model with the
same outputs; a run killed mid-way resumes to the very same losses; early stopping stops; LoRA trains in two
CPU processes. Everything uses the embedded tiny model and runs offline."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny_alpaca.yaml"


def command(module: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)


def losses_by_step(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


# ---------------------------------------------------------------- packing
def per_token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every trained position, in order (row by row; a packed row holds the rows in order)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        # use_cache=False as in training (TRL's loss passes it): with a cache, transformers does not derive the
        # per-document mask from position_ids, and packed rows would attend to each other.
        logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    trained = labels != -100
    return F.cross_entropy(logits[trained].float(), labels[trained], reduction="none")


@pytest.fixture(scope="module")
def masked_rows(tmp_path_factory):
    """Four rows of the default task set (no tool chats) as training sees them: tokenized, prompt masked to -100."""
    from sft_recipes import build_datasets, load_recipe, load_tokenizer

    tasks = [{"path": str(ROOT / "recipes" / "data" / "tiny_tasks.json")}]
    recipe = load_recipe(TINY, datasets=tasks, eval_strategy="no", eval_split=0,
                         output_dir=str(tmp_path_factory.mktemp("pack") / "none"))
    tokenizer = load_tokenizer(recipe)
    train_ds, _, _ = build_datasets(recipe, tokenizer)
    return tokenizer, [train_ds[i] for i in range(4)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_score_every_token_as_unpacked(masked_rows, attention, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_recipes import load_recipe
    from sft_recipes.trainer import load_model

    tokenizer, rows = masked_rows
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the padded batch really pads
    model = load_model(load_recipe(TINY, attn_implementation=attention, output_dir=str(tmp_path)), tokenizer).eval()
    assert model.config._attn_implementation == attention

    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    assert padded["input_ids"].shape[0] == len(rows) and "attention_mask" in padded
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for r in rows for i in range(len(r["input_ids"]))]

    unpacked, together = per_token_losses(model, padded), per_token_losses(model, packed)
    n_trained = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    assert unpacked.numel() == together.numel() == n_trained > 0
    torch.testing.assert_close(together, unpacked, rtol=0, atol=1e-4)

    # Control: the same packed row without position_ids is one long document, and the scores move.
    blended = per_token_losses(model, {k: v for k, v in packed.items() if k != "position_ids"})
    assert (blended - unpacked).abs().max() > 1e-2


def packed_block(rows) -> dict:
    """Rows joined as TRL's bfd packing stores a block: one example with the lengths of its documents."""
    return {"input_ids": [t for r in rows for t in r["input_ids"]], "labels": [t for r in rows for t in r["labels"]],
            "seq_lengths": [len(r["input_ids"]) for r in rows]}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_blocks_kept_as_rows_score_every_token_as_unpacked(masked_rows, attention, tmp_path):
    """On dense attention our trainer collates each packed block as its own row (sft_recipes.packing)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sft_recipes import load_recipe
    from sft_recipes.packing import PackedRows
    from sft_recipes.trainer import load_model

    tokenizer, rows = masked_rows
    model = load_model(load_recipe(TINY, attn_implementation=attention, output_dir=str(tmp_path)), tokenizer).eval()
    blocks = [packed_block(rows[:3]), packed_block(rows[3:])]  # lengths differ: the second row is padded
    batch = PackedRows(tokenizer.pad_token_id)(blocks)
    assert batch["input_ids"].shape == (2, len(blocks[0]["input_ids"])) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for r in rows[:3] for i in range(len(r["input_ids"]))]
    pad = batch["input_ids"][1, len(blocks[1]["input_ids"]):]
    assert len(pad) > 0 and (pad == tokenizer.pad_token_id).all()
    assert (batch["labels"][1, len(blocks[1]["input_ids"]):] == -100).all()

    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    unpacked, as_rows = per_token_losses(model, padded), per_token_losses(model, batch)
    assert unpacked.numel() == as_rows.numel() > 0
    torch.testing.assert_close(as_rows, unpacked, rtol=0, atol=1e-4)

    # Control: with an attention_mask, transformers ignores the documents and a row is one long text.
    blended = per_token_losses(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])})
    assert (blended - unpacked).abs().max() > 1e-2


def test_packed_rows_trainer_counts_every_token(tmp_path):
    """TRL counts a batch without attention_mask as one row; our trainer logs all rows' tokens."""
    from sft_recipes import build_trainer, load_recipe

    trainer = build_trainer(load_recipe(TINY, packing=True, per_device_train_batch_size=4, max_steps=3,
                                        logging_steps=1, eval_strategy="no", eval_split=0, disable_tqdm=True,
                                        output_dir=str(tmp_path)))
    assert trainer.packed_rows and trainer.model.config._attn_implementation == "sdpa"
    collate, sizes = trainer.data_collator, []

    def counting(examples):
        batch = collate(examples)
        assert batch["input_ids"].shape[0] == 4 and "attention_mask" not in batch
        sizes.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    logged = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    assert logged == [sum(sizes[:k]) for k in (1, 2, 3)]


# ---------------------------------------------------------------- LoRA + merge
def test_lora_adapter_merges_into_a_standalone_model_with_the_same_logits(tiny_lora, tmp_path):
    trainer, adapter = tiny_lora
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    added = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["trainable_token_indices"]) == sorted(added)  # the new rows travel with the adapter
    assert not (adapter / "model.safetensors").exists()

    proc = command("sft_recipes.merge", str(adapter), "--output", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""  # no third-party warnings or progress bars that ask nothing of the user
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert merged_tokenizer.chat_template == tokenizer.chat_template and len(merged_tokenizer) == len(tokenizer)
    assert {tokenizer.eos_token_id, added[1]} <= set(merged.generation_config.eos_token_id)

    conversations = [[{"role": "user", "content": "Reverse the word.\n\nlemon"}, {"role": "assistant", "content": "nomel"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add the numbers: 3 + 4."}],
                     [{"role": "user", "content": "Name the capital of the country: Peru."}]]
    live = trainer.model.eval()
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=messages[-1]["role"] == "user",
                                            return_tensors="pt", return_dict=True)["input_ids"]
        assert set(added) <= set(ids[0].tolist())
        with torch.no_grad():
            want, got = live(input_ids=ids).logits, merged(input_ids=ids).logits
            with live.disable_adapter():
                before = live(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert (before - want).abs().max() > 1e-2  # the adapter changed the model: the equality means something


def test_lora_trains_the_new_tokens_output_rows_when_the_head_is_untied(tmp_path):
    """Llama/Mistral-style models keep a head apart from the input embeddings: the template's new tokens
    need trained rows in both, or the model can hardly learn to emit the end of turn it stops on."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    from sft_recipes import load_recipe, merge, tiny, train

    tokenizer = AutoTokenizer.from_pretrained(tiny.tiny_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = tmp_path / "adapter"
    train(load_recipe(TINY, model_name_or_path=str(tmp_path / "base"), chat_template="chatml", use_peft=True,
                      lora_r=8, lora_alpha=16, lora_target_modules="all-linear", max_steps=6,
                      per_device_train_batch_size=8, learning_rate=1e-2, eval_strategy="no", eval_split=0,
                      output_dir=str(adapter), disable_tqdm=True))
    added = AutoTokenizer.from_pretrained(adapter).convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    indices = json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"]
    assert indices == {"lm_head": added, "model.embed_tokens": added}

    merge.main([str(adapter), "--output", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    saved = load_file(adapter / "adapter_model.safetensors")
    for layer, name in ((merged.lm_head, "lm_head"), (merged.model.embed_tokens, "model.embed_tokens")):
        before = saved[f"base_model.model.{name}.token_adapter.base_layer.weight"]  # as resized, untrained
        trained = (layer.weight - before).abs().amax(dim=1) > 1e-3
        assert trained.nonzero().flatten().tolist() == sorted(added)  # exactly the new rows changed


def test_merge_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    from sft_recipes import merge

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    for folder in (tmp_path / "model", tmp_path / "missing"):
        with pytest.raises(SystemExit) as exit_:
            merge.main([str(folder), "--output", str(tmp_path / "out")])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(folder) in err and "adapter" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- kill and resume
RESUME_ARGS = [TINY, "--max_steps", "40", "--save_strategy", "steps", "--save_steps", "10", "--eval_strategy", "no",
               "--logging_steps", "1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]


def _wait_for_checkpoint(proc, checkpoint: Path) -> None:
    """Until the checkpoint's trainer_state.json (written last) is complete JSON, however slow the machine."""
    while True:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return
        except (OSError, ValueError):
            assert proc.poll() is None, f"the run ended before {checkpoint.name} (rc {proc.returncode})"
            time.sleep(0.1)


def test_run_killed_after_a_checkpoint_resumes_to_the_same_losses(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = command("sft_recipes.run", *RESUME_ARGS, "--output_dir", str(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "sft_recipes.run", *RESUME_ARGS, "--output_dir", str(killed)],
                                 cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for_checkpoint(first, killed / "checkpoint-20")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not (killed / "config.json").exists()  # it really died mid-run

    proc = command("sft_recipes.run", *RESUME_ARGS, "--output_dir", str(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "checkpoint-" in proc.stderr
    assert "missing keys" not in proc.stderr  # the tied head, saved once under the embedding's name

    want, got = losses_by_step(straight), losses_by_step(killed)
    assert sorted(got) == sorted(want) == list(range(1, 41))
    for step in range(1, 41):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    """A kill while saving leaves checkpoint-N without trainer_state.json (saved last): resume from the one before."""
    from sft_recipes import load_recipe
    from sft_recipes.trainer import _resume_point

    out = tmp_path / "run"
    (out / "checkpoint-20").mkdir(parents=True)
    (out / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    (out / "checkpoint-30").mkdir()
    (out / "checkpoint-30" / "model.safetensors").write_bytes(b"")
    assert Path(_resume_point(load_recipe(TINY, output_dir=str(out)))) == out / "checkpoint-20"


# ---------------------------------------------------------------- early stopping
def test_early_stopping_stops_when_eval_loss_stops_improving(tmp_path):
    from sft_recipes import load_recipe, train

    max_steps = 20
    trainer = train(load_recipe(
        TINY, max_steps=max_steps, learning_rate=5.0, warmup_steps=0, lr_scheduler_type="constant",  # diverges
        early_stopping_patience=1, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        eval_on_start=False,  # a step-0 eval has no checkpoint, so it can't be the best model kept
        load_best_model_at_end=True, save_only_model=True, per_device_train_batch_size=8, eval_split=0.01,
        logging_steps=1, disable_tqdm=True, output_dir=str(tmp_path / "es")))
    state = trainer.state
    end = next(i for i, h in enumerate(state.log_history) if "train_runtime" in h)  # then comes the final eval
    evals = {h["step"]: h["eval_loss"] for h in state.log_history[:end] if "eval_loss" in h}
    assert state.global_step < max_steps
    # patience 1, evaluation every step: it stops at the first evaluation that is no better than the best
    assert state.global_step == state.best_global_step + 1
    assert evals[state.global_step] >= state.best_metric == min(evals.values())
    # ... and the best model is the one kept and saved
    final = json.loads((tmp_path / "es" / "sft_run.json").read_text())["metrics"]["eval_loss"]
    assert final == pytest.approx(state.best_metric, rel=1e-5)


# ---------------------------------------------------------------- two processes
def test_two_cpu_processes_train_a_lora_adapter(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "mp"
    proc = command("accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m", "sft_recipes.run", TINY,
                   "--use_peft", "true", "--lora_target_modules", "all-linear", "--max_steps", "3",
                   "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--disable_tqdm", "true",
                   "--output_dir", str(out), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stderr
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b)  # LoRA B starts at zero: nonzero means it trained


# ---------------------------------------------------------------- determinism
def test_same_recipe_and_seed_give_the_same_data_and_the_same_losses(tmp_path):
    from sft_recipes import load_recipe, train
    from sft_recipes.trainer import load_tokenizer, masked_datasets

    def run(name):
        recipe = load_recipe(TINY, max_steps=4, logging_steps=1, eval_strategy="no", eval_split=0,
                             per_device_train_batch_size=8, disable_tqdm=True, output_dir=str(tmp_path / name))
        data, _, _ = masked_datasets(recipe, load_tokenizer(recipe))
        losses = [h["loss"] for h in train(recipe).state.log_history if "loss" in h]
        return data._fingerprint, losses

    first, second = run("a"), run("b")
    assert first[0] == second[0]  # the processed dataset: same fingerprint, so the same cache
    assert len(first[1]) == 4 and first[1] == second[1]  # the loss curve, bit for bit on CPU


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "sft_recipes.run", TINY, "--max_steps", "5000", "--eval_strategy", "no",
           "--logging_steps", "1", "--per_device_train_batch_size", "8", "--output_dir", str(out)]
    log = tmp_path / "term.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=sink, text=True)
        while "'loss'" not in log.read_text():  # training has begun (no time limit: a slow machine is no failure)
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    stderr = log.read_text()
    assert proc.returncode == 2 and "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    saved = sorted(out.glob("checkpoint-*"))
    assert saved and (saved[-1] / "trainer_state.json").is_file()
    step = int(saved[-1].name.split("-")[1])
    again = subprocess.run(cmd[:5] + [str(step + 2)] + cmd[6:], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and f"resuming from {saved[-1]}" in again.stderr
