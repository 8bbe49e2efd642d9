"""The learning curve of a training run, drawn from the ``metrics.json`` that detectron2's
``JSONWriter`` writes in its output folder: the training losses against the iteration, and the
evaluations' mask and box AP (and AP50) against the iteration of each evaluation (with
test-time augmentation: its AP as a star).

    python -m solov2_d2.engine.learning_curve OUTPUT_DIR [--output FILE]

writes ``OUTPUT_DIR/learning_curve.png`` (or FILE, which must not exist yet).
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List, Tuple

__all__ = ["draw_learning_curve", "read_metrics"]

# The curves of the evaluation panel: (metrics.json key, label, matplotlib format).
_AP_CURVES = (
    ("segm/AP", "mask AP", "C0-o"),
    ("segm/AP50", "mask AP50", "C0--o"),
    ("bbox/AP", "box AP", "C3-s"),
    ("bbox/AP50", "box AP50", "C3--s"),
    ("segm_TTA/AP", "mask AP, test-time augmentation", "C0*"),
    ("bbox_TTA/AP", "box AP, test-time augmentation", "C3*"),
)
_LOSS_CURVES = ("total_loss", "loss_cate", "loss_mask")


def read_metrics(path: str) -> List[Dict]:
    """The records of a ``metrics.json`` (one JSON object per line), in order.

    Raises:
        FileNotFoundError: `path` does not exist (naming it).
        ValueError: a line is not a JSON object (naming the file and line).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: give the OUTPUT_DIR of a train_net.py run (its "
            "metrics.json is written as training goes)."
        )
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg}).") from None
            if not isinstance(record, dict) or "iteration" not in record:
                raise ValueError(
                    f"{path}, line {number}: expected a JSON object with an \"iteration\" "
                    "(detectron2's JSONWriter format)."
                )
            records.append(record)
    return records


def _series(records: List[Dict], key: str) -> Tuple[List[int], List[float]]:
    """(iterations, values) of the records holding a finite `key`; the last record of an
    iteration wins (an evaluation after training shares the last iteration)."""
    by_iteration = {}
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            by_iteration[int(r["iteration"])] = float(value)
    iterations = sorted(by_iteration)
    return iterations, [by_iteration[i] for i in iterations]


def draw_learning_curve(metrics_path: str, output_path: str, title: str = "") -> str:
    """Draw the losses and the evaluations' AP of `metrics_path` into the PNG `output_path`.

    Returns:
        `output_path`.
    Raises:
        ValueError: the file holds no training loss (naming it).
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    losses = {key: _series(records, key) for key in _LOSS_CURVES}
    if not losses["total_loss"][0]:
        raise ValueError(f"{metrics_path} holds no training loss (\"total_loss\") to draw.")
    aps = {(label, style): _series(records, key) for key, label, style in _AP_CURVES}

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, (iterations, values) in losses.items():
        if iterations:
            left.plot(iterations, values, label=key, linewidth=1.5 if key == "total_loss" else 1)
    left.set_yscale("log")
    left.set_xlabel("iteration")
    left.set_ylabel("training loss (median of 20 iterations)")
    left.legend()
    left.grid(alpha=0.3)
    for (label, style), (iterations, values) in aps.items():
        if iterations:
            right.plot(iterations, values, style, label=label, markersize=12 if "*" in style else 6)
    right.set_xlabel("iteration")
    right.set_ylabel("evaluation (COCO AP, %)")
    right.set_xlim(left.get_xlim())
    right.set_ylim(0, 100)
    if any(iterations for iterations, _ in aps.values()):
        right.legend(loc="upper left", fontsize="small")
    else:
        right.text(0.5, 0.5, "no evaluation", ha="center", transform=right.transAxes)
    right.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(output_path, dpi=100)
    plt.close(figure)
    return output_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m solov2_d2.engine.learning_curve", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output_dir", help="the OUTPUT_DIR of a train_net.py run")
    parser.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="the picture to write (default: OUTPUT_DIR/learning_curve.png, replaced if there)",
    )
    parser.add_argument("--title", default="", help="a title above the two panels")
    args = parser.parse_args(argv)
    output = args.output or os.path.join(args.output_dir, "learning_curve.png")
    if args.output and os.path.exists(args.output):
        print(f"error: {args.output} exists; give a new file name.", file=sys.stderr)
        return 2
    try:
        draw_learning_curve(os.path.join(args.output_dir, "metrics.json"), output, args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
