"""The fruit job's recipe measured: seeds, each piece removed (or added) in turn, and the
folds of fruit_train that its choices were made on (issue 24).

    .venv/bin/python bench/fruit_recipe.py seeds [--seeds 0 1 2]
    .venv/bin/python bench/fruit_recipe.py ablation [--seed 0] [--evaluations-only]
    .venv/bin/python bench/fruit_recipe.py folds [--folds 0 1 2] [--seed 0] [--without P] [--with P]
    .venv/bin/python bench/fruit_recipe.py table

`seeds` runs `bash tools/train_fruit.sh SEED s` (the recipe of configs/fruit) into
output/recipe/seed<s>, timing each run. `ablation` scores the pieces that act after training
on the seed's run by `train_net.py --eval-only` (test-time augmentation: the plain evaluation;
main-part boxes: tight boxes, into no_main_part_boxes_s<s>), then trains once per training-time
piece with that piece removed (large-scale jitter, colour jitter, copy-paste: no_<piece>_s<s>)
or added (weight averaging, which the recipe leaves out: with_ema_s<s>). `folds` trains the
recipe, with `--without` / `--with` changes, on the folds of fruit_train (fruit_fold<k>_train,
evaluated on fruit_fold<k>_val) into output/recipe/fold<k>_s<s>[_no_<piece>][_with_ema]: the
choices made without fruit_val. A run with weight averaging also scores its training weights,
which are exactly those of the same run without it (tests/engine/test_ema.py), into the folder
of that run when it has none. `table` prints what output/recipe holds as Markdown, with the
iteration at which each run's mask loss first fell below 1 (see `_take_off`). Run one at a
time, on a quiet machine: the wall times are part of the result.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from solov2_d2.engine.learning_curve import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/fruit/SOLOv2_R18_fruit.yaml"
OUT = os.path.join(REPO, "output", "recipe")
PY = sys.executable

# Training-time pieces of the recipe: the overrides that remove each,
REMOVE = {
    "lsj": ["INPUT.LSJ.ENABLED", "False"],
    "color_jitter": ["INPUT.COLOR_JITTER.ENABLED", "False"],
    "copy_paste": ["INPUT.COPY_PASTE.ENABLED", "False"],
}
# and those it leaves out: the overrides that add each (an average of about the last 100
# iterations).
ADD = {
    "ema": ["MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.99", "MODEL_EMA.WARMUP_ITERS", "50"]
}


def _train(folder: str, opts) -> None:
    env = dict(os.environ, SOLOV2_FRUIT_OUTPUT=folder)
    start = time.monotonic()
    subprocess.run(["bash", "tools/train_fruit.sh", *opts], cwd=REPO, env=env, check=True)
    with open(os.path.join(folder, "wall_seconds.json"), "w") as f:
        json.dump({"seconds": time.monotonic() - start, "opts": list(opts)}, f)


def _evaluate(weights: str, folder: str, opts) -> None:
    command = [PY, "train_net.py", "--config-file", CONFIG, "--eval-only"]
    command += ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", folder, *opts]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def _train_and_score(folder: str, opts, with_ema: bool = False) -> None:
    """Train with `opts` into `folder` unless done. With weight averaging (`with_ema`: the run
    goes to `folder`_with_ema), its training weights, which model_final.pth keeps in
    "model_ema"/"raw_model" beside the average, are also scored as the run into `folder`."""
    run = folder + "_with_ema" if with_ema else folder
    if not os.path.isfile(os.path.join(run, "inference", "results.json")):
        _train(run, (opts + ADD["ema"]) if with_ema else opts)
    if with_ema and not os.path.isdir(folder):
        final = os.path.join(run, "model_final.pth")
        final = torch.load(final, map_location="cpu", weights_only=False)
        raw = dict(final["model"])
        raw.update(final["model_ema"]["raw_model"])
        path = os.path.join(run, "model_final_training_weights.pth")
        torch.save({"model": raw}, path)
        _evaluate(path, folder, opts)


def seeds(args) -> None:
    for s in args.seeds:
        _train(os.path.join(OUT, f"seed{s}"), ["SEED", str(s)])


def ablation(args) -> None:
    s = args.seed
    run = os.path.join(OUT, f"seed{s}")
    if not os.path.isfile(os.path.join(run, "model_final.pth")):
        _train(run, ["SEED", str(s)])
    tight = ["MODEL.SOLOV2.BOX_FROM", "tight"]
    final = os.path.join(run, "model_final.pth")
    _evaluate(final, os.path.join(OUT, f"no_main_part_boxes_s{s}"), tight)
    if args.evaluations_only:
        return
    for piece, opts in REMOVE.items():
        _train_and_score(os.path.join(OUT, f"no_{piece}_s{s}"), ["SEED", str(s), *opts])
    for piece, opts in ADD.items():
        _train_and_score(os.path.join(OUT, f"with_{piece}_s{s}"), ["SEED", str(s), *opts])


def folds(args) -> None:
    s = args.seed
    for k in args.folds:
        run = os.path.join(OUT, f"fold{k}_s{s}")
        opts = ["SEED", str(s), "DATASETS.TRAIN", f'("fruit_fold{k}_train",)']
        opts += ["DATASETS.TEST", f'("fruit_fold{k}_val",)']
        for piece in args.without:
            run, opts = run + f"_no_{piece}", opts + REMOVE[piece]
        _train_and_score(run, opts, with_ema="ema" in args.with_)


def _results(folder: str):
    path = os.path.join(folder, "inference", "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    tta = os.path.join(folder, "inference_TTA", "results.json")
    if os.path.isfile(tta):
        with open(tta) as f:
            results.update(json.load(f))
    wall = os.path.join(folder, "wall_seconds.json")
    if os.path.isfile(wall):
        with open(wall) as f:
            results["wall_seconds"] = json.load(f)["seconds"]
    results["take_off"] = _take_off(os.path.join(folder, "metrics.json"))
    return results


def _take_off(metrics_path: str, below: float = 1.0):
    """The first logged iteration at which the mask loss (detectron2's median over the logging
    window) is below `below`, or None. The mask branch learns little until then, and when that
    happens is most of what the seed decides in the fruit job."""
    if not os.path.isfile(metrics_path):
        return None
    records = read_metrics(metrics_path)
    return next((r["iteration"] + 1 for r in records if r.get("loss_mask", below) < below), None)


def _row(name, r, task_suffix=""):
    segm, bbox = r["segm" + task_suffix], r["bbox" + task_suffix]
    wall = r.get("wall_seconds")
    minutes = f"{wall / 60:.1f}" if wall else "-"
    take_off = r.get("take_off") or "-"
    return (
        f"| {name} | {segm['AP']:.1f} | {segm['AP50']:.1f} | {bbox['AP']:.1f} | "
        f"{bbox['AP50']:.1f} | {minutes} | {take_off} |"
    )


def table(args) -> None:
    header = "| run | mask AP | mask AP50 | box AP | box AP50 | minutes | mask loss < 1 at |\n"
    header += "|---|---:|---:|---:|---:|---:|---:|"
    folders = sorted(os.listdir(OUT)) if os.path.isdir(OUT) else []
    seed_runs = [d for d in folders if d.startswith("seed")]
    print(header)
    finals = []
    for d in seed_runs:
        r = _results(os.path.join(OUT, d))
        if r is None:
            continue
        tta = "segm_TTA" in r
        print(_row(d + (" (with TTA)" if tta else ""), r, "_TTA" if tta else ""))
        if tta:
            print(_row(d + " (without TTA)", r))
        finals.append(r)
    if finals:
        suffix = "_TTA" if all("segm_TTA" in r for r in finals) else ""
        for task, metric in (("segm", "AP"), ("segm", "AP50"), ("bbox", "AP"), ("bbox", "AP50")):
            values = [r[task + suffix][metric] for r in finals]
            spread = f"{min(values):.1f}-{max(values):.1f}"
            print(f"mean {task} {metric}{suffix}: {statistics.mean(values):.1f} (range {spread})")
    print()
    print(header)
    for d in folders:
        if not d.startswith("seed"):
            r = _results(os.path.join(OUT, d))
            if r is not None:
                tta = "segm_TTA" in r
                print(_row(d, r, "_TTA" if tta else ""))
                if tta:
                    print(_row(d + " (without TTA)", r))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.set_defaults(run=seeds)
    p = commands.add_parser("ablation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--evaluations-only",
        action="store_true",
        help="only the pieces scored on the seed's run (weight averaging, main-part boxes)",
    )
    p.set_defaults(run=ablation)
    p = commands.add_parser("folds")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--without", nargs="*", default=[], choices=sorted(REMOVE))
    p.add_argument("--with", dest="with_", nargs="*", default=[], choices=sorted(ADD))
    p.set_defaults(run=folds)
    commands.add_parser("table").set_defaults(run=table)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
