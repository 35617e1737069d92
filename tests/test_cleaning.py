"""Cleaning (sft_recipes/cleaning.py): a mixture built from the shared data with copies, rewrites and eval
overlaps injected in known numbers, counted exactly; near duplicates found without false positives; any script;
filters; repetition after dedup; the data checker; the same rows with worker processes."""
from __future__ import annotations

import collections
import difflib
import json
import random
import re

import pytest
from conftest import ROOT, shared_file

from sft_recipes import cleaning, load_recipe, sources
from sft_recipes.cleaning import CleanOptions, clean
from sft_recipes.errors import RecipeError

TINY = str(ROOT / "recipes" / "tiny_alpaca.yaml")
OTHER_WORDS = ["banana", "quietly", "seventeen", "orchard", "velvet", "lantern", "gravel", "meadow", "copper"]


def write(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False))
    return str(path)


def normal(record) -> str:
    """The test's own idea of an exact copy: the raw record's JSON, lowercased, whitespace collapsed."""
    return " ".join(json.dumps(record, sort_keys=True, ensure_ascii=False).lower().replace("\\n", " ").split())


def words(record) -> int:
    texts = ([t["value"] for t in record["conversations"] if t["from"] != "observation"] if "conversations" in record
             else [record["instruction"], record["input"], record["output"]])
    return sum(len(re.findall(r"\w+", t)) for t in texts)


def rewrite(text, k, rng):
    """Change k words of four letters or more into other words."""
    pieces = re.split(r"(\b[A-Za-z]{4,}\b)", text)
    for i in rng.sample(range(1, len(pieces), 2), k):
        pieces[i] = rng.choice([w for w in OTHER_WORDS if w != pieces[i].lower()])
    return "".join(pieces)


def reply(record) -> dict:
    """The record's longest assistant text, as a dict holding it under 'value' or 'output'."""
    if "conversations" in record:
        return max((t for t in record["conversations"] if t["from"] == "gpt"), key=lambda t: len(t["value"]))
    return record


