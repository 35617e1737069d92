"""The 9 shipped templates on reasoning and structured tool calls.

Every assistant turn prints `<think>\\n{reasoning}\\n</think>\\n\\n` (when it has reasoning), then its
content, then its tool calls in the format's own syntax, then the end of turn, all inside its one
`{% generation %}` block. Checked here on every template, with plain Jinja
(`sft_recipes.templates`) and with `transformers`' `apply_chat_template`:
- both prefix properties at every assistant turn (what training and inference need to agree on);
- each trained span splits exactly into lead, reasoning, content, calls that parse back into the
  data's calls, and the end of turn; tool results never lie inside a span;
- render parity with `apply_chat_template`; span edges fall on token edges (GPT-2, and the shared
  Qwen3 / Llama 3 / Phi-3 tokenizers for chatml / llama3 / phi3);
- conversations without reasoning or tools render byte for byte as before this change.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from functools import lru_cache

import pytest

from conftest import shared_file
from sft_recipes import templates

TEMPLATES = templates.template_names()
EOS = "<|endoftext|>"  # GPT-2's BOS and EOS, passed to the plain renders too
SPECIALS = {"bos_token": EOS, "eos_token": EOS}

# What each generation block prints around the reasoning, content and calls.
LEAD = {"llama2": " ", "mistral": " ", "vicuna": " "}
TAIL = {"llama2": " " + EOS}
CALL_KEY = {"llama3": "parameters"}  # Llama 3.1's JSON call form; "arguments" elsewhere
NAMES_TOOL_RESULTS = {"alpaca", "chatml", "gemma", "llama2", "mistral", "vicuna"}  # others: no place


def test_all_nine_are_covered():
    assert TEMPLATES == ["alpaca", "chatml", "gemma", "llama2", "llama3", "mistral", "phi3", "vicuna", "zephyr"]


@lru_cache(maxsize=None)
def source_of(name):
    return templates.load_template(name, None)


class _Eos:
    eos_token = EOS


def end_of_turn(name):
    return templates.template_meta(source_of(name), _Eos)["end_of_turn"]


def tail_of(name):
    return TAIL.get(name, end_of_turn(name))


@lru_cache(maxsize=None)
def tokenizer(name):
    """The real GPT-2 tokenizer with the template set and its declared special tokens added."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(shared_file("gpt2-tokenizer")))
    meta = templates.template_meta(source_of(name), tok)
    tok.add_special_tokens({"additional_special_tokens": meta["special_tokens"]}, replace_extra_special_tokens=False)
    tok.chat_template = source_of(name)
    return tok


# ---------------------------------------------------------------- conversations in the message contract
def call(name, arguments, id=None):
    c = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {**c, "id": id} if id else c


def tool(name, description, **properties):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in properties.items()}}}}


TOOLS = [tool("get_weather", "Current weather in a city", city="string", unit="string"),
         tool("convert", "Convert an amount", amount="number", to="string")]

