"""Prepare once (sft_recipes/prepare.py): `prepare` writes the masked rows and a manifest, `run` reads them with
no masking pass, a recipe that would make other rows is refused naming its key, and two processes that each mask
half make the same rows as one."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from conftest import ROOT
from datasets import load_from_disk

from sft_recipes import load_recipe, masking, prepare
from sft_recipes.errors import RecipeError
from sft_recipes.models import load_tokenizer

TINY = str(ROOT / "recipes" / "tiny_alpaca.yaml")
# A few of each shipped kind: short tasks, and multi-turn tool chats (examples per turn keep `row` numbers honest)
DATA = [{"path": str(ROOT / "recipes" / "data" / "tiny_tasks.json"), "weight": 120},
        {"path": str(ROOT / "recipes" / "data" / "tiny_tools.jsonl"), "weight": 50}]


def recipe(folder, **overrides):
    return load_recipe(TINY, datasets=DATA, dataset_prepared_path=str(folder), eval_split=0.1,
                       **{"multi_turn": "per_turn", **overrides})


def rows(ds) -> list:
    return list(zip(ds["input_ids"], ds["labels"]))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One preparation in this process: (folder, recipe, tokenizer, the rows made by masking directly)."""
    folder = tmp_path_factory.mktemp("prep") / "prepared"
    r = recipe(folder)
    tokenizer = load_tokenizer(r)
    prepare.prepare(r, tokenizer)
    direct = load_recipe(TINY, datasets=DATA, eval_split=0.1, multi_turn="per_turn")
    return folder, r, tokenizer, prepare.build_datasets(direct, tokenizer)


def test_prepare_writes_the_masked_rows_and_a_manifest(prepared):
    folder, r, _, (train, evals, stats) = prepared
    saved = json.loads((folder / "manifest.json").read_text())
    assert rows(load_from_disk(str(folder / "train"))) == rows(train)
    assert rows(load_from_disk(str(folder / "eval"))) == rows(evals)
    assert saved["keys"]["max_length"] == 256 and saved["keys"]["datasets"] == DATA
    assert saved["keys"]["multi_turn"] == "per_turn" and "dataset_prepared_path" not in saved["keys"]
    assert saved["stats"] == json.loads(json.dumps(stats))  # counts and drop reasons, as the summary shows them
    assert saved["stats"]["train"]["split_rows"] > 0  # the tool chats became one example per turn
    assert saved["stats"]["train"]["rows"] + saved["stats"]["eval"]["rows"] == 170


def test_run_reads_the_prepared_rows_without_masking(prepared, monkeypatch, caplog):
    folder, r, tokenizer, (train, evals, stats) = prepared
    monkeypatch.setattr(masking, "tokenize", lambda *a, **k: pytest.fail("masked again"))
    with caplog.at_level(logging.WARNING, logger="sft_recipes"):
        got_train, got_eval, got_stats = prepare.build_datasets(r, tokenizer)
    assert rows(got_train) == rows(train) and rows(got_eval) == rows(evals)
    assert got_stats["train"]["examples"] == stats["train"]["examples"] == len(train)
    assert f"read {len(train)} prepared train rows and {len(evals)} eval from {folder}" in caplog.text


def test_training_reads_the_prepared_rows(prepared, monkeypatch, caplog, tmp_path):
    """`run`'s path (build_trainer, train) with the key set: no masking pass, trained on the prepared rows."""
    from sft_recipes import train

    folder, _, _, (train_rows, _, _) = prepared
    monkeypatch.setattr(masking, "tokenize", lambda *a, **k: pytest.fail("masked again"))
    with caplog.at_level(logging.WARNING, logger="sft_recipes"):
        trainer = train(recipe(folder, max_steps=1, eval_strategy="no", packing=False, disable_tqdm=True,
                               output_dir=str(tmp_path / "out")))
    assert f"read {len(train_rows)} prepared train rows" in caplog.text
    assert rows(trainer.train_dataset) == rows(train_rows) and trainer.state.global_step == 1
    assert json.loads((tmp_path / "out" / "sft_run.json").read_text())["data"]["train"]["rows"] > 100


@pytest.mark.parametrize("key, value", [("max_length", 128), ("train_on", "last_assistant"), ("seed", 7),
                                        ("dedup", "near")])
def test_a_recipe_that_makes_other_rows_is_refused_naming_the_key(prepared, key, value):
    folder, _, tokenizer, _ = prepared
    with pytest.raises(RecipeError, match=f"prepared with {key}: .*this recipe has {key}: .*prepare RECIPE"):
        prepare.read(recipe(folder, **{key: value}), tokenizer)


def test_keys_that_change_no_row_are_not_compared(prepared):
    folder, _, tokenizer, (train, _, _) = prepared
    other = recipe(folder, learning_rate=0.5, dataset_num_proc=2, overwrite_output_dir=True)
    assert len(prepare.read(other, tokenizer)[0]) == len(train)


def test_another_tokenizer_is_refused(prepared, tmp_path):
    folder, r, tokenizer, _ = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    saved = json.loads((folder / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**saved, "tokenizer": "0" * 24}))
    with pytest.raises(RecipeError, match="prepared with another tokenizer"):
        prepare.read(recipe(copy), tokenizer)


def test_a_missing_folder_is_prepared_then_read(prepared, tmp_path, caplog):
    _, _, tokenizer, (train, _, _) = prepared
    folder = tmp_path / "new" / "prepared"
    with caplog.at_level(logging.WARNING, logger="sft_recipes"):
        got, _, _ = prepare.build_datasets(recipe(folder), tokenizer)
    assert rows(got) == rows(train) and (folder / "manifest.json").is_file()
    assert "prepared" in caplog.text and f"read {len(train)} prepared train rows" in caplog.text


def test_a_folder_holding_other_files_is_not_overwritten(tmp_path, prepared):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=r"holds files `prepare` did not write \(notes.txt\)"):
        prepare.prepare(recipe(tmp_path), prepared[2])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_prepare_without_a_folder_says_which_key(capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main([TINY, "--max_steps", "1"])
    assert e.value.code == 2 and "dataset_prepared_path" in capsys.readouterr().err


def test_two_processes_each_mask_half_and_make_the_same_rows(prepared, tmp_path):
    """`accelerate launch` with 2 CPU processes: each masks a contiguous half; the rows, their order and the
    counts are those of one process."""
    folder, _, _, _ = prepared
    out = tmp_path / "two"
    flags = ["--datasets", json.dumps(DATA), "--eval_split", "0.1", "--multi_turn", "per_turn"]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "-m", "sft_recipes.prepare", TINY, "--dataset_prepared_path", str(out), *flags],
        cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((f / "manifest.json").read_text()) for f in (folder, out))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["stats"] == one["stats"] and two["keys"] == one["keys"]
    for split in ("train", "eval"):
        assert rows(load_from_disk(str(out / split))) == rows(load_from_disk(str(folder / split)))
    assert not (out / ".parts").exists()
