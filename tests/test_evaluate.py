"""Evaluation: offline metrics with hand-checked values, the same eval rows as training, a loss that
matches the model's own, and the report files (report.md, metrics.json, loss.png)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from sft_recipes import evaluate as ev
from sft_recipes import load_recipe, load_tokenizer, metrics, report
from sft_recipes.trainer import masked_datasets

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "tiny_alpaca.yaml")
PNG = b"\x89PNG\r\n\x1a\n"


def recipe():
    """The fixture's recipe (conftest `tiny_trained`), so evaluation sees the rows training held out."""
    return load_recipe(RECIPE, max_steps=30, eval_strategy="no", eval_split=0.05,
                       datasets=[{"path": str(ROOT / "recipes" / "data" / "tiny_tasks.json")}])


# ---------------------------------------------------------------- metrics, checked by hand
def test_rouge_l_by_hand():
    # LCS of words: "the cat on the mat" = 5 of 6 both ways -> F 5/6; "a b c" vs "c b a" -> 1/3;
    # "Paris" vs "paris." -> tokenizer lowercases and drops punctuation -> 1. Mean 13/18.
    got = metrics.load("rouge").compute(predictions=["the cat sat on the mat", "a b c", "Paris"],
                                        references=["the cat is on the mat", "c b a", "paris."], per_example=True)
    assert got["rouge_l_scores"] == pytest.approx([5 / 6, 1 / 3, 1.0])
    assert got["rouge_l"] == pytest.approx(13 / 18)


def test_corpus_bleu_by_hand():
    # "the cat sat on the mat" vs "the cat is on the mat": n-gram matches 5/6, 3/5, 1/4, 0/3; the empty
    # 4-gram order is smoothed to 1/(2*3); equal lengths, no brevity penalty: 100 * (1/48) ** (1/4).
    bleu = metrics.load("bleu")
    one = bleu.compute(predictions=["the cat sat on the mat"], references=["the cat is on the mat"])
    assert one["bleu"] == pytest.approx(100 * 48 ** -0.25)
    # Corpus level: counts add up over sentences first (+ "hello world" exact): 7/8, 4/6, 1/4, 0/3.
    two = bleu.compute(predictions=["the cat sat on the mat", "hello world"],
                       references=["the cat is on the mat", "hello world"])
    assert two["bleu"] == pytest.approx(100 * (7 / 288) ** 0.25)
    assert bleu.compute(predictions=["a b c d"], references=["a b c d"])["bleu"] == pytest.approx(100)


def test_exact_match_normalises_case_punctuation_articles_spaces():
    got = metrics.load("exact_match").compute(predictions=["The Paris!", "cold ", "an apple  pie", "Berlin"],
                                              references=["paris", "Cold", "apple pie.", "Bern"], per_example=True)
    assert got["exact_match_scores"] == [1.0, 1.0, 1.0, 0.0]
    assert got["exact_match"] == 0.75


def test_metric_modules_ship_inside_the_package():
    for name in metrics.NAMES:
        assert metrics.path(name).parent == Path(metrics.__file__).parent and metrics.path(name).is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "sft_recipes.metrics" in config["tool"]["setuptools"]["packages"]


# ---------------------------------------------------------------- rows and loss
def test_eval_rows_are_the_rows_training_held_out():
    r = recipe()
    tokenizer = load_tokenizer(r)
    _, held_out, _ = masked_datasets(r, tokenizer)
    assert ev.eval_conversations(r)["messages"] == held_out["messages"]


