"""Where the CPU's fast paths of post-processing pay: the plain, fast and auto paths
(`MODEL.SOLOV2.INFERENCE_PATH`) on captured head outputs of SOLOv2-R50, by input size and
candidate count, under a forced load of benchmark.py (median ms of --repeats, one image): its
compact load, the same with large objects (sqrt(area) 150..1200 input pixels), or its heavy load.

    .venv/bin/python bench/bench_fast_paths.py            # compact; about 3 minutes here
    .venv/bin/python bench/bench_fast_paths.py --load large
    .venv/bin/python bench/bench_fast_paths.py --load heavy

The auto path takes each fast path only above a work threshold (`_BLOCKS_LEAST_WORK`,
`_CROP_LEAST_WORK` in solov2_d2/postprocess.py): it should be about the faster of the other two
in every row. Every row also checks that the three give the same instances.
"""
import os

# Before torch is imported, as benchmark.py does (its docstring says why).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
from bench_matrix_nms import median_ms  # noqa: E402
from benchmark import MODELS, ForcedCandidates, build, random_images  # noqa: E402

SIZES = [(192, 288), (320, 480), (480, 640), (800, 1333)]
COUNTS = [100, 300, 1000]
PATHS = ["plain", "fast", "auto"]
# The forced loads: ForcedCandidates' arguments besides the count.
LOADS = {"compact": {}, "large": {"sizes": (150, 1200)}, "heavy": {"heavy": True}}


def captured_head_outputs(model, size, candidates, load):
    """The post-processor's arguments for one random image of `size` under a forced `load`."""
    post, captured = model.postprocessor, []
    model.postprocessor = lambda *args: captured.append(args) or post(*args)
    handles = ForcedCandidates(candidates, **LOADS[load]).attach(model)
    with torch.no_grad():
        model([{"image": random_images(1, size)[0]}])
    for h in handles:
        h.remove()
    model.postprocessor = post
    return captured[0]


def run_path(post, inputs, path):
    post.inference_path = path
    return post(*inputs)


def same(a, b) -> bool:
    return all(
        torch.equal(x.scores, y.scores) and torch.equal(x.pred_masks, y.pred_masks)
        for x, y in zip(a, b)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", choices=list(LOADS), default="compact")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cpu")
    model = build(MODELS["SOLOv2-R50"], "cpu")
    post = model.postprocessor
    print(f"| input | candidates | detections | {' | '.join(p + ' ms' for p in PATHS)} | same |")
    print("|---|---:|---:|" + "---:|" * len(PATHS) + ":---:|")
    rows = []
    for size in SIZES:
        for count in COUNTS:
            inputs = captured_head_outputs(model, size, count, args.load)
            runs = [functools.partial(run_path, post, inputs, p) for p in PATHS]
            ms = median_ms(runs, device, warmup=1, repeats=args.repeats)
            results = [run() for run in runs]
            row = dict(size=list(size), candidates=count, detections=len(results[0][0]))
            row.update({p: t for p, t in zip(PATHS, ms)})
            row["same"] = all(same(results[0], r) for r in results[1:])
            rows.append(row)
            print(
                f"| {size[0]}x{size[1]} | {count} | {row['detections']} | "
                + " | ".join(f"{t:.0f}" for t in ms)
                + f" | {'yes' if row['same'] else 'NO'} |",
                flush=True,
            )
    print(json.dumps(rows))
    if not all(r["same"] for r in rows):
        raise SystemExit("The paths differ.")


if __name__ == "__main__":
    main()