CONVERSATIONS = {
    "reasoning_multi_turn": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 17 * 3?"},
        {"role": "assistant", "content": "51.", "reasoning_content": "17 * 3 = 51.\nCheck: 50 + 1."},
        {"role": "user", "content": "And halved?"},
        {"role": "assistant", "content": "  25.5.\n"},  # no reasoning in between; spaces kept verbatim
        {"role": "user", "content": "Round it."},
        {"role": "assistant", "content": "26.", "reasoning_content": "\n25.5 rounds half up to 26.\n"},
    ], None),
    "one_call": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I need the weather tool.",
         "tool_calls": [call("get_weather", {"city": "Paris"}, id="call_1")]},
        {"role": "tool", "content": '{"temperature": 21, "sky": "clear"}', "name": "get_weather",
         "tool_call_id": "call_1"},
        {"role": "assistant", "content": "21 °C and clear."},
    ], TOOLS),
    "several_calls": ([
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Köln in fahrenheit, and 10 EUR in USD?"},
        {"role": "assistant", "content": "Let me look both up.", "tool_calls": [
            call("get_weather", {"city": "Köln", "unit": "F"}),
            call("convert", {"amount": 10.5, "to": "USD", "options": {"round": True, "via": None},
                             "note": 'say "hi"\nthen go'})]},
        {"role": "tool", "content": "45 F, rain", "name": "get_weather"},
        {"role": "tool", "content": "11.4 USD"},  # a result whose name is unknown
        {"role": "assistant", "content": "45 °F with rain; 10.50 EUR is 11.40 USD.",
         "reasoning_content": "Both results are in."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ], TOOLS),
    "call_without_tool_list": ([
        {"role": "user", "content": "Convert 3 to EUR."},
        {"role": "assistant", "content": "", "tool_calls": [call("convert", {"amount": 3, "to": "EUR"})]},
        {"role": "tool", "content": "2.76 EUR"},
        {"role": "assistant", "content": "2.76 EUR."},
    ], None),
    "call_then_text_in_two_turns": ([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "assistant", "content": "I asked the weather service."},
    ], TOOLS),
    "tools_without_calls": ([
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "A greeting; no tool needed."},
    ], TOOLS),
}


# ---------------------------------------------------------------- the checks
def render(name, messages, tools=None, **kw):
    return templates.render(source_of(name), messages, tools, **SPECIALS, **kw)


def calls_of(message):
    return [c["function"] for c in message.get("tool_calls") or []]


def parse_calls(name, text):
    """The calls printed after the content, read back the way each format is documented."""
    if not text:
        return []
    key = CALL_KEY.get(name, "arguments")
    if name == "chatml":
        blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.S)
        assert "".join(f"\n<tool_call>\n{b}\n</tool_call>" for b in blocks) == "\n" + text.lstrip("\n")
        found = [json.loads(b) for b in blocks]
    elif name == "mistral":
        assert text.startswith("[TOOL_CALLS] ["), text
        found = json.loads(text[len("[TOOL_CALLS] "):])
    else:  # one JSON object per line
        found = [json.loads(line) for line in text.lstrip("\n").split("\n")]
    assert all(list(f) == ["name", key] for f in found), found
    return [{"name": f["name"], "arguments": f[key]} for f in found]


def check_span(name, span, message):
    """A trained span is exactly lead + <think> block + content + calls + end of turn."""
    lead, tail = LEAD.get(name, ""), tail_of(name)
    assert span.startswith(lead) and span.endswith(tail), span
    assert span.endswith(end_of_turn(name))
    body = span[len(lead):len(span) - len(tail)]
    reasoning = message.get("reasoning_content")
    if reasoning:
        think = f"<think>\n{reasoning}\n</think>\n\n"
        assert body.startswith(think), body
        body = body[len(think):]
    content = message["content"]
    assert body.startswith(content), body
    rest = body[len(content):]
    calls = calls_of(message)
    if calls and content and name != "mistral":
        assert rest.startswith("\n")  # content first, the calls on the next line
    assert parse_calls(name, rest) == calls
    for c in calls:  # what the masking verifier looks for inside the span
        assert c["name"] in span
        for value in c["arguments"].values():
            assert json.dumps(value, ensure_ascii=False) in span


def check_conversation(name, messages, tools):
    text, spans = templates.render_with_spans(source_of(name), messages, tools, **SPECIALS)
    assert text == render(name, messages, tools)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(spans) == len(assistant)
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            # both prefix properties, the ones that let training render what inference renders
            before = render(name, messages[:i], tools, add_generation_prompt=True)
            upto = render(name, messages[:i + 1], tools)
            assert upto.startswith(before), f"{name}: generation prompt before message {i} is not a prefix"
            assert text.startswith(upto.rstrip()), f"{name}: render up to message {i} is not a prefix"
            start, end = spans[assistant.index(i)]
            assert (start, end) == (len(before), len(upto.rstrip()))  # the block is the whole turn
            check_span(name, text[start:end], m)
            cursor = end
        elif m["role"] == "tool":  # tool results lie outside every span
            at = text.index(m["content"], cursor)
            assert not any(s < at + len(m["content"]) and at < e for s, e in spans), f"{name}: tool result trained"
            cursor = at + len(m["content"])
    return text, spans


