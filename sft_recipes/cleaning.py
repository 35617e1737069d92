"""Clean the mixed training rows before masking; count every removal by reason. The checks, in order, each on
the rows the earlier ones kept: user turns (`min_turns`, `max_turns`); the characters the assistant writes
(`min_response_chars`, `max_response_chars`); a copy of an eval row or `decontaminate_ngram` words in a row
shared with an eval row's user or assistant text (`decontaminate`); the same row after normalising whitespace
and case (`dedup: exact`); for `dedup: near`, word-pair shingles with a Jaccard of `dedup_threshold` or more
(datasketch MinHash LSH, candidates confirmed exactly), or, in a row too short for one edit to bring its Jaccard
below the threshold, one word or one space apart (a word changed, added, removed or moved; two words joined or
one split). The first row of a group in the mixed (seeded) order is kept. A word is a run of letters or digits;
in scripts written without spaces (Chinese, Japanese, Thai) each character is one, so shingles and n-grams there
are of characters. Eval rows are never changed.

One cached `datasets.map` (`num_proc` workers) computes every row's signature; the grouping is then one pass."""
from __future__ import annotations

import collections
import functools
import hashlib
import json
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets.fingerprint import Hasher
from datasketch import MinHash, MinHashLSH

from .errors import RecipeError
from .keys import DEDUP

REASONS = ("too_few_turns", "too_many_turns", "response_too_short", "response_too_long", "eval_overlap",
           "duplicate", "near_duplicate")
_KEYS = {"too_few_turns": "min_turns", "too_many_turns": "max_turns", "response_too_short": "min_response_chars",
         "response_too_long": "max_response_chars", "eval_overlap": "decontaminate_ngram", "duplicate": "dedup",
         "near_duplicate": "dedup_threshold"}  # the key that governs each reason
PROVENANCE = ("source", "record")
NUM_PERM = 128
_NO_SPACES = ("\u0e00-\u0fff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
              "\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
_WORD = re.compile(f"[{_NO_SPACES}]|[^\\W{_NO_SPACES}]+")
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)  # odd, so multiplying loses nothing
_CODE = Path(__file__).read_text()
_MINHASH = MinHash(num_perm=NUM_PERM, hashfunc=int)  # its input is 32-bit shingle hashes already
_P = 0x100000001B3  # odd, so invertible modulo 2**64: a word's term in the sequence hash can be shifted back
_P_INV = np.uint64(pow(_P, -1, 1 << 64))
_MAX_EDIT_WORDS = 256  # edit keys cost one 64-bit hash per word: only short rows need them


@dataclass
class CleanOptions:
    dedup: str = "exact"
    dedup_threshold: float = 0.9
    decontaminate: bool = False
    decontaminate_ngram: int = 13
    min_turns: int | None = None
    max_turns: int | None = None
    min_response_chars: int | None = None
    max_response_chars: int | None = None

    def __post_init__(self):
        if self.dedup not in DEDUP:
            raise RecipeError(f"dedup must be one of {', '.join(DEDUP)}, got '{self.dedup}'")
        if not 0 < self.dedup_threshold <= 1:
            raise RecipeError(f"dedup_threshold is a Jaccard similarity in (0, 1], got {self.dedup_threshold}")
        if self.decontaminate_ngram < 4:
            raise RecipeError(f"decontaminate_ngram must be at least 4 words, got {self.decontaminate_ngram}")
        for low, high in (("min_turns", "max_turns"), ("min_response_chars", "max_response_chars")):
            lo, hi = getattr(self, low), getattr(self, high)
            if min(lo or 0, hi or 0) < 0 or (lo is not None and hi is not None and lo > hi):
                raise RecipeError(f"{low} and {high} need 0 <= {low} <= {high}, got {lo} and {hi}")

    def reasons(self) -> list[str]:
        """What these options can remove a row for, in the order the checks run."""
        on = (self.min_turns is not None, self.max_turns is not None, self.min_response_chars is not None,
              self.max_response_chars is not None, self.decontaminate, self.dedup != "none", self.dedup == "near")
        return [reason for reason, enabled in zip(REASONS, on) if enabled]


