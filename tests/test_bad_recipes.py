"""Bad recipes and bad command lines through the command's `main()` (and a few through the real
`python -m sft_recipes.run`, one interpreter each): exit code 2, one clear line saying what and where,
no traceback. (Bad data files: test_bad_inputs.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = "recipes/data/tiny_tasks.json"
BASE = f"model_name_or_path: tiny:gpt2\nchat_template: alpaca\ndatasets:\n  - {{path: {DATA}, weight: 40}}\nmax_steps: 1\n"

# (case id, recipe text or None for the plain base recipe, extra CLI args, fragments of the error line)
CASES = [
    ("malformed_yaml", "model_name_or_path: x\n  bad: [\n", [], ["line 2", "not valid YAML"]),
    ("not_a_mapping", "- a\n- b\n", [], ["must be a YAML mapping"]),
    ("unknown_key", BASE + "lerning_rate: 1.0e-3\n", [], ["unknown key 'lerning_rate'", "'learning_rate'"]),
    ("wrong_type", BASE + "learning_rate: fast\n", [], ["wrong_type.yaml: ", "learning_rate",
                                                     "invalid float value: 'fast'"]),
    ("negative_max_length", BASE + "max_length: -5\n", [], ["max_length must be positive, got -5"]),
    ("zero_batch", BASE + "per_device_train_batch_size: 0\n", [], ["per_device_train_batch_size must be positive"]),
    ("eval_split_too_big", BASE + "eval_split: 1.5\n", [], ["eval_split", "[0, 1)"]),
    ("no_datasets", "model_name_or_path: tiny:gpt2\nchat_template: alpaca\n", [], ["no `datasets:`"]),
    ("datasets_not_a_list", BASE.replace(f"  - {{path: {DATA}, weight: 40}}\n", "") .replace("datasets:\n", "datasets: 3\n"),
     [], ["datasets"]),
    ("dataset_unknown_key", BASE.replace("{path:", "{pth: x, path:"), [], ["unknown key 'pth'", "'path'"]),
    ("dataset_missing_file", BASE.replace(DATA, "data/nope.jsonl"), [], ["data/nope.jsonl", "not found"]),
    ("dataset_bad_weight", BASE.replace("weight: 40", "weight: -1"), [], ["weight", "-1"]),
    ("dataset_bad_format", BASE.replace("weight: 40", "weight: 40, format: alpacca"), [],
     ["unknown format 'alpacca'", "alpaca"]),
    ("unknown_template", BASE.replace("alpaca\n", "chatm\n", 1), [], ["unknown template 'chatm'", "'chatml'"]),
    ("template_file_missing", BASE.replace("chat_template: alpaca", "chat_template: my/format.jinja"), [],
     ["my/format.jinja", "not found"]),
    ("template_raises", BASE.replace("chat_template: alpaca", "chat_template: \"{{ raise_exception('no way') }}\""),
     [], ["no train rows left", "template_error", "no way"]),
    ("system_turn_where_template_has_no_slot", None, ["--chat_template", "mistral"], ["template_error", "system"]),
    ("max_length_shorter_than_header", BASE + "max_length: 6\n", [],
     ["no train rows left", "no_trained_tokens_after_truncation"]),
    ("missing_local_model", BASE.replace("tiny:gpt2", "./models/nothing-here"), [],
     ["./models/nothing-here: model folder not found"]),
    ("missing_model_in_an_existing_folder", BASE.replace("tiny:gpt2", "recipes/nothing-here"), [],
     ["recipes/nothing-here: model folder not found"]),  # `org/name`-shaped, but recipes/ is a folder here
    ("qlora_on_cpu", BASE + "use_peft: true\nload_in_4bit: true\n", [], ["need a CUDA GPU"]),
    ("early_stopping_without_eval", BASE + "early_stopping_patience: 2\n", [], ["early_stopping_patience needs"]),
    ("eval_without_eval_data", BASE + "eval_strategy: steps\n", [], ["no eval data", "eval_split"]),
    ("bad_train_on", BASE + "train_on: first_assistant\n", [], ["train_on must be one of", "first_assistant"]),
    ("non_utf8_recipe", b"model_name_or_path: caf\xe9\n", [], ["not UTF-8"]),
    ("missing_recipe", "MISSING", [], ["recipe not found"]),
    ("huge_record_truncated_to_nothing", None, ["--max_length", "64"], ["no_trained_tokens_after_truncation"]),
    ("cli_typo", None, ["--lerning_rate", "1e-3"], ["unknown key 'lerning_rate'", "'learning_rate'"]),
    ("cli_bad_int", None, ["--max_steps", "many"], ["error: command line: ", "max_steps", "invalid int value: 'many'"]),
    ("cli_bad_choice", None, ["--truncation", "middle"], ["command line: ", "truncation", "invalid choice: 'middle'"]),
    ("trl_data_key", BASE + "assistant_only_loss: true\n", [], ["assistant_only_loss", "use `train_on`"]),
    ("cli_trl_data_key", None, ["--dataset_text_field", "prompt"], ["dataset_text_field", "columns"]),
    ("cli_datasets_not_yaml", None, ["--datasets", "[{path: x"], ["--datasets", "not YAML or JSON"]),
    ("cli_datasets_missing_file", None, ["--datasets", "data/nope.jsonl"], ["data/nope.jsonl", "not found"]),
    ("cli_missing_checkpoint", None, ["--resume_from_checkpoint", "/no/such/checkpoint"],
     ["no checkpoint folder at /no/such/checkpoint"]),
    ("dedup_threshold_zero", BASE + "dedup: near\ndedup_threshold: 0\n", [], ["dedup_threshold", "(0, 1]", "got 0"]),
    ("dedup_threshold_above_one", None, ["--dedup_threshold", "1.2"], ["dedup_threshold", "(0, 1]", "got 1.2"]),
    ("dedup_unknown", BASE + "dedup: fuzzy\n", [], ["dedup must be one of none, exact, near", "fuzzy"]),
    ("ngram_below_4", BASE + "eval_split: 0.1\ndecontaminate_ngram: 3\n", [], ["decontaminate_ngram", "at least 4"]),
    ("min_turns_above_max", BASE + "min_turns: 3\nmax_turns: 1\n", [],
     ["min_turns and max_turns need 0 <= min_turns <= max_turns, got 3 and 1"]),
    ("min_chars_above_max", None, ["--min_response_chars", "50", "--max_response_chars", "10"],
     ["need 0 <= min_response_chars <= max_response_chars, got 50 and 10"]),
    ("decontaminate_without_eval", BASE + "decontaminate: true\n", [], ["decontaminate: true needs eval rows"]),
    ("cleaning_removes_every_row", BASE + "min_response_chars: 100000\n", [],
     ["cleaning removed all", "response_too_short", "loosen `min_response_chars`"]),
]


def _prepare(case, tmp: Path):
    name, text, args, _ = case
    recipe = tmp / f"{name}.yaml"
    if name == "system_turn_where_template_has_no_slot":  # mistral has no system slot after the first turn
        data = tmp / "system_midway.json"
        turns = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."},
                 {"role": "assistant", "content": "Hello."}]
        data.write_text(json.dumps([{"messages": turns}] * 3))
        text = BASE.replace(f"{{path: {DATA}, weight: 40}}", f"{{path: {data}}}")
    elif name == "huge_record_truncated_to_nothing":  # a 10 MB instruction: loads, then nothing to train
        data = tmp / "huge.json"
        data.write_text(json.dumps([{"instruction": "word " * 2_000_000, "output": "ok"}]))
        text = BASE.replace(f"{{path: {DATA}, weight: 40}}", f"{{path: {data}}}")
    if text == "MISSING":
        return [str(tmp / "no_such_recipe.yaml"), *args]
    recipe.write_bytes(text if isinstance(text, bytes) else (text or BASE).encode())
    return [str(recipe), "--output_dir", str(tmp / f"out_{name}"), *args]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_recipes")


def _main(argv, capsys):
    from sft_recipes.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def _check(code, stderr, fragments):
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, stderr[-2000:]
    for fragment in fragments:
        assert fragment in error[0], error[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_gives_one_clear_line(case, workdir, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    _check(*_main(_prepare(case, workdir), capsys), case[3])


@pytest.mark.parametrize("name", ["unknown_key", "dataset_missing_file", "cli_bad_choice"])
def test_the_real_command_says_the_same(name, workdir):
    case = next(c for c in CASES if c[0] == name)
    proc = subprocess.run([sys.executable, "-m", "sft_recipes.run", *_prepare(case, workdir)], cwd=ROOT,
                          capture_output=True, text=True)
    _check(proc.returncode, proc.stderr, case[3])


@pytest.mark.parametrize("overrides, fragment", [
    ({"max_stepz": 3}, "load_recipe: unknown key 'max_stepz'; did you mean 'max_steps'?"),
    ({"datasetz": []}, "load_recipe: unknown key 'datasetz'; did you mean 'datasets'?"),
    ({"max_steps": "abc"}, "load_recipe: argument --max_steps"),
])
def test_library_keywords_are_blamed_on_load_recipe(overrides, fragment, monkeypatch):
    from sft_recipes.config import load_recipe
    from sft_recipes.errors import RecipeError

    monkeypatch.chdir(ROOT)
    with pytest.raises(RecipeError, match="^" + fragment.replace("?", r"\?")):
        load_recipe("recipes/tiny_alpaca.yaml", **overrides)


def test_load_recipe_takes_none_as_the_value_itself(monkeypatch):
    """chat_template=None means the tokenizer's own template, as in a recipe that sets none (not the string 'None')."""
    from sft_recipes.config import load_recipe

    monkeypatch.chdir(ROOT)
    assert load_recipe("recipes/tiny_alpaca.yaml", chat_template=None).data.chat_template is None


def test_under_a_launcher_each_error_is_said_once_per_machine(tmp_path, monkeypatch, capsys):
    """Two processes of one launch (their TORCHELASTIC_ERROR_FILEs share the launch's folder) failing with the same
    line: the first says it, the second stays silent; a different line is still said; without a launcher,
    every call says it."""
    from sft_recipes.errors import say_once

    for rank in (0, 1):
        (tmp_path / "attempt_0" / str(rank)).mkdir(parents=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, line in ((0, "error: x"), (1, "error: x"), (1, "error: y")):
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "attempt_0" / str(rank) / "error.json"))
        say_once(line)
    assert capsys.readouterr().err == "error: x\nerror: y\n"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    say_once("error: x")
    say_once("error: x")
    assert capsys.readouterr().err == "error: x\nerror: x\n"
