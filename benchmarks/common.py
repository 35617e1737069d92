"""What every section shares: where the data is, interleaved repetitions, figures, and subprocess workers
whose peak RSS (and anonymous memory) the parent samples with psutil."""
from __future__ import annotations

import multiprocessing
import os
import statistics
import traceback
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # `../shared/data` from the repo root; absent in a user's clone
GPT2_TOKENIZER = DATA / "gpt2-tokenizer"


def data_file(name: str) -> tuple[Path | None, str | None]:
    """(path, None) when the shared file exists, else (None, the reason it is skipped)."""
    if not DATA.is_dir():
        return None, f"skipped: {DATA} not found (the shared data folder beside the checkout)"
    path = DATA / name
    return (path, None) if path.exists() else (None, f"skipped: {path} not found")


def median(values) -> float:
    return statistics.median(values)


def interleaved(candidate, baseline, reps: int) -> tuple[list, list]:
    """Run `candidate()` and `baseline()` `reps` times each, alternating which goes first, so drift in
    the machine's load hits both. Returns their results in repetition order."""
    cand, base = [], []
    for rep in range(reps):
        pair = [(candidate, cand), (baseline, base)]
        for fn, out in pair if rep % 2 == 0 else pair[::-1]:
            out.append(fn())
    return cand, base


def figure(section: str, name: str, value, unit: str, *, goal: str | None = None, met: bool | None = None,
           **detail) -> dict:
    """One reported number: `value` is a ratio ("x"), a fraction ("%") or a plain measure."""
    return {"section": section, "name": name, "value": value, "unit": unit, "goal": goal, "met": met,
            "detail": detail}


def skipped(section: str, name: str, reason: str) -> dict:
    print(f"[{section}] {name}: {reason}", flush=True)
    return figure(section, name, None, "", skipped=reason)


def ratio_of_medians_per_rep(cand: list[float], base: list[float]) -> float:
    """Median over repetitions of candidate/baseline, each pair measured back to back."""
    return median([c / b for c, b in zip(cand, base)])


@contextmanager
def env(**values):
    """Set environment variables for the duration (children started inside inherit them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- subprocess workers
class Worker:
    """A spawned process that builds an object with `factory(*args)` once, then answers `call(*args)`
    with `obj(*args)`. The parent samples the child's memory with psutil while it waits: `peak_rss`, and
    `peak_anon` and `peak_file`, RSS split into memory the process holds itself and resident file-backed pages
    (see `rss_split`)."""

    def __init__(self, factory, *args):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._proc.start()
        self._ps = psutil.Process(self._proc.pid)
        self.peak_rss = self.peak_anon = self.peak_file = 0

    def ready(self):
        return self._reply()

    def call(self, *args):
        self._conn.send(args)
        return self._reply()

    def close(self):
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.terminate()

    def _reply(self):
        while not self._conn.poll(0.02):
            self._sample()
            if not self._proc.is_alive():
                raise RuntimeError(f"benchmark worker died (exit code {self._proc.exitcode})")
        self._sample()
        kind, value = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"benchmark worker failed:\n{value}")
        return value

    def _sample(self):
        try:
            rss, anon, file = rss_split(self._ps)
        except psutil.Error:
            return
        self.peak_rss, self.peak_anon, self.peak_file = (max(self.peak_rss, rss), max(self.peak_anon, anon),
                                                         max(self.peak_file, file))


def rss_split(ps: psutil.Process) -> tuple[int, int, int]:
    """(rss, anon, file) in bytes. On Linux `shared` is the resident file-backed (and shmem) pages, such as the
    touched pages of memory-mapped Arrow files: page cache the kernel can reclaim, not memory the process holds;
    anon = rss - shared. Where psutil has no `shared`, anon is all of RSS."""
    info = ps.memory_info()
    file = getattr(info, "shared", 0)
    return info.rss, info.rss - file, file


def _serve(conn, factory, args):
    try:
        obj = factory(*args)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while (msg := conn.recv()) is not None:
        try:
            conn.send(("ok", obj(*msg)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


@contextmanager
def workers(specs: dict):
    """Start every worker of `specs` ({name: (factory, *args)}) at once, wait until all are built, close them
    after. Building happens before any timing, so a worker being built never competes with a timed one."""
    started = {name: Worker(*spec) for name, spec in specs.items()}
    try:
        for w in started.values():
            w.ready()
        yield started
    finally:
        for w in started.values():
            w.close()


def mib(n_bytes: int) -> float:
    return round(n_bytes / 2**20, 1)