@dataclass
class Cleaned:
    counts: dict = field(default_factory=dict)    # reason -> rows removed, for every check that ran (zeros too)
    examples: dict = field(default_factory=dict)  # reason -> the first removals, naming source and record
    groups: list = field(default_factory=list)    # the largest groups of duplicates, one line each
    removed: dict = field(default_factory=dict)   # row -> (reason, the row it repeats or eval row it overlaps)


def clean(ds: Dataset, evals: Dataset | None, opts: CleanOptions, *, num_proc=None) -> tuple[Dataset, Cleaned]:
    """The rows of `ds` that pass every check, in their order, and what was removed for which reason."""
    reasons = opts.reasons()
    if not reasons or len(ds) == 0:
        return ds, Cleaned()
    probe = _Probe.build(evals, opts.decontaminate_ngram, num_proc) if opts.decontaminate and evals else None
    sig = _signatures(ds, opts, probe, num_proc)
    judged = sig.with_format("arrow").map(  # one whole-table batch: the pass is in order, and cached too
        _judge, batched=True, batch_size=None, fn_kwargs={"opts": opts}, remove_columns=sig.column_names,
        new_fingerprint=Hasher.hash([sig._fingerprint, "judge"]), desc="Cleaning: grouping").data
    verdict, head, score = (judged.column(c).to_numpy() for c in ("verdict", "head", "score"))
    counts = {r: int(np.sum(verdict == REASONS.index(r) + 1)) for r in reasons}
    if not np.any(verdict == 0):
        worst = max(counts, key=counts.get)
        lost = ", ".join(f"{r}: {n}" for r, n in counts.items() if n)
        raise RecipeError(f"cleaning removed all {len(ds)} training rows ({lost}); loosen `{_KEYS[worst]}`")
    report = _Report(ds, sig, opts, probe, verdict, head, score)
    removed = {int(i): (REASONS[verdict[i] - 1], int(head[i])) for i in np.flatnonzero(verdict)}
    return ds.select(np.flatnonzero(verdict == 0)), Cleaned(counts, report.examples(), report.groups(), removed)


# ---------------------------------------------------------------- the text of a row
def _spoken(row) -> list[tuple[str, str]]:
    """(role, text) of each user and assistant message, reasoning and tool calls included; a `text` row is one
    assistant text."""
    if row.get("text") is not None:
        return [("assistant", row["text"])]
    out = []
    for m in row["messages"] or []:
        if m["role"] in ("user", "assistant"):
            parts = (m.get(k) for k in ("content", "reasoning_content", "tool_calls"))
            out.append((m["role"], "\n".join(p for p in parts if isinstance(p, str) and p)))
    return out


def _normal(value):
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return [_normal(v) for v in value] if isinstance(value, list) else value


def _exact_key(row) -> str:
    """Every column but provenance (messages, tools, text, and whatever formats add), normalised."""
    content = json.dumps(_normal({k: v for k, v in row.items() if k not in PROVENANCE}), ensure_ascii=False,
                         sort_keys=True, default=str)  # default: a column type JSON lacks still keys the row
    return hashlib.blake2b(content.encode(), digest_size=16).hexdigest()


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


@functools.lru_cache(maxsize=1 << 20)  # most words recur: each is hashed once per process
def _word_hash(word: str) -> int:
    return zlib.crc32(word.encode())


def _word_hashes(words: list[str]) -> np.ndarray:
    return np.array(list(map(_word_hash, words)), dtype=np.uint64)


