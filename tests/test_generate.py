"""Generation and chat as users meet them: the prompt is the training format up to the response, the
output is the response alone and ends at the end-of-turn token, files in, rows + responses out, and a
chat driven through stdin."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LogitsProcessor, LogitsProcessorList

from sft_recipes import chat, formats, generate, masking, models, templates

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": "Reverse the word.", "input": "lemon", "output": "nomel", "system": None},
        {"instruction": "Name the capital of the country: France.", "input": "", "output": "Paris", "system": None},
        {"instruction": "Convert to uppercase.", "input": "plum", "output": "PLUM", "system": "Be exact."}]


@pytest.fixture(scope="module")
def loaded(tiny_trained):
    model, tokenizer = models.load_trained(str(tiny_trained))
    tokenizer.end_of_turn = templates.template_meta(tokenizer.chat_template, tokenizer)["end_of_turn"]
    return model, tokenizer


def training_rows(tokenizer):
    """The rows exactly as training tokenizes them (converter, template, masking)."""
    canonical = formats.convert(Dataset.from_list(ROWS), "alpaca", source="test")
    opts = masking.MaskOptions(template=tokenizer.chat_template, end_of_turn=tokenizer.end_of_turn)
    return masking.tokenize(canonical, tokenizer, opts)


def test_prompt_is_the_training_format_up_to_the_response(loaded):
    _, tokenizer = loaded
    for raw, row in zip(ROWS, training_rows(tokenizer)):
        assert row["drop"] is None
        text = tokenizer.decode(row["input_ids"])
        cut = text.index("### Response:\n") + len("### Response:\n")
        messages = generate.alpaca_messages(raw["instruction"], raw["input"], raw["system"])
        prompt = generate.prompt_text(tokenizer, messages)
        assert prompt == text[:cut]
        assert ("### Input:\n" in prompt) == bool(raw["input"])
        # Token for token too: what the model sees is a prefix of a training row.
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ids == row["input_ids"][:len(ids)]
        assert row["labels"][len(ids) - 1] == -100 and row["labels"][len(ids)] != -100


def test_batch_prompt_is_the_conversation_minus_its_last_answer(loaded):
    _, tokenizer = loaded
    for raw, row in zip(ROWS, training_rows(tokenizer)):
        prompt = generate.prompt_text(tokenizer, generate.prompt_messages(row["messages"]))
        assert tokenizer.decode(row["input_ids"]) == prompt + raw["output"] + tokenizer.eos_token


class Scripted(LogitsProcessor):
    """Forces each row of the batch to emit a fixed token script (then keeps repeating its last token)."""

    def __init__(self, scripts, start):
        self.scripts, self.start = scripts, start

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, -float("inf"))
        for row, script in enumerate(self.scripts):
            forced[row, script[min(step, len(script) - 1)]] = 0.0
        return forced


def test_output_is_the_response_only_and_stops_at_end_of_turn(loaded):
    model, tokenizer = loaded
    eos = tokenizer.eos_token_id
    assert eos in generate.stop_ids(model, tokenizer)
    word, other = tokenizer.convert_tokens_to_ids(["a", "b"])  # single bytes: in every byte-level vocab
    prompt = generate.prompt_text(tokenizer, generate.alpaca_messages("Reverse the word.", "lemon"))
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # Row 0 ends after one word although row 1 keeps generating: nothing after its EOS may leak out.
    scripts = [[word, eos, other, other], [other, other, other, eos]]
    out = generate.generate(model, tokenizer, [prompt, prompt], temperature=0, max_new_tokens=10,
                            logits_processor=LogitsProcessorList([Scripted(scripts, start)]))
    assert out == ["a", "bbb"]


def test_a_prompt_longer_than_the_context_keeps_its_end(loaded, caplog):
    model, tokenizer = loaded
    long = generate.alpaca_messages("Count the items.", ", ".join(["apple"] * 300))
    eos_only = LogitsProcessorList([Scripted([[tokenizer.eos_token_id]], 0)])
    out = generate.generate(model, tokenizer, [long, long, [{"role": "user", "content": "Hi"}]], temperature=0,
                            max_new_tokens=412, logits_processor=eos_only, batch_size=1)
    assert out == ["", "", ""]
    cuts = [r.getMessage() for r in caplog.records if "start was cut" in r.getMessage()]
    assert cuts == ["2 of 3 prompts are longer than the 100 tokens the context leaves beside max_new_tokens; "
                    "their start was cut"]  # once for the call, not once a batch


def test_response_text_cuts_at_the_first_stop_token(loaded):
    _, tokenizer = loaded
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert generate.response_text(tokenizer, [a, eos, b, pad], {eos}) == "a"
    assert generate.response_text(tokenizer, [a, b], {eos}) == "ab"


def test_trained_model_answers_without_echo(loaded):
    model, tokenizer = loaded
    messages = [generate.alpaca_messages(r["instruction"], r["input"]) for r in ROWS]
    out = generate.generate(model, tokenizer, messages, temperature=0, max_new_tokens=12)
    assert len(out) == 3
    for text in out:
        assert "### Instruction" not in text and tokenizer.eos_token not in text and tokenizer.pad_token not in text
    # Batched with left padding gives what one-by-one gives.
    assert out == [generate.generate(model, tokenizer, [m], temperature=0, max_new_tokens=12)[0] for m in messages]


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, tokenizer = loaded
    messages = [generate.alpaca_messages("Reverse the word.", "lemon")]
    runs = [generate.generate(model, tokenizer, messages, temperature=1.5, top_k=50, max_new_tokens=8, seed=3)
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_cli_prints_only_the_response(tiny_trained, loaded, capsys):
    model, tokenizer = loaded
    generate.main(["--model", str(tiny_trained), "--prompt", "Reverse the word.", "--input", "lemon",
                   "--temperature", "0", "--max_new_tokens", "8"])
    expected = generate.generate(model, tokenizer, [generate.alpaca_messages("Reverse the word.", "lemon")],
                                 temperature=0, max_new_tokens=8)[0]
    assert capsys.readouterr().out == expected + "\n"


@pytest.fixture
def mute_model(tiny_trained, tmp_path):
    """The trained model, its generation config suppressing every token but the end of turn: it ends each turn
    at once, as an undertrained model can."""
    import shutil

    folder = shutil.copytree(tiny_trained, tmp_path / "mute")
    model, tokenizer = models.load_trained(str(folder))
    stops = set(models.stop_ids(model, tokenizer))
    model.generation_config.suppress_tokens = [i for i in range(model.config.vocab_size) if i not in stops]
    model.generation_config.save_pretrained(folder)
    return folder


def test_an_empty_reply_is_said_not_a_blank_line(mute_model, tmp_path, capsys, caplog):
    generate.main(["--model", str(mute_model), "--prompt", "Reverse the word.", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert out == "\n" and "note: the model's reply is empty: it ended its turn at once" in err
    (tmp_path / "in.jsonl").write_text(json.dumps({"instruction": "Say hi.", "output": "Hi"}) + "\n")
    generate.main(["--model", str(mute_model), "--file", str(tmp_path / "in.jsonl"), "--temperature", "0",
                   "--output", str(tmp_path / "out.jsonl")])
    assert "1 of 1 responses are empty" in caplog.text
    assert json.loads((tmp_path / "out.jsonl").read_text())["response"] == ""
    session = chat.Chat(*models.load_trained(str(mute_model)), temperature=0, max_new_tokens=4)
    assert chat.handle(session, "Reverse the word: lemon.")
    assert capsys.readouterr().out.endswith("assistant: \n(the model's reply is empty: it ended its turn at once)\n")


def test_file_mode_writes_each_row_with_its_response(tiny_trained, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"instruction": "Reverse the word.", "input": "lemon", "output": "nomel"},
            {"instruction": "Convert to uppercase: plum."},  # no answer: all prompt
            {"instruction": "What is the opposite of the word?", "input": "hot", "id": 7}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate.main(["--model", str(tiny_trained), "--file", str(src), "--output", str(out),
                   "--temperature", "0", "--max_new_tokens", "6", "--batch_size", "2"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3
    for row, got in zip(rows, written):
        assert {k: v for k, v in got.items() if k != "response"} == row
        assert isinstance(got["response"], str)


def test_file_mode_reads_chat_formats(tiny_trained, loaded, tmp_path):
    model, tokenizer = loaded
    src, out = tmp_path / "in.json", tmp_path / "out.jsonl"
    conversation = [{"role": "user", "content": "Give the plural of the word: cat."},
                    {"role": "assistant", "content": "cats"},
                    {"role": "user", "content": "Give the plural of the word: dog."},
                    {"role": "assistant", "content": "dogs"}]
    src.write_text(json.dumps([{"messages": conversation}]))
    generate.main(["--model", str(tiny_trained), "--file", str(src), "--output", str(out),
                   "--temperature", "0", "--max_new_tokens", "6"])
    got = json.loads(out.read_text())
    prompt = [{**m, "input": None, "train": None} for m in conversation[:-1]]
    assert got["response"] == generate.generate(model, tokenizer, [prompt], temperature=0, max_new_tokens=6)[0]


def test_user_mistakes_are_one_line(tiny_trained, tmp_path, capsys):
    bad = tmp_path / "bad_row.jsonl"  # every input row gets an output row, so one that cannot be read stops
    bad.write_text('{"instruction": "Say hi."}\n{"instruction": ["Say", "bye."]}\n')
    for argv, fragment in ((["--prompt", " "], "--prompt is empty"),
                           (["--file", str(bad)], "record 1, field 'instruction': expected a string"),
                           (["--file", str(tmp_path / "missing.jsonl")], "file not found"),
                           (["--prompt", "x", "--temperature", "-1"], "temperature"),
                           (["--prompt", "x", "--max_new_tokens", "600"], "context")):
        with pytest.raises(SystemExit) as e:
            generate.main(["--model", str(tiny_trained), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1


def test_chat_commands_keep_and_reset_history(loaded, capsys):
    model, tokenizer = loaded
    session = chat.Chat(model, tokenizer, temperature=0, max_new_tokens=4)
    assert chat.handle(session, "/system Be exact.")
    assert chat.handle(session, "Reverse the word: lemon.")
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant"]
    assert chat.handle(session, "Name the capital of the country: Peru.")
    assert len(session.history) == 4
    assert chat.handle(session, "/reset") and session.history == [] and session.system == "Be exact."
    assert chat.handle(session, "/system") and session.system is None
    assert not chat.handle(session, "/exit")
    out = capsys.readouterr().out
    assert out.count("assistant: ") == 2 and "(history cleared)" in out


def test_chat_forgets_the_oldest_turns_when_the_context_is_full(loaded):
    model, tokenizer = loaded
    session = chat.Chat(model, tokenizer, system="Be exact.", temperature=0, max_new_tokens=4)
    for k in range(6):
        session.history += [chat._message("user", f"Add the numbers: {k} + {k}."), chat._message("assistant", "0")]
    session.history.append(chat._message("user", "Reverse the word: lemon."))
    session.budget = session._tokens() // 2
    session._fit()
    assert session._tokens() <= session.budget
    assert session.history[-1]["content"] == "Reverse the word: lemon." and session.history[0]["role"] == "user"
    assert session.messages()[0]["role"] == "system"


def run_chat(model_dir, stdin):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "sft_recipes.chat", "--model", str(model_dir), "--temperature", "0",
                           "--max_new_tokens", "6"], input=stdin, capture_output=True, text=True, cwd=ROOT, env=env)


def test_chat_through_stdin(tiny_trained):
    proc = run_chat(tiny_trained, "/system Answer in one word.\nReverse the word: lemon.\n/reset\n"
                                  "Name the capital of the country: Peru.\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "(system prompt set)" in out and "(history cleared)" in out
    assert out.count("assistant: ") == 2
    assert "### " not in out and "<|endoftext|>" not in out


def test_chat_ends_cleanly_at_end_of_input(tiny_trained):
    proc = run_chat(tiny_trained, "Reverse the word: lemon.\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant: ") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- any output folder, as a new user types it
def command(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def one_error(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_a_lora_output_folder_generates_as_its_merged_model(tiny_lora, tmp_path):
    trainer, adapter = tiny_lora
    proc = command("sft_recipes.generate", "--model", str(adapter), "--prompt", "Reverse the word.", "--input", "lemon",
                   "--temperature", "0", "--max_new_tokens", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The adapter is applied exactly as trained: greedy output of the live PEFT model.
    model, tokenizer = models.load_trained(str(adapter))
    live = trainer.model.eval()
    ids = tokenizer(generate.prompt_text(tokenizer, generate.alpaca_messages("Reverse the word.", "lemon")),
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, live(input_ids=ids).logits, rtol=0, atol=1e-4)
    expected = generate.generate(model, tokenizer, [generate.alpaca_messages("Reverse the word.", "lemon")],
                                 temperature=0, max_new_tokens=6)[0]
    assert proc.stdout == expected + "\n"
    assert proc.stderr == ("" if expected else f"note: {generate.EMPTY}\n")  # no warnings, no progress bars


def test_a_lora_output_folder_chats(tiny_lora):
    proc = command("sft_recipes.chat", "--model", str(tiny_lora[1]), "--max_new_tokens", "3",
                   stdin="Reverse the word: lemon.\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("assistant: ") == 1


def test_a_folder_that_is_not_a_model_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    line = one_error(command("sft_recipes.generate", "--model", str(tmp_path), "--prompt", "Hi"))
    assert line == (f"error: {tmp_path}: not a model folder (no config.json or adapter_config.json); give a run's "
                    "output_dir, a checkpoint-* folder in it, or a merged model")


def test_a_typo_in_a_local_model_path_is_not_found_not_a_network_failure():
    # `recipes/` exists here, so `recipes/tiny_alpacca` is a path, though it is shaped like a Hub id `org/name`.
    for path in ("recipes/tiny_alpacca", "./runs/nope"):
        line = one_error(command("sft_recipes.generate", "--model", path, "--prompt", "Hi"))
        assert line == f"error: {path}: model folder not found (relative paths start from {ROOT})"


def test_file_mode_takes_the_options_its_hints_name(tiny_trained, tmp_path):
    """Hints say `format:` and `columns:`; generate --file has --format and --columns."""
    both = tmp_path / "both.jsonl"  # alpaca and instruction at once: ambiguous without --format
    both.write_text(json.dumps({"instruction": "Reverse the word.", "input": "lemon", "output": "x", "response": "y"}) + "\n")
    line = one_error(command("sft_recipes.generate", "--model", str(tiny_trained), "--file", str(both)))
    assert "format:" in line
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text(json.dumps({"question": "Reverse the word: lemon."}) + "\n")
    line = one_error(command("sft_recipes.generate", "--model", str(tiny_trained), "--file", str(theirs)))
    assert "columns:" in line
    out = tmp_path / "out.jsonl"
    for path, options in ((both, ["--format", "alpaca"]), (theirs, ["--columns", "{instruction: question}"])):
        proc = command("sft_recipes.generate", "--model", str(tiny_trained), "--file", str(path), *options,
                       "--output", str(out), "--temperature", "0", "--max_new_tokens", "3")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "response" in json.loads(out.read_text())


# ---------------------------------------------------------------- chat input
def test_chat_joins_continued_lines_and_pasted_blocks():
    lines = iter(["Reverse the word.\\", "lemon", "/paste", "Count the items.", "", "a, b", "/end", "/exit"])
    read = lambda prompt: next(lines, None)  # noqa: E731
    assert chat._turn(read) == "Reverse the word.\nlemon"
    assert chat._turn(read) == "Count the items.\n\na, b"
    assert chat._turn(read) == "/exit" and chat._turn(read) is None


def test_chat_through_stdin_takes_a_multi_line_turn(tiny_trained):
    proc = run_chat(tiny_trained, "/system Be \\\nexact.\n/paste\nReverse the word.\n\nlemon\n/end\n/reset\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant: ") == 1 and "(system prompt set)" in proc.stdout
    assert "unknown command" not in proc.stdout


def test_chat_edits_lines_and_recalls_history_on_a_terminal(tiny_trained):
    """Typed on a real terminal: Left arrows to fix a typo, then Up to bring the line back (readline)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sft_recipes.chat", "--model", str(tiny_trained),
                             "--max_new_tokens", "2"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm"})
    os.close(slave)
    seen = b""

    def until(text: bytes, after: int) -> int:
        """Read the terminal until `text` shows past position `after`; the position just past it. No time limit
        (a slow machine is not a failure): if the chat ends first, reading fails and says what it showed."""
        nonlocal seen
        while (at := seen.find(text, after)) < 0:
            try:
                chunk = os.read(master, 4096)  # blocks until output; raises once the chat's side has closed
            except OSError:
                chunk = b""
            assert chunk, f"the chat ended before {text!r}: {seen[-500:]!r}"
            seen += chunk
        return at + len(text)

    try:
        at = until(b"you: ", 0)  # the model is loaded
        os.write(master, b"/sytem Be exact." + b"\x1b[D" * 13 + b"s\r")  # Left x13, then fix /sytem -> /system
        at = until(b"you: ", until(b"(system prompt set)", at))
        os.write(master, b"\x1b[A\r")  # Up: the same line again
        at = until(b"you: ", until(b"(system prompt set)", at))
        os.write(master, b"\x04")  # Ctrl-D: end of input
        assert proc.wait() == 0
    finally:
        proc.kill()
        os.close(master)
    text = seen.decode(errors="replace")
    assert text.count("(system prompt set)") == 2 and "unknown command" not in text
