"""The commands as a new user meets them: `sft-recipes` lists its commands, every `--help` says what the
command does and what it takes, a missing recipe prints the usage, and every flag of every command is either
used or refused, never silently ignored."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sft_recipes import __main__ as umbrella

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/tiny_alpaca.yaml"


def command(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_recipes", *args], cwd=ROOT, capture_output=True, text=True,
                          input=stdin)


def error_line(proc) -> str:
    """The one `error: ...` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


# ---------------------------------------------------------------- sft-recipes
def test_help_lists_every_command_with_a_line():
    proc = command("--help")
    assert proc.returncode == 0, proc.stderr
    for name in umbrella.COMMANDS:
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith(name + " "))
        assert len(line.split()) > 3, line  # the name and what it does


def test_bare_and_unknown_commands_say_so():
    bare = command()
    assert bare.returncode == 2 and "commands:" in bare.stderr and "generate" in bare.stderr
    line = error_line(command("genrate"))
    assert "unknown command 'genrate'" in line and "did you mean 'generate'?" in line


@pytest.mark.parametrize("args", [["--help"], ["data", "tests/bad_inputs/unknown_role.json"]], ids=["help", "data"])
def test_a_reader_that_leaves_early_ends_the_command_quietly(args):
    """`sft-recipes --help | head -1`: the pipe's reader is gone before we write. No traceback; exit 141, as a Unix
    tool stopped by SIGPIPE reports it."""
    import os

    read, write = os.pipe()
    os.close(read)  # deterministic: `head` may leave before or after a short output is written
    try:
        proc = subprocess.run([sys.executable, "-m", "sft_recipes", *args], cwd=ROOT, stdout=write,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-2000:]


HELP_PAGES = {  # command -> what its usage line must name (the positional arguments)
    "run": "RECIPE.yaml", "train": "RECIPE.yaml", "inspect": "RECIPE.yaml", "evaluate": "RECIPE.yaml",
    "data": "path", "merge": "adapter_dir", "report": "output_dir", "generate": "--model", "chat": "--model",
    "tiny": "--write-data", "export": "RUN_DIR", "prepare": "RECIPE.yaml",
}


@pytest.fixture(scope="module")
def help_pages():
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(HELP_PAGES, pool.map(lambda name: command(name, "--help"), HELP_PAGES)))


