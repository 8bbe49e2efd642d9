"""Command line: ``python -m solov2_d2.convert SRC DST [--from SOURCE] [--config NAME]``."""
import argparse
import sys

# Bridges a detectron2 without compiled ops before any detectron2 module is imported.
import solov2_d2  # noqa: F401  # isort: split

from .converter import convert_checkpoint, summary
from .mapping import ConversionError
from .sources import SOURCES
from .variants import CONFIGS_DIR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m solov2_d2.convert",
        description=(
            "Convert a published SOLOv2 checkpoint (authors' SOLO, mmdetection 2.x/3.x, "
            "AdelaiDet) or a torchvision ImageNet ResNet into a Detectron2 checkpoint for "
            "solov2_d2, and write the config it needs next to it (DST with suffix .yaml). "
            "Nothing is downloaded: SRC must be a local file."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file to convert (local path)")
    parser.add_argument("dst", metavar="DST", help="Detectron2 checkpoint to write (.pth or .pkl)")
    parser.add_argument(
        "--from",
        dest="source",
        choices=list(SOURCES),
        help=(
            "code base that wrote SRC: solo (authors' SOLO, mmdet v1), mmdet (mmdetection "
            "2.x/3.x), adelaidet, torchvision (ImageNet backbone only, for training); "
            "guessed from the tensor names if omitted"
        ),
    )
    parser.add_argument(
        "--config",
        metavar="NAME",
        help=(
            "the variant's config under configs/ (e.g. SOLOv2_R50_1x or "
            "configs/LVIS/SOLOv2_R50_3x.yaml); the checkpoint must match it. Detected from the "
            "tensors if omitted"
        ),
    )
    parser.add_argument(
        "--configs-dir",
        default=str(CONFIGS_DIR),
        help="folder the written config's _BASE_ points into (default: %(default)s)",
    )
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = convert_checkpoint(
            args.src, args.dst, source=args.source, config=args.config, configs_dir=args.configs_dir
        )
    except ConversionError as e:
        print(f"Conversion failed: {e}", file=sys.stderr)
        return 1
    print(f"Converted {args.src} -> {args.dst}")
    for line in summary(result):
        print(f"  {line}")
    print(f"Config written to {result.config_path}:\n")
    with open(result.config_path) as f:
        print(f.read())
    print(f"Use it with --config-file {result.config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
