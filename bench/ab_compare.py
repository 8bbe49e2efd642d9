"""Inference stage times of two checkouts of the project, in alternating runs on one machine.

    .venv/bin/python bench/ab_compare.py OLD_CHECKOUT NEW_CHECKOUT [--runs 5] [--repeats 5]

Each run is a fresh process that imports the package from one checkout (its own
`bench/benchmark.py` measures): SOLOv2-R50 at 800x1333, batch 1, 1000 forced candidates, the
median of `--repeats` calls per load (`benchmark.bench_inference`). Runs alternate old, new,
old, new, ...; the table gives per checkout the median of the runs' medians and their range,
and new / old. Nothing else should run on the machine meanwhile.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

_RUN = """
import json, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {bench!r})
import benchmark, torch
r = benchmark.bench_inference("SOLOv2-R50", (800, 1333), 1, 1000, {repeats}, torch.device("cpu"))
print(json.dumps({{load: r[load] for load in benchmark.LOADS}}))
"""
ROWS = [("compact", "postprocess"), ("heavy", "postprocess"), ("compact", "total"),
        ("heavy", "total"), ("none", "total")]


def run_once(repo: str, repeats: int) -> dict:
    code = _RUN.format(repo=repo, bench=os.path.join(repo, "bench"), repeats=repeats)
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"run in {repo} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = {"old": [], "new": []}
    for i in range(args.runs):
        for name in ("old", "new"):
            runs[name].append(run_once(os.path.abspath(getattr(args, name)), args.repeats))
            row = runs[name][-1]
            print(f"run {i + 1} {name}: " + ", ".join(
                f"{load} {stage} {row[load][stage]:.0f}" for load, stage in ROWS), flush=True)
    print("\n| ms per image | old: median (range) | new: median (range) | new / old |")
    print("|---|---:|---:|---:|")
    for load, stage in ROWS:
        values = {k: [r[load][stage] for r in v] for k, v in runs.items()}
        med = {k: statistics.median(v) for k, v in values.items()}
        cells = [f"{med[k]:.0f} ({min(values[k]):.0f}-{max(values[k]):.0f})" for k in runs]
        print(f"| {load}, {stage} | {cells[0]} | {cells[1]} | {med['new'] / med['old']:.3f} |")


if __name__ == "__main__":
    main()
