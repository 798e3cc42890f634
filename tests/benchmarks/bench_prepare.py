"""Benchmark of the whole data preparation (near-duplicates included) on N generated records.

Each size runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own; on inputs over 64 MB the
per-record stage runs in a pool of 2 worker processes, whose CPU time and largest peak RSS are reported too
(user + system seconds of the child, ``cpu_main_s``, and of its workers, ``cpu_workers_s``: on a machine shared
with other jobs the wall time grows with the load, the CPU time much less). Records are generated
deterministically: 6 domains, questions from templates, answers of 30-90 words, 1 in 8 with a code block,
about 1% near-duplicates and 0.5% exact duplicates. Not collected by pytest (named bench_*).

    .venv/bin/python tests/benchmarks/bench_prepare.py                  # 10k and 100k
    .venv/bin/python tests/benchmarks/bench_prepare.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ["cybersecurity", "programming", "networking", "data_science", "cloud_computing", "general_conversation"]
OPENERS = ["What is", "How does", "Why is", "When should I use", "How do I configure", "What are the risks of"]


def generate(path: Path, n: int, seed: int = 0) -> None:
    """``n`` records as JSON Lines (half) and a JSON array (half), written to ``path`` (a folder)."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("net", "data", "sec", "code", "cloud", "log", "key", "node", "byte", "flow",
                                 "port", "task", "page", "file", "user", "role") for b in range(400)]
    common = "the a of to and is in that it for on with as by this be are from or an at".split()
    recs = []
    for i in range(n):
        if i % 200 == 7 and recs:  # near duplicate of an earlier record: one word changed
            src = recs[rng.randrange(len(recs))]
            words = src["answer"].split()
            words[len(words) // 2] = rng.choice(vocab)
            recs.append({**src, "id": f"b{i}", "answer": " ".join(words)})
            continue
        if i % 200 == 11 and recs:  # exact duplicate
            recs.append({**recs[rng.randrange(len(recs))], "id": f"b{i}"})
            continue
        topic = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 3)))
        answer = " ".join(rng.choice(vocab) if rng.random() < 0.45 else rng.choice(common)
                          for _ in range(rng.randint(30, 90))) + "."
        if i % 8 == 0:
            answer += f"\n```python\nvalue_{i} = compute('{topic}')\nprint(value_{i})\n```"
        recs.append({"id": f"b{i}", "domain": DOMAINS[i % len(DOMAINS)], "question": f"{rng.choice(OPENERS)} {topic}?",
                     "answer": answer})
    half = n // 2
    with (path / "part1.jsonl").open("w", encoding="utf-8") as fh:
        for r in recs[:half]:
            fh.write(json.dumps(r) + "\n")
    with (path / "part2.json").open("w", encoding="utf-8") as fh:
        fh.write("[\n" + ",\n".join(json.dumps(r, indent=2) for r in recs[half:]) + "\n]\n")


def child(n: int, flags: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "Datasets"
        d.mkdir()
        t0 = time.perf_counter()
        generate(d, n)
        gen_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in d.iterdir()) / 1e6
        sys.path.insert(0, str(ROOT))
        from src.data_processing.prepare_data_for_training import parse_args, prepare
        from src.utils.common import setup_logging

        setup_logging(quiet_console=True)
        args = parse_args(["--datasets_dir", str(d), "--output", str(Path(tmp) / "out.json"),
                           "--no-create_test_set", "--seed", "42", *flags])
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        stats = prepare(args)
        secs = time.perf_counter() - t0
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_main = me.ru_utime + me.ru_stime - before.ru_utime - before.ru_stime
        cpu_workers = kids.ru_utime + kids.ru_stime
        peak_mb = me.ru_maxrss / 1024  # Linux: KiB
        print(json.dumps({"n": n, "input_mb": round(size_mb, 1), "generate_s": round(gen_s, 1),
                          "seconds": round(secs, 2), "cpu_main_s": round(cpu_main, 1),
                          "cpu_workers_s": round(cpu_workers, 1), "records_per_s": round(n / secs),
                          "peak_rss_mb": round(peak_mb), "worker_peak_rss_mb": round(kids.ru_maxrss / 1024),
                          "output_records": stats["output_records"], "near_dups": stats["dedup"]["near"],
                          "exact_dups": stats["dedup"]["exact"], "stages": stats["timings_s"]}))


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="record counts to time")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--flags", default="", help="extra prepare flags, quoted (default: the defaults)")
    args = p.parse_args()
    flags = args.flags.split()
    if args.child is not None:
        child(args.child, flags)
        return 0
    rows = []
    for n in args.sizes:
        res = subprocess.run([sys.executable, __file__, "--child", str(n), "--flags", args.flags],
                             capture_output=True, text=True)
        if res.returncode:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| records | input MB | prepare s | CPU s main + workers | records/s | "
          "peak RSS MB (main + largest worker) | "
          "near-dups | exact dups |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['input_mb']} | {r['seconds']} | {r['cpu_main_s']} + {r['cpu_workers_s']} | "
              f"{r['records_per_s']:,} | "
              f"{r['peak_rss_mb']:,} + {r['worker_peak_rss_mb']:,} | {r['near_dups']:,} | {r['exact_dups']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
