"""python -m benchmarks.run [--quick] [--only preprocess,cleaning,scale,train,overhead,real,gpu]

Prints a table and writes benchmarks/results/<YYYY-MM-DD>-<host>[-<sections>][-quick].json and .md. Every figure is measured
against its baseline in the same run (median of repetitions, candidate and baseline interleaved)."""
from __future__ import annotations

import os

# Before `datasets`/`transformers` are imported here or in a worker (workers inherit the environment).
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar too
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # library deprecation notes, in workers too

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from importlib import import_module  # noqa: E402
from pathlib import Path  # noqa: E402

import psutil  # noqa: E402

SECTIONS = ("preprocess", "cleaning", "scale", "train", "overhead", "real", "gpu")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    args = parse(argv)
    warnings.simplefilter("ignore", FutureWarning)
    started, load_at_start, figures, seconds = time.time(), _load(), [], {}
    for name in args.only:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        figures += import_module(f".{name}", __package__).run(args.quick)
        seconds[name] = round(time.perf_counter() - t, 1)
    results = {"machine": {**machine(), "load_avg_at_start": load_at_start}, "quick": args.quick,
               "sections": args.only, "section_seconds": seconds,
               "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"), "figures": figures}
    table = markdown(results)
    print("\n" + table)
    json_path, md_path = write(results, table)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[2])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (about 9 minutes)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def machine() -> dict:
    import torch

    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1_5_15": _load(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"), "trl": _version("trl"),
            "datasets": _version("datasets"), "tokenizers": _version("tokenizers"),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(package: str) -> str:
    return import_module(package).__version__


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Benchmarks {results['started']} on {m['host']} ({m['cpus']} CPUs; load average 1/5/15 min at start "
             f"{m['load_avg_at_start']}, at end {m['load_avg_1_5_15']}; {'--quick' if results['quick'] else 'full'}; "
             f"seconds per section {results['section_seconds']})", "",
             "| section | figure | value | goal | met | detail |", "|---|---|---|---|---|---|"]
    for f in results["figures"]:
        value = "—" if f["value"] is None else f"{f['value']} {f['unit']}".strip()
        met = {True: "yes", False: "NO", None: ""}[f["met"]]
        lines.append(f"| {f['section']} | {f['name']} | {value} | {f['goal'] or ''} | {met} | {_brief(f['detail'])} |")
    return "\n".join(lines)


def _brief(detail: dict) -> str:
    if "skipped" in detail:
        return detail["skipped"]
    keep = {k: v for k, v in detail.items() if v is not None and not isinstance(v, list)}
    return "; ".join(f"{k}={v}" for k, v in keep.items()).replace("|", "/")


def write(results: dict, table: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{results['machine']['host']}"
    if results["sections"] != list(SECTIONS):  # a partial run must not overwrite the day's full one
        stem += "-" + "+".join(results["sections"])
    if results["quick"]:
        stem += "-quick"
    json_path, md_path = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(table + "\n")
    return json_path, md_path


if __name__ == "__main__":
    raise SystemExit(main())
