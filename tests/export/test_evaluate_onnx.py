"""`train_net.py --eval-only --onnx FILE`: an exported model evaluated by detectron2's evaluators
as the eager model is, with the same results.json."""
import json
import sys

import solov2_d2  # isort: split

import pytest
from conftest import FRUIT_CONFIG, REPO, TINY, tiny_fruit_argv

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2.export.graph import export_onnx

pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install -e .[export]")
pytest.importorskip("onnxruntime", reason="ONNX inference needs onnxruntime")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny fruit model (conftest's TINY: short side 128, every cell kept) trained for 40
    iterations (about 25 s on 2 cores), enough to find some of the fruit, and exported with a
    candidate bound that keeps every (cell, class) pair: (checkpoint, ONNX file)."""
    folder = tmp_path_factory.mktemp("evaluate")
    train_net.main(
        train_net.argument_parser().parse_args(
            tiny_fruit_argv(folder, "SOLVER.MAX_ITER", "40", "SOLVER.BASE_LR", "0.01")
        )
    )
    weights = folder / "model_final.pth"
    cfg = get_cfg()
    solov2_d2.add_solov2_config(cfg)
    cfg.merge_from_file(FRUIT_CONFIG)
    cfg.merge_from_list(TINY + ["MODEL.WEIGHTS", str(weights)])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    cells = sum(g * g for g in cfg.MODEL.SOLOV2.NUM_GRIDS)
    path = export_onnx(
        model,
        str(folder / "model.onnx"),
        max_candidates=cells * cfg.MODEL.SOLOV2.NUM_CLASSES,
        cfg=cfg,
    )
    return weights, path


def evaluate(output_dir, weights, *flags, opts=()):
    """train_net.py --eval-only of the tiny fruit config with `flags` and then config `opts`:
    the results.json it writes."""
    argv = [*flags] + tiny_fruit_argv(
        output_dir, "MODEL.WEIGHTS", str(weights), *opts, eval_only=True
    )
    train_net.main(train_net.argument_parser().parse_args(argv))
    return json.loads((output_dir / "inference" / "results.json").read_text())


def test_onnx_evaluation_equals_the_eager_evaluation(trained, tmp_path):
    weights, path = trained
    eager = evaluate(tmp_path / "eager", weights)
    exported = evaluate(tmp_path / "onnx", weights, "--onnx", path)
    assert set(exported) == set(eager) == {"segm", "bbox"}
    # The model finds some of the fruit.
    assert eager["segm"]["AP50"] > 0
    for task in ("segm", "bbox"):
        assert set(exported[task]) == set(eager[task])
        for key, value in eager[task].items():
            # Within the export's tolerance (scores 1e-3, mask IoU 0.99, boxes 2 px): AP points.
            assert exported[task][key] == pytest.approx(value, abs=0.1, nan_ok=True), (task, key)
    predictions = [
        json.loads(
            (tmp_path / run / "inference" / "fruit_val" / "coco_instances_results.json")
            .read_text()
        )
        for run in ("eager", "onnx")
    ]
    assert len(predictions[0]) == len(predictions[1]) > 0
    scores = [sorted(d["score"] for d in p) for p in predictions]
    assert max(abs(a - b) for a, b in zip(*scores)) <= 1e-3


def test_test_time_augmentation_is_left_out_with_a_warning(trained, tmp_path, caplog):
    """The fruit config asks for TTA; an exported model (one view) is evaluated without it."""
    weights, path = trained
    tta = ("TEST.AUG.ENABLED", "True")
    onnx_run = evaluate(tmp_path / "onnx", weights, "--onnx", path, opts=tta)
    assert set(onnx_run) == {"segm", "bbox"}
    assert not (tmp_path / "onnx" / "inference_TTA").exists()
    assert "test-time augmentation (TEST.AUG.ENABLED) is not run" in caplog.text


def test_onnx_needs_eval_only(trained, tmp_path):
    weights, path = trained
    argv = ["--config-file", FRUIT_CONFIG, "--onnx", path, "OUTPUT_DIR", str(tmp_path)]
    argv += ["MODEL.WEIGHTS", str(weights), "SOLVER.MAX_ITER", "1"]
    with pytest.raises(ValueError, match=f"--onnx {path}: an exported model is only evaluated"):
        train_net.main(train_net.argument_parser().parse_args(argv))
