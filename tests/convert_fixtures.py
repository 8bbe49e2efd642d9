"""Helpers shared by the converter tests (tests/test_convert_*.py)."""
import re
import shutil
from pathlib import Path

import torch
from conftest import REPO, SHARED

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config
from solov2_d2.convert import VARIANTS

CHECKPOINT_KEYS = SHARED / "reference" / "checkpoint_keys"


def key_list(filename):
    """name -> shape of a reference key list."""
    lines = (CHECKPOINT_KEYS / filename).read_text().splitlines()
    entries = {}
    for line in lines:
        if line.startswith("#"):
            continue
        name, shape = line.split(" ", 1)
        entries[name] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return entries


def synthetic(shapes, seed=0, device="cpu"):
    """Random tensors of the given shapes (BatchNorm counters as int64 scalars); on the meta
    device, shapes only."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(1000, dtype=torch.long, device=device)
        elif device == "meta":
            out[name] = torch.empty(shape, device="meta")
        else:
            out[name] = torch.randn(shape, generator=gen)
    return out


def stub_configs_dir(root):
    """A configs folder with the repository's Base-SOLOv2.yaml and, for every variant, a config
    that only inherits from it (the real ones may not exist yet)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "Base-SOLOv2.yaml", root / "Base-SOLOv2.yaml")
    for variant in VARIANTS:
        path = root / variant.config_file
        path.parent.mkdir(parents=True, exist_ok=True)
        base = "../Base-SOLOv2.yaml" if "/" in variant.name else "Base-SOLOv2.yaml"
        path.write_text(f'_BASE_: "{base}"\n')
    return root


def cfg_from_yaml(path):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def empty_model(cfg):
    """The model of `cfg` with allocated but uninitialised weights (fast, even for R101)."""
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    return model.to_empty(device="cpu")


def load_strictly(model, path):
    """Load a converted checkpoint file with detectron2's DetectionCheckpointer, failing on any
    missing, unexpected or mis-shaped key; returns the model's state dict."""
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(path)))
    assert not incompatible.missing_keys, incompatible.missing_keys
    assert not incompatible.unexpected_keys, incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes, incompatible.incorrect_shapes
    return model.state_dict()


def value_signature(tensors):
    """Sorted (shape, sum, first value) of float tensors: equal for two dicts holding the same
    random tensors under any names."""
    return sorted(
        (tuple(t.shape), float(t.sum()), float(t.flatten()[0]))
        for t in tensors.values()
        if t.is_floating_point()
    )