def _ngrams(h: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every run of n words (Horner's rule in wrapping uint64)."""
    g = np.zeros(max(len(h) - n + 1, 0), dtype=np.uint64)
    for j in range(n if len(g) else 0):
        g = g * _M1 + h[j:j + len(g)]
    return g


def _edit_limit(threshold: float) -> float:
    """Shingles below which one edit can bring a row's Jaccard under `threshold`: joining two words takes 3
    pairs away and adds 2, so (m - 3) / (m + 2) < threshold; 2 more for pairs that repeat in a row."""
    return _MAX_EDIT_WORDS if threshold >= 1 else min((3 + 2 * threshold) / (1 - threshold) + 2, _MAX_EDIT_WORDS)


def _edit_keys(spoken, words: list[list[str]], hashes: list[np.ndarray]) -> np.ndarray:
    """64-bit hashes of the row's word sequence (a role marker before each message), of that sequence with each
    word left out in turn, and of its words joined without spaces. Two rows share one iff they are one word apart
    (changed: both leave it out; added or removed: one leaves it out; moved) or differ only in where words
    split (a space removed or added, `e-mail` and `email`)."""
    roles = [np.array([zlib.crc32(f"\0{role}".encode())], np.uint64) for role, _ in spoken]
    seq = np.concatenate([np.zeros(0, np.uint64), *(x for pair in zip(roles, hashes) for x in pair)]) + np.uint64(1)
    powers = np.cumprod(np.full(len(seq), _P, np.uint64))[::-1] * _P_INV  # P ** (n - 1 - k), wrapping
    terms = (seq * _M2) * powers
    upto = np.cumsum(terms)  # wrapping sums
    left_out = (upto - terms) * _P_INV + (upto[-1] - upto)  # words before i move down one power
    joined = "\1".join(role + "\0" + "".join(w) for (role, _), w in zip(spoken, words))
    whole = np.frombuffer(hashlib.blake2b(joined.encode(), digest_size=8).digest(), np.uint64)
    return np.unique(np.concatenate([upto[-1:], left_out, whole]))


def _shingles(hashes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted 32-bit hashes of the row's word pairs (its word in a one-word row), and their MinHash values
    (none for a row without words)."""
    h = np.concatenate([np.zeros(0, np.uint64), *hashes])
    pairs = np.unique((h[:-1] * _M1 + h[1:] * _M2) >> np.uint64(32) if len(h) > 1 else h).astype(np.uint32)
    m = _MINHASH.copy()
    m.update_batch(pairs.tolist())
    return pairs, m.hashvalues if len(pairs) else np.zeros(0, np.uint32)


# ---------------------------------------------------------------- signatures: one cached map per split
def _signatures(ds: Dataset, opts: CleanOptions | None, probe, num_proc, n: int = 0) -> Dataset:
    """Per row: exact key, then for training rows (opts given) turns, response characters, MinHash (near) and
    the eval row it overlaps (-1 for none); for eval rows (n given) the n-gram hashes."""
    columns = {"key": Value("string")}
    if opts is None:
        columns["grams"] = List(Value("uint64"))
    else:
        columns.update(turns=Value("int32"), response_chars=Value("int64"))
        columns.update({"shingles": List(Value("uint32")), "minhash": List(Value("uint32")),
                        "edits": List(Value("uint64"))} if opts.dedup == "near" else {})
        columns.update({"overlap": Value("int32")} if probe else {})
    fingerprint = Hasher.hash([ds._fingerprint, opts and asdict(opts), n, _CODE, probe and probe.evals._fingerprint])
    return ds.map(_signature_batch, batched=True, remove_columns=ds.column_names, features=Features(columns),
                  fn_kwargs={"opts": opts, "probe": probe, "n": n}, num_proc=num_proc,
                  new_fingerprint=fingerprint, desc="Cleaning" if opts else "Cleaning: eval n-grams")


def _signature_batch(batch, opts, probe, n) -> dict:
    out = collections.defaultdict(list)
    for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
        spoken, key = _spoken(row), _exact_key(row)
        words = [_words(text) for _, text in spoken]
        hashes = [_word_hashes(w) for w in words]
        out["key"].append(key)
        if opts is None:
            out["grams"].append(np.concatenate([np.zeros(0, np.uint64), *(_ngrams(h, n) for h in hashes)]))
            continue
        out["turns"].append(sum(role == "user" for role, _ in spoken))
        out["response_chars"].append(sum(len(text) for role, text in spoken if role == "assistant"))
        if opts.dedup == "near":
            shingles, minhash = _shingles(hashes)
            short = 0 < len(shingles) < _edit_limit(opts.dedup_threshold)
            out["shingles"].append(shingles)
            out["minhash"].append(minhash)
            out["edits"].append(_edit_keys(spoken, words, hashes) if short else np.zeros(0, np.uint64))
        if probe:
            out["overlap"].append(probe.match(key, hashes))
    return out


@dataclass
class _Probe:
    """The eval rows as a training row meets them: exact keys, and sorted n-gram hashes with their eval row."""
    evals: Dataset
    n: int
    keys: dict
    grams: np.ndarray
    rows: np.ndarray

    @classmethod
    def build(cls, evals: Dataset, n: int, num_proc) -> "_Probe":
        sig = _signatures(evals, None, None, num_proc, n=n)
        keys = {key: i for i, key in reversed(list(enumerate(sig["key"])))}  # a key's first eval row
        grams = sig.data.column("grams").combine_chunks()
        flat, first = np.unique(grams.flatten().to_numpy(), return_index=True)
        rows = np.repeat(np.arange(len(grams)), grams.value_lengths().to_numpy(zero_copy_only=False))[first]
        return cls(evals, n, keys, flat, rows)

    def match(self, key: str, hashes: list[np.ndarray]) -> int:
        """The eval row this training row copies or shares an n-gram with, else -1."""
        if key in self.keys:
            return self.keys[key]
        hits = (self.find(_ngrams(h, self.n)) for h in hashes)
        return next((int(self.rows[hit[1]]) for hit in hits if hit), -1)

    def find(self, g: np.ndarray) -> tuple[int, int] | None:
        """(index in `g`, index in `self.grams`) of the first n-gram they share."""
        if len(g) == 0 or len(self.grams) == 0:
            return None
        at = np.minimum(np.searchsorted(self.grams, g), len(self.grams) - 1)
        hits = np.flatnonzero(self.grams[at] == g)
        return (int(hits[0]), int(at[hits[0]])) if len(hits) else None


# ---------------------------------------------------------------- one pass, in order
_DUP, _NEAR, _OVERLAP = (REASONS.index(r) + 1 for r in ("duplicate", "near_duplicate", "eval_overlap"))


def _judge(sig: pa.Table, opts: CleanOptions) -> pa.Table:
    """Per row: verdict (0 kept, else 1 + its reason's index in REASONS), the row it repeats or the eval row it
    overlaps (else -1), and a near duplicate's Jaccard."""
    n = len(sig)
    verdict, head, score = np.zeros(n, np.int8), np.full(n, -1), np.zeros(n)
    overlap = sig.column("overlap").to_numpy() if "overlap" in sig.column_names else np.full(n, -1)
    for reason, beyond in zip(REASONS[:4], (np.less, np.greater) * 2):
        limit = getattr(opts, _KEYS[reason])
        if limit is not None:
            values = sig.column("turns" if "turns" in reason else "response_chars").to_numpy()
            verdict[beyond(values, limit) & (verdict == 0)] = REASONS.index(reason) + 1
    verdict[(overlap >= 0) & (verdict == 0)] = _OVERLAP
    head[verdict == _OVERLAP] = overlap[verdict == _OVERLAP]
    if opts.dedup != "none":  # keys numbered by Arrow (one dictionary for all chunks), no Python str per row
        keys = np.concatenate([np.zeros(0, np.int32), *(c.indices.to_numpy() for c in
                                                         sig.column("key").dictionary_encode().chunks)])
        rows = np.flatnonzero(verdict == 0)
        _, first = np.unique(keys[rows], return_index=True)  # each key's first row still in
        kept = np.full(len(keys) and keys.max() + 1, -1)
        kept[keys[rows[first]]] = rows[first]
        dup = rows[kept[keys[rows]] != rows]
        verdict[dup], head[dup] = _DUP, kept[keys[dup]]
    if opts.dedup == "near":
        _near(sig, opts.dedup_threshold, verdict, head, score)
    return pa.table({"verdict": verdict, "head": head, "score": score})


def _near(sig: pa.Table, threshold: float, verdict, head, score):
    """Greedy, in order: a row one edit from a kept short row (a shared edit key), or whose Jaccard with a kept
    row reaches the threshold, joins that row's group, else it is kept and indexed. The LSH bands aim 0.1 below
    the threshold, weighing misses most (at 0.9: 16 bands of 8, which finds a pair at 0.9 with p > 0.9999, at
    0.8 with 0.95); the exact Jaccard of the shingles, not the noisier MinHash estimate, then confirms a
    candidate. Edit keys are numbered once (np.unique); each number remembers its first kept row."""
    hv, shingles = _Rows(sig.column("minhash")), _Rows(sig.column("shingles"))
    edits = sig.column("edits").combine_chunks()
    bounds = edits.offsets.to_numpy() - edits.offsets[0].as_py()
    _, key_ids = np.unique(edits.flatten().to_numpy(), return_inverse=True)
    owner = np.full(int(key_ids.max()) + 1 if len(key_ids) else 0, -1)  # key number -> first kept row with it
    lsh = _Bands(hv, max(threshold - 0.1, 0.05))
    for i in np.flatnonzero(verdict == 0):
        if len(hv[i]) == 0:  # a row without words has nothing to compare
            continue
        keys = key_ids[bounds[i]:bounds[i + 1]]
        near = owner[keys][owner[keys] >= 0]
        if len(near):
            verdict[i], head[i] = _NEAR, near.min()
            score[i] = _jaccard(shingles[i], shingles[head[i]])
            continue
        found = lsh.query(i)
        if len(found):  # estimates 0.2 below the threshold are far too far to check
            found = found[(np.stack([hv[j] for j in found]) == hv[i]).mean(axis=1) >= threshold - 0.2]
        sims = [_jaccard(shingles[i], shingles[j]) for j in found]
        if sims and max(sims) >= threshold:
            verdict[i], head[i], score[i] = _NEAR, found[int(np.argmax(sims))], max(sims)
        else:
            lsh.insert(i)
            owner[keys[owner[keys] < 0]] = i


class _Rows:
    """A list column's rows as numpy views into its (memory-mapped) chunks, made on demand: neither a copy of
    the column (combine_chunks) nor a Python object per row is held."""

    def __init__(self, column: pa.ChunkedArray):
        self.chunks = [(c.offsets.to_numpy() - c.offsets[0].as_py(), c.flatten().to_numpy()) for c in column.chunks]
        self.starts = np.cumsum([0, *(len(c) for c in column.chunks)])

    def __getitem__(self, i) -> np.ndarray:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1  # the last chunk starting at or before i
        offsets, values = self.chunks[c]
        i -= self.starts[c]
        return values[offsets[i]:offsets[i + 1]]


class _Bands:
    """MinHash LSH over the rows' MinHash values, as datasketch's MinHashLSH bands them (its b bands of r values
    for `threshold`), but held as numpy: a row is a candidate of another iff a band of theirs is equal. Only the
    bands two or more rows share are indexed (a dict of lists of the inserted rows), so what is kept per row is
    the few bytes of those, not datasketch's dicts and sets of every band of every inserted row (about 6 kB)."""

    def __init__(self, hv: _Rows, threshold: float):
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=(0.05, 0.95))
        rows, groups, base = [], [], 0
        for band in range(lsh.b):
            values, at = self._band(hv, band * lsh.r, (band + 1) * lsh.r)
            _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
            shared = counts[group] > 1
            rows.append(at[shared])
            groups.append(group[shared] + base)
            base += len(counts)
        rows, groups = np.concatenate([np.zeros(0, np.int64), *rows]), np.concatenate([np.zeros(0, np.int64), *groups])
        order = np.argsort(rows, kind="stable")
        self.rows, self.groups = rows[order], groups[order]  # (row, band group) pairs by row
        self.inserted: dict[int, list[int]] = {}  # band group -> the inserted rows in it

    @staticmethod
    def _band(hv: _Rows, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Values lo:hi of every row with MinHash values, each as one opaque (exactly compared) item, and the rows."""
        values, at = [], []
        for start, (offsets, flat) in zip(hv.starts, hv.chunks):
            lengths = np.diff(offsets)
            at.append(start + np.flatnonzero(lengths))  # rows without words have none; the rest NUM_PERM
            block = flat.reshape(-1, NUM_PERM)[:, lo:hi]
            values.append(np.ascontiguousarray(block).view(f"V{block.itemsize * (hi - lo)}").ravel())
        return np.concatenate(values), np.concatenate(at).astype(np.int64)

    def _groups(self, i: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.rows, [i, i + 1])
        return self.groups[lo:hi]

    def query(self, i: int) -> np.ndarray:
        """The inserted rows sharing a band with row i, ascending."""
        found = [j for g in self._groups(i) for j in self.inserted.get(int(g), ())]
        return np.unique(np.array(found, dtype=np.int64))

    def insert(self, i: int):
        for g in self._groups(i):
            self.inserted.setdefault(int(g), []).append(int(i))


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / (len(a) + len(b) - shared)


# ---------------------------------------------------------------- in words
@dataclass
class _Report:
    ds: Dataset
    sig: Dataset
    opts: CleanOptions
    probe: _Probe | None
    verdict: np.ndarray
    head: np.ndarray
    score: np.ndarray

    def examples(self, k: int = 3) -> dict:
        rows = {r: np.flatnonzero(self.verdict == REASONS.index(r) + 1)[:k] for r in self.opts.reasons()}
        return {r: [f"{_where(self.ds, i)}: {self.why(r, int(i))}" for i in found] for r, found in rows.items()
                if len(found)}

    def why(self, reason: str, i: int) -> str:
        j = int(self.head[i])
        if reason in ("duplicate", "near_duplicate"):
            if reason == "duplicate":
                return f"same as {_where(self.ds, j)}"
            one = " (one word or space apart)" if self.score[i] < self.opts.dedup_threshold else ""
            return f"Jaccard {self.score[i]:.2f} with {_where(self.ds, j)}{one}"
        if reason == "eval_overlap":
            n = self.probe.n
            for _, text in _spoken(self.ds[i]):
                words = _words(text)
                hit = self.probe.find(_ngrams(_word_hashes(words), n))
                if hit:
                    return f"shares '{' '.join(words[hit[0]:hit[0] + n])}' with eval {_where(self.probe.evals, j)}"
            return f"a copy of eval {_where(self.probe.evals, j)}"
        column = "turns" if "turns" in reason else "response_chars"
        return f"{self.sig[i][column]} {column.replace('_', ' ')} ({_KEYS[reason]} {getattr(self.opts, _KEYS[reason])})"

    def groups(self, k: int = 5) -> list[str]:
        """The largest groups of duplicates: size, the kept row, the first copies, and how the row begins."""
        members = collections.defaultdict(list)
        for i in np.flatnonzero((self.verdict == _DUP) | (self.verdict == _NEAR)):
            root = int(self.head[i])
            while self.verdict[root] in (_DUP, _NEAR):  # the copy of a row that is itself a near duplicate
                root = int(self.head[root])
            members[root].append(int(i))
        largest = sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:k]
        return [f"{len(rows) + 1} rows, the first kept: {_records(self.ds, [root, *rows[:4]])}"
                + (", ..." if len(rows) > 4 else "") + f": {_snippet(self.ds[root])}" for root, rows in largest]


def _where(ds: Dataset, i) -> str:
    if not set(PROVENANCE) <= set(ds.column_names):
        return f"row {i}"
    row = ds.select_columns(list(PROVENANCE))[int(i)]
    return f"{row['source']} record {row['record']}"


def _records(ds: Dataset, rows) -> str:
    """'a.json records 3, 9; b.json record 2': the rows by source, in order of first appearance."""
    by = collections.defaultdict(list)
    for i in rows:
        source, _, record = _where(ds, i).rpartition(" record ")
        by[source].append(record)
    return "; ".join(f"{s} record{'s' * (len(r) > 1)} {', '.join(r)}".lstrip() for s, r in by.items())


def _snippet(row, width: int = 60) -> str:
    text = " ".join(" ".join(t for _, t in _spoken(row)).split())
    return repr(text if len(text) <= width else text[:width] + "...")
