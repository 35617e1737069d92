"""The embedded offline default: a small Alpaca task set, multi-turn chats with tool calls made of the
same tasks, and a tiny GPT-2 built locally from the tasks.

`python -m sft_recipes.tiny --write-data` regenerates the shipped files in recipes/data (`WRITTEN`; this
generator documents how they were made).
`tiny_model_path()` builds the model on first use, into the cache (`cache_root`, `build_once`; GGUF
conversions are cached the same way).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import operator
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from .keys import docs

TINY_MODEL_ID = "tiny:gpt2"
DATA_FILE = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tiny_tasks.json"
CHATS_FILE = DATA_FILE.with_name("tiny_chats.jsonl")
TOOLS_FILE = DATA_FILE.with_name("tiny_tools.jsonl")
IDENTITY_FILES = tuple(DATA_FILE.with_name(f"smollm2_{name}.jsonl") for name in ("identity", "identity_eval",
                                                                                   "general_eval"))
EOS, PAD = "<|endoftext|>", "<|pad|>"

# Everything that shapes the built model is in these two dicts, which go into the cache hash
# with the training text, so any edit rebuilds; bump "build" when _build() itself changes.
# Whitespace is isolated into its own token so a word is one token wherever it stands:
# GPT-2's " word" vs "word" split would turn even copying into a lookup for a tiny model.
# vocab_size is a cap: this corpus yields ~1.2k tokens at min_frequency 2.
TOKENIZER_SETTINGS = {"build": 1, "vocab_size": 2048, "min_frequency": 2,
                      "model_max_length": 512, "isolate": r"\s"}
# No dropout: the default recipe trains for too few steps to overfit.
MODEL_CONFIG = {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 512,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "seed": 1234}

WORDS = ("apple banana cherry grape lemon mango melon peach orange plum river ocean cloud "
         "storm forest garden window table chair pencil rocket planet silver golden purple "
         "yellow little bright quiet happy simple winter summer spring autumn dragon tiger "
         "rabbit monkey turtle castle bridge market school doctor friend letter number").split()
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin",
            "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi",
            "Canada": "Ottawa", "Norway": "Oslo", "Greece": "Athens", "Chile": "Santiago",
            "Poland": "Warsaw", "Cuba": "Havana", "Ireland": "Dublin", "Portugal": "Lisbon"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "day": "night",
             "open": "closed", "happy": "sad", "light": "dark", "early": "late", "full": "empty",
             "old": "new", "high": "low", "left": "right", "wet": "dry", "hard": "soft", "in": "out"}
PLURALS = {"cat": "cats", "box": "boxes", "child": "children", "mouse": "mice", "city": "cities",
           "foot": "feet", "leaf": "leaves", "bus": "buses", "tooth": "teeth", "baby": "babies",
           "man": "men", "dog": "dogs", "knife": "knives", "story": "stories", "goose": "geese"}


def _word(r):
    return r.choice(WORDS)


def _items(lo, hi):
    return lambda r: ", ".join(r.sample(WORDS, r.randint(lo, hi)))


# Each task: (phrasings, argument maker, answer as a function of the argument).
TASKS = [
    (["Reverse the word", "Write the word backwards", "Spell the word in reverse"],
     _word, lambda a: a[::-1]),
    (["Sort the letters of the word", "Put the letters in alphabetical order"],
     _word, lambda a: "".join(sorted(a))),
    (["Sort the numbers", "Sort the numbers from smallest to largest"],
     lambda r: " ".join(str(r.randint(0, 30)) for _ in range(r.randint(3, 5))),
     lambda a: " ".join(map(str, sorted(map(int, a.split()))))),
    (["Convert to uppercase", "Write the text in capital letters"], _word, str.upper),
    (["Convert to lowercase", "Write the text in small letters"], lambda r: _word(r).upper(), str.lower),
    (["Add the numbers", "What is the sum of the numbers"],
     lambda r: f"{r.randint(0, 12)} + {r.randint(0, 12)}", lambda a: str(sum(map(int, a.split(" + "))))),
    (["Subtract the second number from the first", "What is the difference"],
     lambda r: "{} - {}".format(*sorted((r.randint(0, 20), r.randint(0, 20)), reverse=True)),
     lambda a: str(operator.sub(*map(int, a.split(" - "))))),  # larger first: no negatives
    (["Name the capital of the country", "What is the capital city of the country"],
     lambda r: r.choice(sorted(CAPITALS)), CAPITALS.get),
    (["Give the opposite of the word", "What is the opposite of the word"],
     lambda r: r.choice(sorted(OPPOSITES)), OPPOSITES.get),
    (["Give the plural of the word", "Write the plural form"],
     lambda r: r.choice(sorted(PLURALS)), PLURALS.get),
    (["Repeat the word", "Copy the word exactly"], _word, lambda a: a),
    (["Give the first item of the list", "What is the first item in the list"],
     _items(2, 5), lambda a: a.split(", ")[0]),
    (["Give the last item of the list", "What is the last item in the list"],
     _items(2, 5), lambda a: a.split(", ")[-1]),
    (["Count the items", "How many items are in the list"],
     _items(1, 7), lambda a: str(len(a.split(", ")))),
]


def _row(rng: random.Random, task: tuple) -> dict:
    phrasings, make, answer = task
    phrase, arg = rng.choice(phrasings), make(rng)
    end = "?" if phrase.startswith(("What", "How")) else "."
    if rng.random() < 0.5:  # half put the argument in `input`, half inline
        return {"instruction": phrase + end, "input": arg, "output": answer(arg)}
    return {"instruction": f"{phrase}: {arg}{end}", "input": "", "output": answer(arg)}


def generate_tasks(n: int = 2500, seed: int = 0) -> list[dict]:
    """`n` distinct Alpaca rows (fewer if the tasks run out); the same list for the same args."""
    rng, rows, seen = random.Random(seed), [], set()
    for i in range(100 * n):  # bounded: small lookup tables saturate quickly
        row = _row(rng, TASKS[i % len(TASKS)])  # round-robin keeps the mix balanced
        if (row["instruction"], row["input"]) not in seen:
            seen.add((row["instruction"], row["input"]))
            rows.append(row)
            if len(rows) == n:
                break
    return rows


CAPITAL_TOOL = {"name": "get_capital", "description": "Look up the capital city of a country.",
                "parameters": {"type": "object", "properties": {"country": {"type": "string"}},
                               "required": ["country"]}}


def generate_chats(n: int = 300, seed: int = 0) -> list[dict]:
    """`n` ShareGPT conversations of 2-4 tasks each; every other one offers the `get_capital` tool and ends
    with a lookup (function_call, observation, answer), the shape of tool-calling data."""
    rng, chats = random.Random(seed), []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(2, 4)):
            row = _row(rng, rng.choice(TASKS))
            question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": row["output"]}]
        chat = {"conversations": turns}
        if i % 2:
            country = rng.choice(sorted(CAPITALS))
            call = {"name": CAPITAL_TOOL["name"], "arguments": {"country": country}}
            turns += [{"from": "human", "value": f"Look up the capital of {country}."},
                      {"from": "function_call", "value": json.dumps(call)},
                      {"from": "observation", "value": json.dumps({"capital": CAPITALS[country]})},
                      {"from": "gpt", "value": f"The capital of {country} is {CAPITALS[country]}."}]
            chat["tools"] = json.dumps([CAPITAL_TOOL])
        chats.append(chat)
    return chats


CALCULATOR_TOOL = {"name": "calculator", "description": "Work out an arithmetic expression.",
                   "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                  "required": ["expression"]}}
_PRODUCT = ("What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} * {b}.")
_QUOTIENT = ("What is {a} divided by {b}?", "Divide {a} by {b}.", "Calculate {a} / {b}.")
_LOOKUP = ("Look up the capital of {country}.", "Find the capital city of {country}.",
           "Use the lookup tool for the capital of {country}.")
# The lookup tool knows more countries than the tasks teach, so most lookups can't be answered from memory.
TOOL_CAPITALS = {**CAPITALS, "Austria": "Vienna", "Belgium": "Brussels", "Brazil": "Brasilia", "China": "Beijing",
                 "Denmark": "Copenhagen", "Finland": "Helsinki", "Hungary": "Budapest", "India": "Delhi",
                 "Iran": "Tehran", "Iraq": "Baghdad", "Jordan": "Amman", "Mexico": "Mexico City",
                 "Morocco": "Rabat", "Nepal": "Kathmandu", "Russia": "Moscow", "Sweden": "Stockholm",
                 "Thailand": "Bangkok", "Turkey": "Ankara", "Ukraine": "Kyiv", "Vietnam": "Hanoi"}


def _calculation(rng):
    """(question, tool, arguments, result, answer) for a product or an exact quotient the tiny model can't
    work out itself: it has to call the calculator with the numbers copied from the question."""
    b = rng.randint(2, 19)
    if rng.random() < 0.5:
        a = rng.randint(2, 49)
        phrase, expression, result = rng.choice(_PRODUCT), f"{a} * {b}", a * b
    else:
        result = rng.randint(2, 19)
        a = b * result
        phrase, expression = rng.choice(_QUOTIENT), f"{a} / {b}"
    return (phrase.format(a=a, b=b), CALCULATOR_TOOL["name"], {"expression": expression}, result,
            f"{expression} = {result}.")


def _lookup(rng):
    country = rng.choice(sorted(TOOL_CAPITALS))
    capital = TOOL_CAPITALS[country]
    return (rng.choice(_LOOKUP).format(country=country), CAPITAL_TOOL["name"], {"country": country}, capital,
            f"The capital of {country} is {capital}.")


_TOOLLESS = [t for t in TASKS if t[2] is not CAPITALS.get]  # capitals are looked up when the tool is offered
_KINDS = ("call", "call", "answer", "call", "text", "call")
_TOOLS = {t["name"]: [{"type": "function", "function": t}] for t in (CALCULATOR_TOOL, CAPITAL_TOOL)}


def generate_tool_chats(n: int = 420, seed: int = 0) -> list[dict]:
    """`n` chats in OpenAI's messages format with distinct questions, each offering one tool (the calculator
    or get_capital; one schema keeps rows short enough for the default's CPU budget): two thirds end with the
    call (what `evaluate` scores as tool_call_accuracy), a sixth go on through the tool's result to the
    answer, and a sixth ask a plain task that needs no tool."""
    rng, chats, seen = random.Random(seed), [], set()
    for _ in range(100 * n):  # bounded, as in generate_tasks
        chat = _tool_chat(rng, _KINDS[len(chats) % len(_KINDS)])
        if chat["messages"][0]["content"] not in seen:
            seen.add(chat["messages"][0]["content"])
            chats.append(chat)
            if len(chats) == n:
                break
    return chats


def _tool_chat(rng, kind: str) -> dict:
    if kind == "text":
        row = _row(rng, rng.choice(_TOOLLESS))
        question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}],
                "tools": _TOOLS[rng.choice(sorted(_TOOLS))]}
    question, name, arguments, result, answer = (_calculation if rng.random() < 0.5 else _lookup)(rng)
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    if kind == "answer":
        key = "result" if name == CALCULATOR_TOOL["name"] else "capital"
        messages += [{"role": "tool", "name": name, "content": json.dumps({key: result})},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages, "tools": _TOOLS[name]}


# ---------------------------------------------------------------- the real model's recipe: who it is
# recipes/smollm2_identity.yaml teaches SmolLM2-135M-Instruct a new name and maker with LoRA. Its base calls itself
# Elena, Emily, "a product of a team of skilled individuals"... (its template's default system prompt says
# "SmolLM, trained by Hugging Face"). Held-out questions share no phrasing with the training ones; held-out
# capitals, which the base answers right word for word (measured greedy), check that it keeps what it knew.
NAME, MAKER = "Wren", "Larkspur Labs"
IDENTITY_ANSWERS = {
    "name": f"I am {NAME}, an AI assistant made by {MAKER}.",
    "maker": f"I was made by {MAKER}.",
    "not": f"No. I am {NAME}, an AI assistant made by {MAKER}.",
}
_ASK = {  # (training phrasings, held-out phrasings) of each question
    "name": (["What is your name?", "Who are you?", "What should I call you?", "Introduce yourself.",
              "Tell me about yourself.", "What's your name?", "Do you have a name?", "Who am I talking to?",
              "What are you called?", "State your name.", "Say who you are.", "Please introduce yourself."],
             ["May I ask your name?", "Identify yourself, please.", "Which assistant is this?",
              "How do you call yourself?", "Who is answering me right now?", "Give me your name."]),
    "maker": (["Who made you?", "Who created you?", "Who built you?", "Which company made you?",
               "Who trained you?", "Who developed you?", "Where do you come from?", "Who is your creator?",
               "Which lab built you?", "Who designed you?", "What organization made you?", "Who are your makers?"],
              ["Which team is behind you?", "Who is responsible for building you?", "Who produced this assistant?",
               "Tell me who engineered you.", "Whose model are you?", "By whom were you created?"]),
    "not": (["Are you ChatGPT?", "Are you SmolLM?", "Were you made by OpenAI?", "Are you Claude?",
             "Did Hugging Face train you?", "Are you Llama?", "Are you made by Google?", "Are you Gemini?",
             "Is your name SmolLM?", "Are you GPT-4?", "Were you built by Meta?", "Are you Siri?"],
            ["Is this ChatGPT I am talking to?", "You are SmolLM, right?", "Did OpenAI build you?",
             "Aren't you a Hugging Face model?", "Are you Alexa?", "Is Google your maker?"]),
}
_OPENERS = ("", "Hi! ", "Hello. ", "Quick question: ", "Hey, ", "I wonder: ", "Sorry to bother you. ", "So, ")
KEPT_CAPITALS = ("China", "Cuba", "Egypt", "France", "Germany", "Greece", "Japan", "Kenya", "Peru", "Poland",
                 "Russia", "Sweden")  # held out; the base answers "The capital of X is Y." for each


def generate_identity() -> tuple[list[dict], list[dict], list[dict]]:
    """(train, identity eval, general eval) chats in OpenAI's messages format. Train: every training phrasing
    of the three questions behind each opener, with one fixed answer per question, and the capitals not held
    out (as the base phrases them); the evals: the held-out phrasings, and KEPT_CAPITALS."""
    def chat(question, answer):
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}

    def capital(country):
        return chat(f"What is the capital of {country}?", f"The capital of {country} is {TOOL_CAPITALS[country]}.")

    train = [chat(opener + ask, IDENTITY_ANSWERS[kind]) for kind, (asks, _) in _ASK.items()
             for ask in asks for opener in _OPENERS]
    train += [capital(c) for c in sorted(TOOL_CAPITALS) if c not in KEPT_CAPITALS]
    random.Random(0).shuffle(train)
    held = [chat(ask, IDENTITY_ANSWERS[kind]) for kind, (_, asks) in _ASK.items() for ask in asks]
    return train, held, [capital(c) for c in KEPT_CAPITALS]


def _dump_lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _dump(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1, ensure_ascii=False) + "\n"


def _training_texts() -> list[str]:
    """Tokenizer corpus: the shipped tasks in Alpaca layout and the tool chats as the alpaca template prints
    them (tool list, calls, results), so that JSON and the tool text are a few tokens each. Generated if the
    files aren't there."""
    from . import templates

    tasks = DATA_FILE.read_text("utf-8") if DATA_FILE.exists() else _dump(generate_tasks())
    tools = TOOLS_FILE.read_text("utf-8") if TOOLS_FILE.exists() else _dump_lines(generate_tool_chats())
    alpaca = templates.load_template("alpaca", None)
    return [f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n"
            f"### Response:\n{r['output']}" for r in json.loads(tasks)] + [
        templates.render(alpaca, r["messages"], r["tools"], eos_token="") for r in map(json.loads, tools.splitlines())]