def vary(record, i):
    """An exact copy once whitespace and case are normalised."""
    record = json.loads(json.dumps(record))
    turn, key = (reply(record), "value") if "conversations" in record else (record, "output")
    turn[key] = [turn[key].upper(), "  " + turn[key].replace(" ", "\n ") + "\n", turn[key].title()][i % 3]
    return record


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Shared alpaca + glaive rows, and beside them: 20 copies (whitespace and case variants), 60 rewrites
    (2-3 words changed in rows of 150+ words), 15 eval overlaps (10 sharing 13 words with an eval answer, 5
    copies of eval rows) and 5 rows sharing only 12 words; eval rows from instruction-data."""
    tmp, rng = tmp_path_factory.mktemp("cleaning"), random.Random(14)
    out = {"specs": [], "copies": [], "rewrites": [], "natural_duplicates": 0}
    for name, n_copies in (("alpaca_en_demo.json", 12), ("glaive_toolcall_en_demo.json", 8)):
        path = shared_file(name)
        records = json.loads(path.read_text())
        keys = collections.Counter(normal(r) for r in records)
        out["natural_duplicates"] += sum(n - 1 for n in keys.values())
        single = [i for i, r in enumerate(records) if keys[normal(r)] == 1]
        copied = rng.sample(single, n_copies)
        long = rng.sample([i for i in single if words(records[i]) >= 150 and i not in copied], 30)
        rewrites = []
        for j, i in enumerate(long):
            r = json.loads(json.dumps(records[i]))
            turn, key = (reply(r), "value") if "conversations" in r else (r, "output")
            turn[key] = rewrite(turn[key], 2 + j % 2, rng)
            rewrites.append(r)
        stem = name.split("_")[0]
        copies = write(tmp / f"{stem}_copies.json", [vary(records[i], j) for j, i in enumerate(copied)])
        rewritten = write(tmp / f"{stem}_rewrites.json", rewrites)
        out["specs"] += [{"path": str(path)}, {"path": copies}, {"path": rewritten}]
        out["copies"] += [((str(path), i), (copies, j)) for j, i in enumerate(copied)]
        out["rewrites"] += [((str(path), i), (rewritten, j)) for j, i in enumerate(long)]
    evals = [r for r in json.loads(shared_file("instruction-data.json").read_text())]
    long_answers = [r for r in evals if len(re.findall(r"\w+", r["output"])) >= 16][:15]
    short = [r for r in evals if words(r) < 13][:5]
    out["eval"] = write(tmp / "eval.json", long_answers + short)
    overlaps = [{"instruction": f"Summarise note {i}.", "input": "",
                 "output": "In short: " + " ".join(re.findall(r"\w+", r["output"])[:n]) + ". That is all."}
                for i, (r, n) in enumerate(zip(long_answers, [13] * 10 + [12] * 5))]
    overlaps += [{**r, "output": r["output"].upper()} for r in short]  # copies of eval rows: too short for 13-grams
    out["specs"].append({"path": write(tmp / "overlaps.json", overlaps)})
    return out


def _roots(removed):
    def root(row):
        while row in removed and removed[row][0] in ("duplicate", "near_duplicate"):
            row = removed[row][1]
        return row
    return root


def test_exact_and_eval_overlap_counts_are_exact(mixture):
    from sft_recipes.summary import reason_lines, refusal_examples
    from sft_recipes.trainer import load_tokenizer, masked_datasets

    recipe = load_recipe(TINY, eval_split=0, eval_strategy="no", datasets=mixture["specs"],
                         eval_datasets=[{"path": mixture["eval"]}])
    train, _, stats = masked_datasets(recipe, load_tokenizer(recipe))
    copies = mixture["natural_duplicates"] + 20
    assert mixture["natural_duplicates"] == 49  # 14 in alpaca_en_demo, 35 in glaive (the files as shipped)
    assert stats["train"]["cleaned"] == {"eval_overlap": 15, "duplicate": copies}
    loaded = 999 + 300 + 20 + 60 + 20
    assert len(train) == loaded - 15 - copies  # masking refused none of these rows
    kept = set(zip(train["source"], train["record"]))
    assert all((original in kept) != (copy in kept) for original, copy in mixture["copies"])  # one per group
    overlap_file = mixture["specs"][-1]["path"]
    assert {r for s, r in kept if s == overlap_file} == {10, 11, 12, 13, 14}  # 12 shared words are not 13
    examples = stats["train"]["cleaning_examples"]
    assert re.fullmatch(r".*overlaps\.json record \d+: shares '(\w+ ){12}\w+' with eval .*eval\.json record \d+",
                        examples["eval_overlap"][0])
    assert any(re.fullmatch(r".*record \d+: same as .*record \d+", e) for e in examples["duplicate"])
    assert f"train cleaned (rows): eval_overlap: 15, duplicate: {copies}" in reason_lines(stats)
    assert any(line.startswith("  train duplicate: ") for line in refusal_examples(stats))  # summary and inspect


def test_near_finds_the_rewrites_and_no_false_positive(mixture):
    rows = sources.load_mixture(mixture["specs"][:-1], seed=3).rows
    kept, cleaned = clean(rows, None, CleanOptions(dedup="near"))
    assert cleaned.counts["duplicate"] == 69
    where = {(s, r): i for i, (s, r) in enumerate(zip(rows["source"], rows["record"]))}
    root = _roots(cleaned.removed)
    found = [root(where[a]) == root(where[b]) for a, b in mixture["rewrites"]]
    print(f"near duplicates: {sum(found)} of {len(found)} rewrites found; counts {cleaned.counts}")
    assert sum(found) >= 0.95 * len(found)
    rewrite_rows = {where[x] for pair in mixture["rewrites"] for x in pair}
    natural = [(i, head) for i, (reason, head) in cleaned.removed.items()
               if reason == "near_duplicate" and not {i, root(head)} & rewrite_rows]
    text = lambda i: " ".join(t for _, t in cleaning._spoken(rows[int(i)])).lower()  # noqa: E731
    for i, head in natural:  # shared rows grouped with each other: each a true near copy, character by character
        assert difflib.SequenceMatcher(None, text(i), text(head), autojunk=False).ratio() > 0.9, (text(i), text(head))
    assert len(natural) <= 5


def one_edit(record, kind, rng):
    """The record with one word of its answer changed, one letter changed, or one space removed."""
    record = json.loads(json.dumps(record))
    text = record["output"]
    if kind == "space":
        at = rng.choice([m.start() for m in re.finditer(r"(?<=\w) (?=\w)", text)])
        record["output"] = text[:at] + text[at + 1:]
        return record
    word = rng.choice(list(re.finditer(r"[A-Za-z]{4,}", text)))
    w = word.group()
    new = rng.choice([x for x in OTHER_WORDS if x != w.lower()]) if kind == "word" else w[:2] + "q" + w[3:]
    record["output"] = text[:word.start()] + new + text[word.end():]
    return record


def test_near_finds_one_word_or_one_character_edits_of_short_rows(tmp_path):
    """Rows under 40 words, where one changed word moves half the word pairs: a word, a letter or a space
    edited, each found; rows that only share a template (a question pattern, a tool-call shape) are not."""
    rng = random.Random(5)
    records = json.loads(shared_file("alpaca_en_demo.json").read_text())
    short = [i for i, r in enumerate(records) if words(r) < 40 and re.search(r"[A-Za-z]{4,} [A-Za-z]{4,}", r["output"])]
    picked = rng.sample(short, 30)
    variants = [one_edit(records[i], ("word", "letter", "space")[j % 3], rng) for j, i in enumerate(picked)]
    capitals = [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Peru", "Lima"), ("Chad", "N'Djamena")]
    template = [{"instruction": f"What is the capital of {c}?", "input": "", "output": f"The capital of {c} is {k}."}
                for c, k in capitals]
    specs = [{"path": str(shared_file("alpaca_en_demo.json"))}, {"path": write(tmp_path / "v.json", variants)},
             {"path": write(tmp_path / "t.json", template)}]
    rows = sources.load_mixture(specs, seed=1).rows
    _, cleaned = clean(rows, None, CleanOptions(dedup="near"))
    where = {(s, r): i for i, (s, r) in enumerate(zip(rows["source"], rows["record"]))}
    root = _roots(cleaned.removed)
    found = [root(where[(specs[0]["path"], i)]) == root(where[(specs[1]["path"], j)]) for j, i in enumerate(picked)]
    assert sum(found) == 30
    assert cleaned.counts["near_duplicate"] == 30  # the variants only: none among alpaca's rows or the template
    assert any("(one word or space apart)" in e for e in cleaned.examples["near_duplicate"])


CHINESE = ("机器学习是人工智能的一个分支，它使计算机能够在没有明确编程的情况下从数据中学习。监督学习使用带标签的样本训练模型，"
           "模型学习输入与输出之间的映射关系。无监督学习则在没有标签的数据中寻找结构，例如聚类和降维。强化学习通过与环境交互获得奖励，"
           "逐步改进自己的策略。近年来，深度学习借助多层神经网络在图像识别、语音识别和自然语言处理等领域取得了显著进展。")
JAPANESE = ("機械学習は人工知能の一分野であり、コンピュータが明示的にプログラムされることなくデータから学習することを可能にします。"
            "教師あり学習ではラベル付きの例を使ってモデルを訓練し、入力と出力の対応関係を学びます。教師なし学習ではラベルのない"
            "データから構造を見つけます。")


def test_scripts_without_spaces_use_character_shingles_and_ngrams(tmp_path):
    def row(question, answer):
        return {"instruction": question, "input": "", "output": answer}
    train = [row("请解释机器学习。", CHINESE), row("请解释机器学习。", CHINESE.replace("显著", "巨大")),
             row("説明してください。", JAPANESE), row("説明してください。", JAPANESE.replace("構造", "模様")),
             row("请解释机器学习。", CHINESE[:60]),  # the same beginning, but a third of the text: not near
             row("总结一下。", "总之，研究计算机如何理解和生成人类的语言。"),  # 15 characters of the eval answer
             row("再总结一下。", "总之，研究计算机如何理解和生成。")]  # 12 of them: not an overlap
    rows, _ = sources.load_conversations([{"path": write(tmp_path / "zh.json", train)}], seed=0)
    evals, _ = sources.load_conversations([{"path": write(tmp_path / "eval.json", [row(
        "什么是自然语言处理？", "自然语言处理研究计算机如何理解和生成人类的语言，是人工智能的重要方向。")])}])
    kept, cleaned = clean(rows, evals, CleanOptions(dedup="near", decontaminate=True))
    assert cleaned.counts == {"eval_overlap": 1, "duplicate": 0, "near_duplicate": 2}
    removed = {rows[i]["record"]: reason for i, (reason, _) in cleaned.removed.items()}
    pairs = [r for r, reason in removed.items() if reason == "near_duplicate"]
    assert removed[5] == "eval_overlap" and {r // 2 for r in pairs} == {0, 1}  # one of each pair
    assert cleaned.examples["eval_overlap"][0].endswith(
        "record 5: shares '研 究 计 算 机 如 何 理 解 和 生 成 人' with eval " + f"{tmp_path / 'eval.json'} record 0")


def test_turn_and_length_filters_count_and_name_records(tmp_path):
    turn = lambda n, answer: {"messages": [m for _ in range(n) for m in (  # noqa: E731
        {"role": "user", "content": "Go on."}, {"role": "assistant", "content": answer})]}
    records = [turn(1, "ok"), turn(1, "x" * 50), turn(2, "y" * 40), turn(4, "z" * 30), turn(1, "w" * 500)]
    rows, _ = sources.load_conversations([{"path": write(tmp_path / "t.json", records)}], seed=0)
    kept, cleaned = clean(rows, None, CleanOptions(dedup="none", min_turns=1, max_turns=3, min_response_chars=10,
                                                   max_response_chars=200))
    assert cleaned.counts == {"too_few_turns": 0, "too_many_turns": 1, "response_too_short": 1,
                              "response_too_long": 1}
    assert sorted(kept["record"]) == [1, 2]
    assert cleaned.examples["too_many_turns"] == [f"{tmp_path / 't.json'} record 3: 4 turns (max_turns 3)"]
    assert cleaned.examples["response_too_short"] == [f"{tmp_path / 't.json'} record 0: 2 response chars "
                                                      "(min_response_chars 10)"]
    with pytest.raises(RecipeError, match=r"removed all 5 training rows \(too_few_turns: 5\); loosen `min_turns`"):
        clean(rows, None, CleanOptions(min_turns=5))


def test_a_weight_above_the_row_count_repeats_after_dedup(tmp_path):
    from sft_recipes.trainer import load_tokenizer, masked_datasets

    records = [{"instruction": f"Task {i}.", "input": "", "output": f"Answer {i}."} for i in range(8)]
    path = write(tmp_path / "d.json", records + [{**records[0], "output": "ANSWER 0."}, records[1]])
    recipe = load_recipe(TINY, eval_split=0, eval_strategy="no", datasets=[{"path": path, "weight": 20}])
    train, _, stats = masked_datasets(recipe, load_tokenizer(recipe))
    assert stats["train"]["cleaned"] == {"duplicate": 2}
    per_row = collections.Counter(m[-1]["content"].lower() for m in train["messages"])  # the first of each group
    assert len(train) == 20 and len(per_row) == 8 and sorted(per_row.values()) == [2] * 4 + [3] * 4


def test_checker_prints_counts_examples_and_largest_groups(mixture, capsys):
    glaive, copies = mixture["specs"][3]["path"], mixture["specs"][4]["path"]
    sources.main([glaive, copies, "--dedup", "near"])
    out = capsys.readouterr().out
    assert f"== {copies}" in out and "duplicate: 43" in out and "near_duplicate:" in out  # 35 natural + 8 copies
    assert re.search(r"record \d+: same as .*record \d+", out)
    groups = out.split("largest duplicate groups:\n")[1].splitlines()
    assert len(groups) == 5 and groups[0].startswith("  5 rows, the first kept: ")


def test_worker_processes_give_the_same_rows_and_a_rerun_reads_the_cache(mixture, monkeypatch):
    rows = sources.load_mixture(mixture["specs"][3:6], seed=0).rows
    one = clean(rows, None, CleanOptions(dedup="near"))
    two = clean(rows, None, CleanOptions(dedup="near"), num_proc=2)
    assert one[1].removed == two[1].removed and one[0]["record"] == two[0]["record"]

    def computed(*args, **kwargs):
        raise AssertionError("computed again instead of read from the datasets cache")
    monkeypatch.setattr(cleaning, "_signature_batch", computed)
    monkeypatch.setattr(cleaning, "_judge", computed)
    assert clean(rows, None, CleanOptions(dedup="near"))[1].removed == one[1].removed