def test_eval_loss_is_the_models_own_loss(tiny_trained):
    model, tokenizer = ev.load_evaluated(str(tiny_trained))
    rows = ev.masked_rows(ev.eval_conversations(recipe()), tokenizer, recipe()).select(range(6))
    one = rows[0]
    with torch.no_grad():
        own = model(input_ids=torch.tensor([one["input_ids"]]), labels=torch.tensor([one["labels"]])).loss.item()
    assert ev.eval_loss(model, rows.select([0]), 4)["eval_loss"] == pytest.approx(own, rel=1e-5)
    padded, single = ev.eval_loss(model, rows, 6), ev.eval_loss(model, rows, 1)  # padding changes nothing
    assert padded["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert padded["eval_tokens"] == sum(sum(x != -100 for x in r[1:]) for r in rows["labels"])
    assert padded["perplexity"] == pytest.approx(math.exp(padded["eval_loss"]))


def test_split_reference():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert ev.split_reference(msgs) == (msgs[:1], msgs[1])
    assert ev.split_reference(msgs[:1]) == (None, None)


# ---------------------------------------------------------------- the command and its files
def test_evaluate_with_baseline_writes_the_report(tiny_trained, tmp_path):
    out = tmp_path / "eval"
    runs = ev.run(recipe(), str(tiny_trained), baseline="tiny:gpt2", max_rows=6, max_new_tokens=6, output=str(out),
                  examples=3)
    assert set(runs) == {"baseline", "model"}
    saved = json.loads((out / "metrics.json").read_text())
    for name in ("baseline", "model"):
        for key in ("rouge_l", "bleu", "exact_match", "eval_loss", "perplexity"):
            assert isinstance(saved[name][key], float)
        assert saved[name]["generated_rows"] == 6
    assert saved["baseline"]["path"] == "tiny:gpt2" and saved["rows"] == 6
    # Thirty steps already lower the loss a lot from the untrained start.
    assert saved["model"]["eval_loss"] < saved["baseline"]["eval_loss"] - 1
    text = (out / "report.md").read_text()
    assert "| metric | baseline" in text and "ROUGE-L F" in text and "exact match" in text
    assert "Examples whose score changed most" in text and text.count("### ") >= 3
    assert (out / "loss.png").read_bytes().startswith(PNG) and "(loss.png)" in text
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 6


def test_cli_writes_into_the_model_dir_and_refuses_a_recipe_without_eval_data(tiny_trained, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.chdir(ROOT)  # the recipe's data path is relative to the checkout
    model = tmp_path / "copy"
    model.mkdir()
    for f in tiny_trained.iterdir():
        if f.is_file():
            (model / f.name).write_bytes(f.read_bytes())
    ev.main([RECIPE, "--model", str(model), "--max_rows", "3", "--max_new_tokens", "4"])
    assert (model / "report.md").is_file() and (model / "metrics.json").is_file()
    assert json.loads((model / "metrics.json").read_text())["model"]["generated_rows"] == 3
    assert "baseline" not in json.loads((model / "metrics.json").read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ev.main([RECIPE, "--model", str(model), "--eval_split", "0"])
    assert e.value.code == 2 and "no eval data" in capsys.readouterr().err


def test_a_lora_output_folder_evaluates_into_the_output_dir_asked_for(tiny_lora, tmp_path):
    """A LoRA run's output folder loads (adapter on its base), and `--output_dir` is where the files go,
    not a recipe key swallowed while everything lands in the model folder."""
    adapter, out = tiny_lora[1], tmp_path / "eval"
    before = sorted(p.name for p in adapter.iterdir())
    proc = subprocess.run([sys.executable, "-m", "sft_recipes.evaluate", RECIPE, "--model", str(adapter),
                           "--max_rows", "3", "--max_new_tokens", "4", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"report.md", "metrics.json", "predictions.jsonl"}
    assert json.loads((out / "metrics.json").read_text())["model"]["generated_rows"] == 3
    assert sorted(p.name for p in adapter.iterdir()) == before
    assert f"wrote {out / 'report.md'}" in " ".join(proc.stdout.split())


def test_the_prompt_cut_warning_is_said_once_a_model_in_one_format(tiny_trained, tmp_path):
    """Prompts longer than the context leaves are cut: one line per model evaluated, however many batches, and
    the same bare format before and after the metrics' libraries load (rouge_score logs through absl, which
    configures the root logger when nothing has)."""
    proc = subprocess.run([sys.executable, "-m", "sft_recipes.evaluate", RECIPE, "--model", str(tiny_trained),
                           "--baseline", "tiny:gpt2", "--max_rows", "3", "--batch_size", "1", "--max_new_tokens", "505",
                           "--output_dir", str(tmp_path / "eval")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cuts = [line[line.index("3 of 3"):] if "3 of 3" in line else line
            for line in proc.stderr.splitlines() if "start was cut" in line]
    assert cuts == ["3 of 3 prompts are longer than the 7 tokens the context leaves beside max_new_tokens; "
                    "their start was cut"] * 2, proc.stderr[-3000:]
    assert "WARNING:" not in proc.stderr


# ---------------------------------------------------------------- loss plot
HISTORY = [{"loss": 5.0, "step": 10}, {"loss": 4.0, "step": 20}, {"eval_loss": 4.2, "step": 20},
           {"loss": 3.1, "step": 30}, {"eval_loss": 3.3, "step": 30}, {"train_loss": 4.0, "step": 30}]


def test_plot_loss_from_a_log_history(tmp_path):
    path = report.plot_loss(HISTORY, tmp_path / "plots" / "loss.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000
    assert report.curves(HISTORY) == {"train": ([10, 20, 30], [5.0, 4.0, 3.1]), "eval": ([20, 30], [4.2, 3.3])}


def test_plot_loss_reads_the_output_dir_or_its_newest_checkpoint(tmp_path):
    for step, hist in ((5, HISTORY[:1]), (30, HISTORY)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    assert report.log_history(tmp_path) == HISTORY
    assert report.plot_loss(tmp_path) == tmp_path / "loss.png" and (tmp_path / "loss.png").is_file()
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": HISTORY[:2]}))
    assert report.log_history(tmp_path) == HISTORY[:2]


def test_plot_loss_without_losses_or_history(tmp_path):
    assert report.plot_loss([{"train_runtime": 1.0, "step": 3}], tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    with pytest.raises(Exception, match="no trainer_state.json"):
        report.plot_loss(tmp_path)