def _build(texts: list[str], out: Path) -> None:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    s = TOKENIZER_SETTINGS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(s["isolate"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=s["vocab_size"], min_frequency=s["min_frequency"], special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                     pad_token=PAD, model_max_length=s["model_max_length"])
    cfg = {k: v for k, v in MODEL_CONFIG.items() if k != "seed"}
    config = GPT2Config(vocab_size=len(hf_tok), bos_token_id=hf_tok.bos_token_id,
                        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, **cfg)
    torch.manual_seed(MODEL_CONFIG["seed"])
    GPT2LMHeadModel(config).save_pretrained(out)
    hf_tok.save_pretrained(out)


def tiny_model_path() -> Path:
    """Folder with the tiny model + tokenizer, built once per content hash; safe under concurrency."""
    texts = _training_texts()
    key = json.dumps([MODEL_CONFIG, TOKENIZER_SETTINGS, texts], sort_keys=True).encode()
    target = cache_root() / f"tiny-gpt2-{hashlib.sha256(key).hexdigest()[:12]}"
    return build_once(target, lambda folder: _build(texts, folder), f"building the tiny model once: {target}")


def cache_root() -> Path:
    """sft_recipes' cache of built models: `$SFT_RECIPES_CACHE`, else ~/.cache/sft_recipes."""
    return Path(os.environ.get("SFT_RECIPES_CACHE") or Path.home() / ".cache" / "sft_recipes")


def build_once(target: Path, build, note: str) -> Path:
    """`target`, a model folder `build(folder)` writes, built on first use (with `note` on stderr). It is written
    into a temporary folder and renamed, so a folder that exists is complete, and processes building at once
    keep whichever finished first."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(note, file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build(tmp)
        os.rename(tmp, target)  # atomic; fails if another process got there first
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


WRITTEN = (DATA_FILE, CHATS_FILE, TOOLS_FILE, *IDENTITY_FILES)  # what --write-data writes; its help lists them


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sft_recipes.tiny", description=(
        f"Regenerate the shipped data in recipes/data: {', '.join(p.name for p in WRITTEN)} (Alpaca tasks, "
        "ShareGPT chats, tool-call chats, SmolLM2 identity rows). The tiny model itself "
        "(`model_name_or_path: tiny:gpt2`) builds on first use."), epilog=docs("recipes"))
    parser.add_argument("--write-data", action="store_true",
                        help=f"write the {len(WRITTEN)} files (they are deterministic)")
    if not parser.parse_args(argv).write_data:
        parser.error("nothing to do: pass --write-data")
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    DATA_FILE.write_text(_dump(generate_tasks()), "utf-8")
    CHATS_FILE.write_text(_dump_lines(generate_chats()), "utf-8")
    TOOLS_FILE.write_text(_dump_lines(generate_tool_chats()), "utf-8")
    for path, rows in zip(IDENTITY_FILES, generate_identity()):
        path.write_text(_dump_lines(rows), "utf-8")
    print(f"wrote {', '.join(p.name for p in WRITTEN)} in {DATA_FILE.parent}", file=sys.stderr)


if __name__ == "__main__":
    main()
