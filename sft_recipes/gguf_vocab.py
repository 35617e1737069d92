"""A tokenizer written into a GGUF file as llama.cpp reads it: every token by id (added special tokens as
control tokens, other added tokens as user-defined, rows the embeddings have beyond the tokenizer as unused),
the merges of a byte-level BPE vocabulary and the llama.cpp pre-tokenizer that splits text as this tokenizer
does, or the scores of a SentencePiece-style vocabulary; BOS/EOS/unk/pad and end-of-turn ids, and whether the
tokenizer adds BOS/EOS itself.

The pre-tokenizer is not looked up by model name: each of llama.cpp's (their split regexes, from its
`llama-vocab.cpp`) is run over a probe text and its pieces are encoded with this tokenizer's own BPE model; the
first whose tokens equal the tokenizer's own encoding of the text is the one written."""
from __future__ import annotations

import json
from functools import lru_cache

from .errors import RecipeError

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# (tokenizer.ggml.pre, regexes applied one after another, whether a piece found whole skips the merges). Where
# two tokenize the probe alike (a vocabulary without multi-digit tokens), the one that splits digits singly wins.
PRE_TOKENIZERS = (
    ("smollm", (r"\p{N}", _GPT2), False),
    ("gpt-2", (_GPT2,), False),
    ("qwen2", (_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"),), False),
    ("llama-bpe", (_LLAMA3,), True),
    ("tekken", (_TEKKEN,), True),
)
# Where the pre-tokenizers differ: contractions in both cases, digit runs, whitespace runs before words and
# line ends, punctuation runs, letters of other scripts, emoji.
PROBE = ("Hello world! I'M sure you've got 3 apples, 42 pears and 12345 plums.\n\n\tTabbed  and   spaced "
         "text\r\nCamelCaseWords ALLCAPS lowercase don't WON'T it's\n  indented:\n    x = (a+b)*c; "
         "y = \"quoted\" // comment...!?\n\u00e9t\u00e9 na\u00efve caf\u00e9 \u4e2d\u6587\u5b57 "
         "\u0440\u0443\u0441\u0441\u043a\u0438\u0439 \U0001F642\U0001F680 end.  \n")
_UNUSED, _NORMAL, _UNKNOWN, _CONTROL, _USER, _BYTE = 5, 1, 2, 3, 4, 6


def add_vocab(writer, tokenizer, n_vocab: int) -> None:
    """Write `tokenizer` into `writer`, padded to the `n_vocab` rows of the model's embeddings."""
    from .modelfile import end_of_turn

    spec = _backend(tokenizer)  # tokenizer.json as data, parsed once (a 128k vocabulary takes a second)
    model = spec["model"]
    spm = bool(model.get("byte_fallback"))
    tokens, types = token_list(tokenizer, n_vocab, spm)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:  # SentencePiece-style: llama.cpp merges the pair of highest score, training merged lowest rank first
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_scores(tokens, model["merges"]))
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer, spec))
        writer.add_token_merges(merges(model))
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id),
                          (writer.add_eot_token_id, _token_id(tokenizer, end_of_turn(tokenizer)))):
        if token_id is not None:
            add(token_id)
    add_bos, add_eos = added_specials(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)


def token_list(tokenizer, n_vocab: int, spm: bool) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types; ids the tokenizer has no token for are unused `[PAD{id}]`."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise RecipeError(f"the tokenizer has token ids up to {max(vocab.values())} but the model's embeddings only "
                          f"{n_vocab} rows: the model was not resized to its tokenizer")
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [_UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = _BYTE if spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">") else _NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = _CONTROL if added.special else _USER
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = _UNKNOWN
    return tokens, types


def merges(model: dict) -> list[str]:
    """The BPE merges as llama.cpp reads them: "left right" (tokenizer.json holds pairs or such strings)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def added_specials(tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what encoding a text with special tokens puts around it."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    if len(full) == len(bare):
        return False, False
    return (full[0] == tokenizer.bos_token_id and bare[:1] != full[:1],
            full[-1] == tokenizer.eos_token_id and bare[-1:] != full[-1:])


def _token_id(tokenizer, token: str | None):
    return tokenizer.convert_tokens_to_ids(token) if token and token in tokenizer.get_vocab() else None


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RecipeError(f"{tokenizer.name_or_path}: a slow (Python) tokenizer cannot be exported; save a fast "
                          "one (tokenizer.json)")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise RecipeError(f"{tokenizer.name_or_path}: a {spec['model']['type']} tokenizer cannot be exported to GGUF "
                          "yet (byte-level BPE and SentencePiece-style BPE can)")
    return spec


# ---------------------------------------------------------------- byte-level BPE: the pre-tokenizer
def pre_tokenizer(tokenizer, spec: dict | None = None) -> str:
    """The llama.cpp pre-tokenizer that tokenizes `PROBE` exactly as `tokenizer` (tokenizer.json: `spec`) does."""
    spec = spec or _backend(tokenizer)
    expected = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    models = {}
    for name, exprs, ignore_merges in PRE_TOKENIZERS:
        if ignore_merges not in models:
            models[ignore_merges] = _bpe_model(spec, ignore_merges)
        if llama_cpp_ids(models[ignore_merges], PROBE, exprs) == expected:
            return name
    raise RecipeError(f"{tokenizer.name_or_path}: its pre-tokenizer splits text unlike any of llama.cpp's "
                      f"({', '.join(n for n, _, _ in PRE_TOKENIZERS)}): llama.cpp would tokenize prompts differently "
                      "from training, so no GGUF is written")


def llama_cpp_ids(model, text: str, exprs) -> list[int]:
    """`text` tokenized the way llama.cpp does: split by each regex in turn (text between matches stays a piece),
    each piece byte-level encoded and merged on its own by the BPE `model`."""
    encode = _byte_encoder()
    return [t.id for piece in split(text, exprs) for t in model.tokenize("".join(encode[b] for b in piece.encode()))]


def split(text: str, exprs) -> list[str]:
    import regex

    pieces = [text]
    for expr in exprs:
        out = []
        for piece in pieces:
            pos = 0
            for match in regex.finditer(expr, piece):
                if match.start() > pos:  # text no branch matches stays a piece of its own, as in llama.cpp
                    out.append(piece[pos:match.start()])
                if match.group():
                    out.append(match.group())
                pos = match.end()
            if pos < len(piece):
                out.append(piece[pos:])
        pieces = out
    return pieces


def _bpe_model(spec: dict, ignore_merges: bool):
    """A copy of the tokenizer's BPE model that takes a piece found whole in the vocabulary as one token, or
    merges it anyway, as the llama.cpp pre-tokenizer under test does."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps({**spec, "model": {**spec["model"], "ignore_merges": ignore_merges}})).model


@lru_cache(maxsize=1)
def _byte_encoder() -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


# ---------------------------------------------------------------- SentencePiece-style BPE
def _scores(tokens: list[str], merge_list) -> list[float]:
    """A token's score is minus the rank of the merge that makes it, so llama.cpp's highest-score-first merging
    follows training's lowest-rank-first; single characters, bytes and specials score 0 (never a merge result)."""
    rank = {}
    for i, m in enumerate(merges({"merges": merge_list})):
        left, _, right = m.partition(" ")
        rank.setdefault(left + right, i)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (a Prepend normalizer, or Metaspace that prepends)."""
    parts = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    flat = [p for part in parts for p in (part.get("normalizers") or part.get("pretokenizers") or [part])]
    return any(p.get("type") == "Prepend" or (p.get("type") == "Metaspace" and p.get("prepend_scheme", "always")
                                              != "never") for p in flat)
