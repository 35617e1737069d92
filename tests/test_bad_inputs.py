"""The data checker on bad files: exit code 2, one line naming file, record/line and field, no traceback.

A file that cannot be read, or whose every record is unusable, is the error. A malformed record among good
ones is dropped with that same line as its reason (ROW_CASES); `--strict` makes it the error. Every case
runs the checker's `main()` in this process and as the real command (`python -m sft_recipes.sources ...`)
in a subprocess.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sft_recipes.sources import main

HERE = Path(__file__).resolve().parent
BAD = HERE / "bad_inputs"
ROOT = HERE.parent

CASES = [  # (file in tests/bad_inputs, extra CLI args, fragments the error must contain)
    ("malformed.json", [], ["line 3", "invalid JSON", "Expecting ',' delimiter"]),
    ("malformed_line3.jsonl", [], ["record 2 (line 3)", "invalid JSON"]),
    ("trailing_comma.json", [], ["line 3:", "trailing comma (column 48) before the closing ']'", "remove it"]),
    ("trailing_comma.jsonl", [], ["record 1 (line 2)", "trailing comma (column 45) before the closing '}'"]),
    ("missing_output.json", ["--strict"], ["record 1", "field 'output'", "missing required field"]),
    ("output_not_string.json", ["--strict"], ["record 2", "field 'output'", "expected a string, got a number (42)"]),
    ("unknown_role.json", ["--strict"], ["record 1", "field 'conversations[1].from'", "unknown role 'bot'",
                               "Known roles:", "roles: {bot: assistant}"]),
    ("no_assistant.json", [], ["all 2 records are unusable", "no_assistant_turn"]),
    ("empty_assistant_strict.json", ["--strict"], ["1 of 3 records are unusable", "empty_response",
                                                   "record 1", "turn `strict` off"]),
    ("content_not_string.json", [], ["record 0", "field 'messages[1].content'", "got a number"]),
    ("messages_not_list.json", ["--strict"], ["record 1", "field 'messages'", "expected a list of messages"]),
    ("ambiguous.json", [], ["several formats", "alpaca", "instruction", "format:"]),
    ("no_known_columns.json", [], ["no known data format", "question, answer", "columns:"]),
    ("single_object.json", [], ["no known data format", "[data]"]),
    ("empty.json", [], ["no records"]),
    ("empty.jsonl", [], ["the file is empty"]),
    ("non_utf8.jsonl", [], ["line 2", "not valid UTF-8", "0xe9"]),
    ("non_utf8.json", [], ["line 1", "not valid UTF-8", "0xe9"]),
    ("bad_weight_part.json", [], ["record 0", "field 'messages[1].weight'", "loss weight 0.5",
                                  "Fractional"]),
    ("image_part.json", [], ["record 0", "field 'messages[0].content[1]'", "'image_url'"]),
    ("history_not_pairs.json", [], ["record 0", "field 'history[0]'", "pair"]),
    ("tools_invalid.json", [], ["record 0", "field 'tools'", "not valid JSON"]),
    ("text_not_string.jsonl", ["--strict"], ["record 1", "field 'text'", "expected a string, got a list"]),
    ("notes.txt", [], ["unsupported file type '.txt'"]),
    ("think_unclosed.jsonl", ["--strict"], ["record 1", "field 'messages[1].content'", "<think> is never closed"]),
    ("reasoning_twice.jsonl", [], ["record 0", "field 'messages[1].content'", "both in a field and inside"]),
    ("reasoning_on_user.jsonl", ["--strict"], ["record 2", "field 'messages[0]'", "reasoning on a user message"]),
    ("tool_call_no_name.jsonl", [], ["record 0", "field 'messages[1].tool_calls[0]'", "without a function name"]),
    ("tool_result_without_call.jsonl", ["--strict"], ["record 1", "field 'messages[1]'", "no tool call before it"]),
    ("tools_not_list.json", [], ["record 0", "field 'tools'", "list of function schemas", "Wrap"]),
    ("unknown_tool_strict.jsonl", ["--strict"], ["1 of 2 records are unusable", "unknown_tool", "record 0"]),
    ("missing.json", [], ["file not found"]),  # does not exist, on purpose
    ("missing_output.json", ["--format", "sharegpt"], ["missing required column 'conversations'",
                                                       "instruction, output"]),
    ("ambiguous.json", ["--format", "alpacca"], ["unknown format 'alpacca'", "Did you mean 'alpaca'"]),
]
COMMAND_CASES = CASES  # every case also runs as the real command (the package imports lazily)
# The cases whose one malformed record sits among good ones: without --strict it is dropped, the rest kept.
ROW_CASES = [(file, fragments) for file, args, fragments in CASES if args == ["--strict"]
             and file not in ("empty_assistant_strict.json", "unknown_tool_strict.jsonl")]


def case_id(case):
    file, args, _ = case
    return " ".join([file, *args])


def check(returncode, stderr, file, fragments):
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, stderr
    missing = [f for f in [file, *fragments] if f not in error[0]]
    assert not missing, f"{missing} not in: {error[0]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_checker_reports_bad_input(case, capsys):
    file, args, fragments = case
    with pytest.raises(SystemExit) as stop:
        main([str(BAD / file), *args])
    check(stop.value.code, capsys.readouterr().err, file, fragments)


@pytest.fixture(scope="module")
def command_results():
    """Run COMMAND_CASES as real commands, two at a time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(case):
        file, args, _ = case
        return subprocess.run([sys.executable, "-m", "sft_recipes.sources",
                               f"tests/bad_inputs/{file}", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(map(case_id, COMMAND_CASES), pool.map(run, COMMAND_CASES)))


@pytest.mark.parametrize("case", COMMAND_CASES, ids=case_id)
def test_command_reports_bad_input(case, command_results):
    file, _, fragments = case
    proc = command_results[case_id(case)]
    check(proc.returncode, proc.stderr, file, fragments)


@pytest.mark.parametrize("file, fragments", ROW_CASES, ids=[c[0] for c in ROW_CASES])
def test_one_malformed_record_is_dropped_with_its_reason(file, fragments, capsys):
    """The rest of the file is kept; the report names the dropped record, its field and what is wrong."""
    main([str(BAD / file)])
    out = capsys.readouterr().out
    total = len(json.loads((BAD / file).read_text())) if file.endswith(".json") else \
        len((BAD / file).read_text().splitlines())
    assert f"kept:    {total - 1} rows" in out and "dropped: 1\n  malformed: 1\n" in out, out
    reason = next(line for line in out.splitlines() if line.startswith("    ") and file in line)
    assert all(f in reason for f in fragments), reason


def test_every_bad_file_has_a_case():
    assert {p.name for p in BAD.iterdir()} == {c[0] for c in CASES} - {"missing.json"}


def test_checker_report_on_good_data(tmp_path, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi!"}\n'
                    '{"instruction": "Say bye.", "output": " "}\n')
    main([str(path)])
    out = capsys.readouterr().out
    for line in ["format:  alpaca (detected)", "kept:    1 rows", "dropped: 1", "empty_response: 1",
                 "roles:   user 1, assistant 1", "first conversation:", "[user]", "Say hi."]:
        assert line in out, out


def test_checker_report_is_not_interrupted_by_progress_bars(tmp_path):
    """Reading and cleaning happen before the report starts: their bars (stderr, on the same terminal) come
    before its first line, none between its lines."""
    path = tmp_path / "dup.jsonl"
    path.write_text('{"instruction": "Say hi.", "output": "Hi!"}\n' * 2 + '{"instruction": "Go.", "output": "Ok"}\n')
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}  # bars as users see them
    text = subprocess.run([sys.executable, "-m", "sft_recipes.sources", str(path)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout  # one screen, both
    assert "Cleaning" in text and "duplicate: 1" in text  # the bars were drawn, and cleaning reported
    report = text[text.index("format:  alpaca"):]
    assert "Cleaning" not in report and "%|" not in report, report


@pytest.mark.parametrize("file, args, hint, option", [
    ("no_known_columns.json", [], "columns:", ["--columns", "{instruction: question, output: answer}"]),
    ("unknown_role.json", ["--strict"], "roles:", ["--roles", "{bot: assistant}"]),
])
def test_the_checker_has_the_options_its_hints_name(file, args, hint, option, command_results):
    """The hint names `columns:` / `roles:`; the checker takes --columns / --roles (YAML or JSON), and with the
    mapping the same file checks clean."""
    assert hint in command_results[case_id((file, args, None))].stderr
    proc = subprocess.run([sys.executable, "-m", "sft_recipes.sources", f"tests/bad_inputs/{file}", *option],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "dropped: 0" in proc.stdout and "roles:   " in proc.stdout


def test_strict_in_the_checker_is_undone_by_turning_it_off(command_results):
    proc = command_results[case_id(("empty_assistant_strict.json", ["--strict"], None))]
    assert "`strict: false`" not in proc.stderr and "turn `strict` off" in proc.stderr