@pytest.mark.parametrize("name", HELP_PAGES)
def test_each_help_starts_with_its_usage_and_what_it_does(name, help_pages):
    assert set(HELP_PAGES) == set(umbrella.COMMANDS)
    proc = help_pages[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    usage, _, rest = proc.stdout.partition("\n\n")  # argparse may wrap the usage over several lines
    assert usage.startswith("usage: ") and HELP_PAGES[name] in usage
    description = rest.splitlines()[0]
    assert description and not description.startswith(("options", "positional")), proc.stdout[:500]


@pytest.mark.parametrize("name", HELP_PAGES)
def test_each_help_names_the_docs_page_that_explains_it(name, help_pages):
    pages = re.findall(r"docs/([\w-]+\.md)", help_pages[name].stdout)
    assert pages and all((ROOT / "docs" / page).is_file() for page in pages), (name, pages)


def test_run_help_shows_our_keys_then_points_to_trl(help_pages):
    text = help_pages["run"].stdout
    assert len(text.splitlines()) < 130  # our keys only (TRL's run to ~870 lines)
    assert "positional arguments:" in text and "--train_on" in text and "--strict" in text
    assert "--learning_rate" not in text and "--help-all" in text
    full = command("run", "--help-all")
    assert full.returncode == 0 and "--learning_rate" in full.stdout and "--lora_r" in full.stdout


def test_run_help_names_trl_templates_and_says_each_default_once():
    from sft_recipes.keys import recipe_help_parser

    text = " ".join(recipe_help_parser("run", "x").format_help().split())
    chat = text[text.index("--chat_template VALUE"):text.index("--train_on ")]
    assert "`trl:NAME`" in chat and chat.count("default") == 1, chat
    decontaminate = text[text.index("--decontaminate BOOL"):text.index("--decontaminate_ngram")]
    assert decontaminate.count("default") == 1 and "on with eval rows" in decontaminate, decontaminate
    assert "--train_on {all_assistant,last_assistant} Which assistant turns are trained. (default: all_assistant)" \
        in text


@pytest.mark.parametrize("name", ["run", "train", "report", "merge", "tiny"])
def test_help_imports_none_of_the_stack(name):
    """`--help` is argparse alone: torch, TRL, transformers and datasets are imported only once there is work
    (importing them took 10-20 s a `--help`)."""
    code = (f"import sys\nsys.argv = ['sft-recipes', {name!r}, '--help']\nfrom sft_recipes.__main__ import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'trl', 'transformers', 'datasets') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: ") and proc.stdout.splitlines()[-1] == "[]", proc.stdout[-500:]


@pytest.mark.parametrize("name", ["run", "inspect"])
def test_run_and_inspect_without_a_recipe_print_the_usage(name):
    proc = command(name)
    line = error_line(proc)
    assert "usage:" in proc.stderr and "RECIPE.yaml" in proc.stderr
    assert "model_name_or_path" not in line or "give a recipe" in line


def test_tiny_help_and_no_arguments():
    assert command("tiny", "--help").returncode == 0
    assert "--write-data" in error_line(command("tiny"))


def test_tiny_help_names_every_file_it_writes(capsys):
    """Every shipped data file is tiny's output, and its --help names each of them."""
    from sft_recipes import tiny

    with pytest.raises(SystemExit):
        tiny.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    shipped = sorted(p.name for p in (ROOT / "recipes" / "data").iterdir())
    assert sorted(p.name for p in tiny.WRITTEN) == shipped
    assert all(name in text for name in shipped), text


# ---------------------------------------------------------------- every flag used or refused
class Reads(argparse.Namespace):
    """Parsed options that remember which of them the command looked at (kept outside, so `vars()` is clean)."""
    reads: dict[int, set] = {}

    def __getattribute__(self, name):
        if not name.startswith("_"):
            Reads.reads.setdefault(id(self), set()).add(name)
        return super().__getattribute__(name)


@pytest.fixture
def recorded(monkeypatch):
    """Every parser a command builds, with the namespace it returned (reads counted from after parsing)."""
    seen = []
    parse = argparse.ArgumentParser.parse_known_args

    def recording(self, args=None, namespace=None):
        if namespace is not None:
            return parse(self, args, namespace)
        parsed, rest = parse(self, args, Reads())
        Reads.reads[id(parsed)] = set()  # what parsing itself looked at does not count
        seen.append((self, parsed))
        return parsed, rest

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    return seen


def _given(parser, argv) -> dict[str, str]:
    """{dest: flag} for each option on the command line `argv`."""
    flags = {o: a.dest for a in parser._actions for o in a.option_strings}
    return {flags[x.split("=")[0]]: x.split("=")[0] for x in argv if x.split("=")[0] in flags}


def _scenarios(tmp, model, adapter):
    """command -> [argv, ...]: together they give every option of the command at least once."""
    alpaca, chats = tmp / "rows.jsonl", tmp / "chats.json"
    alpaca.write_text(json.dumps({"q": "Reverse the word.", "a": "nomel", "input": "lemon"}) + "\n")
    chats.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hey"}]}]))
    tools = tmp / "tools.json"
    tools.write_text(json.dumps([{"name": "get_capital", "parameters": {"type": "object"}}]))
    sampling = ["--temperature", "0.5", "--top_p", "0.9", "--top_k", "5", "--max_new_tokens", "2", "--seed", "1"]
    prompt = ["--tools", str(tools), "--chat_template_kwargs", "{style: terse}"]
    return {
        "generate": [["--model", model, "--prompt", "Reverse the word.", "--input", "lemon", "--system", "Be brief.",
                      *sampling, *prompt],
                     ["--model", model, "--file", str(alpaca), "--output", str(tmp / "out.jsonl"), "--batch_size", "2",
                      "--format", "alpaca", "--columns", "{instruction: q, output: a}", "--max_new_tokens", "2"],
                     ["--model", model, "--file", str(chats), "--roles", "{bot: assistant}", "--max_new_tokens", "2"]],
        "chat": [["--model", model, "--system", "Be brief.", *sampling, *prompt]],
        "evaluate": [[TINY, "--model", model, "--baseline", "tiny:gpt2", "--max_rows", "2", "--max_new_tokens", "2",
                      "--batch_size", "2", "--examples", "1", "--output_dir", str(tmp / "eval")],
                     [TINY, "--model", model, "--max_rows", "1", "--max_new_tokens", "1", "--output", str(tmp / "e2")]],
        "merge": [[adapter, "--output", str(tmp / "merged"), "--base", "tiny:gpt2", "--dtype", "float32"]],
        "inspect": [[TINY, "-n", "1", "--export", str(tmp / "rows_out.jsonl"), "--max_steps", "3"]],
        "sources": [[str(alpaca), "--format", "alpaca", "--columns", "{instruction: q, output: a}", "--num-proc", "1",
                     "--strict"],
                    [str(chats), "--roles", "{bot: assistant}", "--dedup", "near", "--dedup-threshold", "0.8",
                     "--chat-template", "chatml", "--tokenizer", "tiny:gpt2", "--max-length", "256"]],
        "report": [[model, "--output", str(tmp / "loss.png")]],
        "tiny": [["--write-data"]],
    }


def test_every_flag_of_every_command_is_used_or_refused(recorded, tiny_trained, tiny_lora, tmp_path, monkeypatch,
                                                        capsys):
    """Each command runs with every one of its options given; each option given must be read after parsing.
    (`run` hands its keys to TRL's dataclasses; the keys TRL would not read are refused: test_bad_recipes.)"""
    import importlib

    from sft_recipes import tiny

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(tiny, "DATA_FILE", tmp_path / "tasks.json")  # not the shipped files
    monkeypatch.setattr(tiny, "CHATS_FILE", tmp_path / "chats.jsonl")
    monkeypatch.setattr(tiny, "TOOLS_FILE", tmp_path / "tools.jsonl")
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))  # chat: end of input at once
    unread = []
    for name, runs in _scenarios(tmp_path, str(tiny_trained), str(tiny_lora[1])).items():
        main = importlib.import_module(f"sft_recipes.{name}").main
        covered, options = set(), set()
        for argv in runs:
            recorded.clear()
            main(argv)
            parser, namespace = recorded[0]
            options = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
            given = _given(parser, argv)
            covered |= set(given)
            unread += [f"{name} {flag}" for dest, flag in given.items() if dest not in Reads.reads[id(namespace)]]
        assert covered == options, f"{name}: no scenario gives {options - covered}"
    capsys.readouterr()
    assert not unread, f"given but never read: {unread}"


# ---------------------------------------------------------------- refused, in one line
@pytest.mark.parametrize("argv, fragments", [
    (["generate", "--model", "x", "--prompt", "Hi", "--output", "out.jsonl"], ["--output goes with --file"]),
    (["generate", "--model", "x", "--prompt", "Hi", "--format", "alpaca"], ["--format goes with --file"]),
    (["evaluate", TINY, "--learning_rate", "1"], ["--learning_rate: evaluate does not use it"]),
    (["evaluate", TINY, "--chat_template", "chatml"], ["--chat_template: evaluate does not use it"]),
    (["evaluate", TINY, "--max_row", "3"], ["did you mean --max_rows?"]),
])
def test_flags_a_command_would_ignore_are_refused(argv, fragments):
    line = error_line(command(*argv))
    for fragment in fragments:
        assert fragment in line
