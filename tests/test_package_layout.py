"""The package's architecture: folders by concern whose imports run down, the inference pipeline
apart from the CPU's fast paths, and a default inference call that walks few modules."""
import ast
import os
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import torch
from conftest import REPO

import solov2_d2

PACKAGE = Path(solov2_d2.__file__).parent
# Each part may import only parts of a lower rank (and itself).
RANKS = {
    "compat": 0,
    "config": 0,
    "checks": 0,
    "layers": 1,
    "inference": 2,
    "data": 2,
    "modeling": 3,
    "engine": 4,
    "convert": 4,
    "export": 5,
    "__init__": 6,
}


def _imports() -> dict:
    """{module: set of package modules it imports}, dotted names relative to the package."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        here = parts[:-1]  # the module's package (for __init__ too)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - node.level + 1]
                module = base + (node.module.split(".") if node.module else [])
                if node.module is None:  # from . import x
                    targets.update(".".join(base + [a.name]) for a in node.names)
                else:
                    targets.add(".".join(module))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("solov2_d2."):
                targets.add(node.module[len("solov2_d2."):])
        graph[name] = {t for t in targets if t}
    return graph


def _part(module: str) -> str:
    return module.split(".")[0]


def test_imports_run_down_the_folders():
    wrong = [
        (a, b)
        for a, targets in _imports().items()
        for b in targets
        if _part(a) != _part(b) and RANKS[_part(b)] >= RANKS[_part(a)]
    ]
    assert not wrong, f"imports that run up or sideways: {wrong}"


def test_no_import_cycle():
    graph = _imports()
    known = set(graph)
    # An import of a package reaches its __init__ module, named as the package.
    edges = {a: {b for b in targets if b in known and b != a} for a, targets in graph.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges[node]:
            assert state.get(nxt) != "open", f"import cycle: {stack + [nxt]}"
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [node])


def test_the_pipeline_and_the_fast_paths_are_apart():
    """The pipeline neither imports the CPU's fast paths nor names their types; they do not
    import the pipeline."""
    graph = _imports()
    assert not [t for t in graph["inference.pipeline"] if t.startswith("inference.cpu")]
    for module, targets in graph.items():
        if module.startswith("inference.cpu"):
            assert "inference.pipeline" not in targets, module
    source = (PACKAGE / "inference" / "pipeline.py").read_text()
    for name in ("BlockBits", "MaskBlocks", "CPUCandidateMasks", "paste_cropped", "_int_mm"):
        assert name not in source


def test_a_default_cpu_inference_call_runs_code_in_at_most_10_modules():
    """SOLOv2Predictor on a photo at the input size (no resize: cropped pasting applies) under a
    forced load of 1000 compact candidates, with the default INFERENCE_PATH "auto": every fast
    path runs, in at most 10 of the package's modules."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from benchmark import ForcedCandidates
        from random_model import random_model_cfg
    finally:
        sys.path.remove(str(REPO / "bench"))
    cfg = random_model_cfg("configs/SOLOv2_R50_3x.yaml", "cpu")
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 480, 800
    torch.manual_seed(0)
    predictor = solov2_d2.SOLOv2Predictor(cfg, allow_incomplete_weights=True)
    ForcedCandidates(1000).attach(predictor.model)
    photo = cv2.imread(str(REPO / "datasets" / "fruit" / "0.jpg"))
    photo = cv2.resize(photo, (round(photo.shape[1] * 480 / photo.shape[0]), 480))
    predictor(photo)  # warm-up: imports and first-call set-up
    modules = set()

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(PACKAGE)):
            modules.add(os.path.relpath(frame.f_code.co_filename, PACKAGE))

    sys.setprofile(record)
    try:
        found = predictor(photo)["instances"]
    finally:
        sys.setprofile(None)
    assert len(found) == 100
    assert predictor.model.postprocessor.last_paths == {
        "scoring": "blocks",
        "intersections": "blocks",
        "kept masks": "blocks",
        "pasting": "cropped",
    }
    assert len(modules) <= 10, sorted(modules)
    by_folder = defaultdict(list)
    for m in modules:
        by_folder[os.path.dirname(m)].append(m)
    assert "inference/cpu" in by_folder and "inference" in by_folder