def check_tokens(name, text, spans):
    """Each span starts and ends on a token edge: no BPE merge joins a turn to its prompt."""
    edges = {e for s, e in tokenizer(name)(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}
    for s, e in spans:
        assert s in edges | {0} and e in edges, (name, text[max(0, s - 10):s], text[s:s + 10])


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_reasoning_and_calls_are_trained_in_each_format(name, conversation):
    messages, tools = CONVERSATIONS[conversation]
    text, spans = check_conversation(name, messages, tools)
    tok = tokenizer(name)
    assert tok.apply_chat_template(messages, tools=tools, tokenize=False) == text  # render parity
    check_tokens(name, text, spans)


@pytest.mark.parametrize("name", TEMPLATES)
def test_tool_list_and_results_print_as_documented(name):
    messages, tools = CONVERSATIONS["one_call"]
    text = render(name, messages, tools)
    for t in tools:
        assert json.dumps(t, ensure_ascii=False) in text  # each tool as `tool | tojson`
    assert json.dumps(TOOLS[0]["function"], ensure_ascii=False) not in render(name, messages, None)
    unnamed = [{k: v for k, v in m.items() if k not in ("name", "tool_call_id")} for m in messages]
    text_unnamed = render(name, unnamed, tools)
    if name in NAMES_TOOL_RESULTS:
        result = text[len(render(name, messages[:2], tools)):len(render(name, messages[:3], tools))]
        assert "get_weather" in result and messages[2]["content"] in result, result
        result = text_unnamed[len(render(name, unnamed[:2], tools)):len(render(name, unnamed[:3], tools))]
        assert "get_weather" not in result and messages[2]["content"] in result, result
    else:
        assert text_unnamed == text  # llama3's ipython role, phi3's and zephyr's <|tool|> have no place


@pytest.mark.parametrize("name", TEMPLATES)
def test_variants_of_the_contract_print_like_canonical_rows(name):
    """Arguments already a JSON string print as they are; a call without the `function` wrapper
    prints like one with it (both as Qwen's own templates accept them). The reasoning's copies
    under `thinking` and `reasoning`, and recipe kwargs such as `enable_thinking`, change nothing."""
    messages, tools = CONVERSATIONS["one_call"]
    canonical = render(name, messages, tools)
    loose = copy.deepcopy(messages)
    loose[1]["tool_calls"] = [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert render(name, loose, tools) == canonical
    copies = copy.deepcopy(messages)
    copies[1].update(thinking=copies[1]["reasoning_content"], reasoning=copies[1]["reasoning_content"])
    assert render(name, copies, tools, enable_thinking=False) == canonical
    assert canonical.count(messages[1]["reasoning_content"]) == 1


@pytest.mark.parametrize("name", TEMPLATES)
def test_think_tags_stay_plain_text(name):
    """Adding <think> or tool markers to `special_tokens:` would resize every model's embeddings;
    each declared token is one the template really prints."""
    declared = templates.template_meta(source_of(name), _Eos)["special_tokens"]
    assert not {"<think>", "</think>", "<tool_call>", "</tool_call>", "[TOOL_CALLS]"} & set(declared)
    printed = "".join(render(name, m, t) for m, t in CONVERSATIONS.values())
    assert all(token in printed for token in declared), name


def test_chatml_prints_tools_and_calls_as_qwen2_5_does():
    """Same system prompt, tools block and call turn as Qwen2.5's released template (installed with TRL)."""
    import trl
    from pathlib import Path
    qwen = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    messages, tools = CONVERSATIONS["several_calls"]
    first = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages[:3]]
    assert render("chatml", first, tools) == templates.render(qwen, first, tools, **SPECIALS)


# ---------------------------------------------------------------- real rows
def tool_calls_reasoning_rows():
    with open(shared_file("reasoning/tool_calls_reasoning.jsonl")) as f:
        return [json.loads(line) for line in f]


def glaive_rows():
    """glaive_toolcall_en_demo.json converted by hand to the message contract: a function_call turn
    becomes an assistant turn with content "" and tool_calls, an observation a tool message named
    after the call it answers; tools are wrapped in the OpenAI shape."""
    with open(shared_file("glaive_toolcall_en_demo.json")) as f:
        data = json.load(f)
    rows = []
    for row in data:
        messages, pending = [], []
        for turn in row["conversations"]:
            role, value = turn["from"], turn["value"]
            if role == "function_call":
                parsed = json.loads(value)
                parsed = parsed if isinstance(parsed, list) else [parsed]
                messages.append({"role": "assistant", "content": "",
                                 "tool_calls": [call(p["name"], p["arguments"]) for p in parsed]})
                pending = [p["name"] for p in parsed]
            elif role == "observation":
                messages.append({"role": "tool", "content": value, **({"name": pending.pop(0)} if pending else {})})
            else:
                messages.append({"role": {"human": "user", "gpt": "assistant"}[role], "content": value})
        schemas = json.loads(row["tools"]) if row["tools"] else []
        rows.append((messages, [{"type": "function", "function": s} for s in schemas] or None))
    return rows


@pytest.fixture(scope="module")
def real_rows():
    rows = [(r["messages"], r.get("tools")) for r in tool_calls_reasoning_rows()] + glaive_rows()
    assert sum(bool(m.get("tool_calls")) for ms, _ in rows for m in ms) > 250
    assert sum(bool(m.get("reasoning_content")) for ms, _ in rows for m in ms) > 40
    return rows


@pytest.mark.parametrize("name", TEMPLATES)
def test_real_tool_rows(name, real_rows):
    """Every row of the two shared tool-calling datasets: prefixes, spans, calls read back, results
    untrained, and parity with apply_chat_template (every 10th row; one call renders one row)."""
    tok = tokenizer(name)
    for k, (messages, tools) in enumerate(real_rows):
        text, spans = check_conversation(name, messages, tools)
        if k % 10 == 0:
            assert tok.apply_chat_template(messages, tools=tools, tokenize=False) == text
            check_tokens(name, text, spans)



@pytest.mark.parametrize("name, model", [("chatml", "qwen3"), ("llama3", "llama3"), ("phi3", "phi3")])
def test_real_tool_rows_on_the_models_own_tokenizer(name, model, real_rows):
    """On the tokenizer of a model that uses the format (its missing template tokens added), every
    span of every real row starts and ends on a token edge, and apply_chat_template agrees."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(shared_file(f"tokenizers/{model}")))
    meta = templates.template_meta(source_of(name), tok)
    tok.add_special_tokens({"additional_special_tokens": [t for t in meta["special_tokens"] if t not in tok.get_vocab()]},
                           replace_extra_special_tokens=False)
    tok.chat_template = source_of(name)
    specials = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    for k, (messages, tools) in enumerate(real_rows):
        text, spans = templates.render_with_spans(source_of(name), messages, tools, **specials)
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        starts, ends = {s for s, _ in offsets}, {e for _, e in offsets}
        assert all(s in starts and e in ends for s, e in spans), (k, [text[s - 5:s + 5] for s, _ in spans])
        if k % 20 == 0:
            assert tok.apply_chat_template(messages, tools=tools, tokenize=False) == text

# ---------------------------------------------------------------- rows without reasoning or tools: unchanged
# Rendered by the templates on main before this change (commit f04c7be), with bos "<s>", eos "</s>".
BEFORE = {
    "alpaca": "You are terse.\n\n### Instruction:\nTranslate.\n\n### Input:\nGood morning.\n\n### Response:\n"
              "Bonjour.</s>\n\n### Instruction:\nAnother?\n\n### Response:\nSalut,\nami.</s>",
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nTranslate.\n\nGood morning.<|im_end|>\n"
              "<|im_start|>assistant\nBonjour.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n"
              "<|im_start|>assistant\nSalut,\nami.<|im_end|>\n",
    "gemma": "<bos><start_of_turn>user\nYou are terse.\n\nTranslate.\n\nGood morning.<end_of_turn>\n"
             "<start_of_turn>model\nBonjour.<end_of_turn>\n<start_of_turn>user\nAnother?<end_of_turn>\n"
             "<start_of_turn>model\nSalut,\nami.<end_of_turn>\n",
    "llama2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nTranslate.\n\nGood morning. [/INST] Bonjour. </s>"
              "<s>[INST] Another? [/INST] Salut,\nami. </s>",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nTranslate.\n\nGood morning.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nBonjour.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nSalut,\nami.<|eot_id|>",
    "mistral": "<s>[INST] You are terse.\n\nTranslate.\n\nGood morning. [/INST] Bonjour.</s>"
               "[INST] Another? [/INST] Salut,\nami.</s>",
    "phi3": "<|system|>\nYou are terse.<|end|>\n<|user|>\nTranslate.\n\nGood morning.<|end|>\n"
            "<|assistant|>\nBonjour.<|end|>\n<|user|>\nAnother?<|end|>\n<|assistant|>\nSalut,\nami.<|end|>\n",
    "vicuna": "You are terse. USER: Translate.\n\nGood morning. ASSISTANT: Bonjour.</s>USER: Another? "
              "ASSISTANT: Salut,\nami.</s>",
    "zephyr": "<|system|>\nYou are terse.</s>\n<|user|>\nTranslate.\n\nGood morning.</s>\n"
              "<|assistant|>\nBonjour.</s>\n<|user|>\nAnother?</s>\n<|assistant|>\nSalut,\nami.</s>\n",
}
# The first 16 hex digits of the sha256 of the first 40 rows of alpaca_en_demo.json, each rendered
# on its own (user, with `input` when the row has one; assistant) and joined with "\x1e", on main.
BEFORE_ALPACA_DEMO = {
    "alpaca": "5f41021ce4aa4d14", "chatml": "4b2f77dcac3fe938", "gemma": "9d48b5638616ac82",
    "llama2": "f3c68d0992f32c8b", "llama3": "5704fa7e1be00221", "mistral": "79ef72bb4e527ddf",
    "phi3": "e77a0770b57032d8", "vicuna": "c947841898fb2b82", "zephyr": "f2dca99d98630cb5",
}
PLAIN = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Translate.\n\nGood morning.", "input": "Good morning."},
         {"role": "assistant", "content": "Bonjour."},
         {"role": "user", "content": "Another?"},
         {"role": "assistant", "content": "Salut,\nami."}]


@pytest.mark.parametrize("name", TEMPLATES)
def test_rows_without_reasoning_or_tools_render_as_before(name):
    """Existing users' data must not change: system, Alpaca input, multi-turn, generation prompt."""
    plain = {"bos_token": "<s>", "eos_token": "</s>"}
    source, whole = source_of(name), BEFORE[name]
    assert templates.render(source, PLAIN, **plain) == whole
    prompt = whole[:whole.index("Salut,") - len(LEAD.get(name, ""))]  # up to the last turn's generation block
    assert templates.render(source, PLAIN[:4], add_generation_prompt=True, **plain) == prompt
    with open(shared_file("alpaca_en_demo.json")) as f:
        rows = json.load(f)[:40]
    rendered = []
    for r in rows:
        user = {"role": "user", "content": r["instruction"]}
        if r["input"]:
            user = {**user, "content": r["instruction"] + "\n\n" + r["input"], "input": r["input"]}
        rendered.append(templates.render(source, [user, {"role": "assistant", "content": r["output"]}], **plain))
    assert hashlib.sha256("\x1e".join(rendered).encode()).hexdigest()[:16] == BEFORE_ALPACA_DEMO[name]
