"""ONNX export (solov2_d2.export): the whole model, exported once per module through the command
line, runs in ONNX Runtime and agrees with eager PyTorch on the fruit photos."""
import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import solov2_d2  # isort: split

import cv2
import numpy as np
import pytest
import torch
from conftest import FRUIT_CONFIG, REPO

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from solov2_d2.export import OnnxPredictor, SOLOv2ExportModule, require_export_packages
from solov2_d2.export.__main__ import main as export_main
from solov2_d2.export.graph import INPUT_NAMES, MIN_OPSET, OUTPUT_NAMES, export_onnx
from solov2_d2.modeling.meta_arch import NetworkPolicy

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install -e .[export]")
onnxruntime = pytest.importorskip(
    "onnxruntime", reason="ONNX inference needs onnxruntime: pip install -e .[export]"
)
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install -e .[export]")

sys.path.insert(0, str(REPO))
import demo  # noqa: E402

# A seeded random fruit model with the category prior raised, so that a few dozen cells of a
# photo pass the score threshold, and with larger dynamic kernels, so that mask probabilities
# are rarely within rounding of the mask threshold (as a trained model's). With more candidates,
# its many overlapping random masks of near-equal scores make Matrix NMS amplify rounding.
CATEGORY_BIAS = -3.0
KERNEL_SCALE = 30.0


def fruit_cfg():
    cfg = get_cfg()
    solov2_d2.add_solov2_config(cfg)
    cfg.merge_from_file(FRUIT_CONFIG)
    return cfg


def candidate_rich_model(cfg):
    """The random model of `cfg` (seed 0) with a raised category prior and scaled kernels: many
    candidates with object-like masks."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.ins_head.cate_pred.bias.fill_(CATEGORY_BIAS)
        model.ins_head.kernel_pred.weight.mul_(KERNEL_SCALE)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The model saved as a checkpoint and exported by `python -m solov2_d2.export`."""
    folder = tmp_path_factory.mktemp("export")
    cfg = fruit_cfg()
    model = candidate_rich_model(cfg)
    # Eager batches run as the graph does: the padded batch at once (as on CUDA).
    model.network_policy = NetworkPolicy(per_image=False, channels_last=False)
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    cfg.MODEL.WEIGHTS = str(folder / "model.pth")
    command = [sys.executable, "-m", "solov2_d2.export", "--config-file", FRUIT_CONFIG]
    command += ["--output", str(folder / "onnx"), "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    path = str(folder / "onnx" / "model.onnx")
    predictor = OnnxPredictor(cfg, path)
    return SimpleNamespace(cfg=cfg, model=model.eval(), path=path, predictor=predictor)


def photos():
    return [cv2.imread(d["file_name"]) for d in DatasetCatalog.get("fruit_val")]


def model_input(image_bgr, height, width):
    """A dataset dict of the BGR photo resized to (height, width), output at the photo's size."""
    image = cv2.resize(image_bgr, (width, height)).astype(np.float32).transpose(2, 0, 1)
    output_height, output_width = image_bgr.shape[:2]
    return {"image": torch.from_numpy(image), "height": output_height, "width": output_width}


def assert_same_instances(onnx_result, eager_result):
    """Same detections: each exported instance has its own eager instance of the same class
    (matched by mask IoU: scores within rounding of each other may come in either order), every
    mask IoU >= 0.99, |d score| <= 1e-4 for nearly all.

    A few scores may differ by up to 1e-3: the random model's masks have many probabilities
    within rounding of the mask threshold, and its many overlapping same-class masks make
    Matrix NMS turn the flipped pixels' IoU changes into decay changes.
    """
    a, b = onnx_result["instances"], eager_result["instances"]
    assert a.image_size == b.image_size
    assert len(a) == len(b) > 0
    masks_a, masks_b = a.pred_masks.flatten(1).float(), b.pred_masks.flatten(1).float()
    inter = masks_a @ masks_b.T
    iou = inter / (masks_a.sum(1)[:, None] + masks_b.sum(1)[None] - inter).clamp(min=1)
    iou *= a.pred_classes[:, None] == b.pred_classes[None]
    best, match = iou.max(dim=1)
    assert match.unique().numel() == len(a)
    assert best.min() >= 0.99
    score_error = (a.scores - b.scores[match]).abs()
    assert (score_error <= 1e-4).float().mean() >= 0.95 and score_error.max() <= 1e-3
    assert (a.pred_boxes.tensor - b.pred_boxes.tensor[match]).abs().max() <= 2


def test_the_command_writes_one_file_with_dynamic_batch_and_size(exported):
    model = onnx.load(exported.path)
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert [x.name for x in model.graph.input] == list(INPUT_NAMES)
    assert [x.name for x in model.graph.output] == list(OUTPUT_NAMES)
    images = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert images[0] and images[2] and images[3]  # batch, height and width are symbols
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata["solov2.size_divisibility"] == "32"
    assert metadata["solov2.max_candidates"] == "1000"
    # What using the graph depends on: the export's input format, test sizes and classes.
    assert metadata["solov2.input_format"] == "BGR"
    assert (metadata["solov2.min_size_test"], metadata["solov2.max_size_test"]) == ("288", "640")
    assert metadata["solov2.num_classes"] == "3"
    assert json.loads(metadata["solov2.thing_classes"]) == ["date", "fig", "hazelnut"]
    assert (metadata["solov2.box_from"], metadata["solov2.box_min_part_fraction"]) == (
        "main_parts",
        "0.1",
    )
    # Weights inside: nothing but the file itself was written.
    assert sorted(p.name for p in (REPO / exported.path).parent.iterdir()) == ["model.onnx"]


def test_batch_of_one_matches_default_predictor_on_photos(exported):
    eager = DefaultPredictor(exported.cfg)
    for image in photos():
        assert_same_instances(exported.predictor(image), eager(image))


def test_batch_of_three_sizes_matches_the_eager_batch(exported):
    model = exported.model
    sizes = [(288, 384), (224, 320), (320, 352)]
    inputs = [model_input(p, *s) for p, s in zip(photos(), sizes)]
    with torch.no_grad():
        eager = model.inference(inputs)
    for onnx_result, eager_result in zip(exported.predictor.inference(inputs), eager):
        assert_same_instances(onnx_result, eager_result)


def test_one_file_runs_two_input_sizes(exported):
    session = onnxruntime.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    # A lower bound than the file's 1000 computes less, with the same results below it.
    module = SOLOv2ExportModule(exported.model, max_candidates=300)
    for height, width in [(256, 352), (320, 448)]:
        images = model_input(photos()[1], height, width)["image"][None]
        sizes = torch.tensor([[height - 5, width - 20]])  # padding that the graph ignores
        outputs = session.run(None, dict(zip(INPUT_NAMES, (images.numpy(), sizes.numpy()))))
        with torch.no_grad():
            expected = module(images, sizes)
        assert outputs[2].shape == (1, 100, height // 4, width // 4)
        assert outputs[4][0] == expected.count[0] > 0 and expected.num_candidates[0] <= 300
        n = int(expected.count[0])
        np.testing.assert_allclose(outputs[0][0, :n], expected.scores[0, :n], atol=1e-4)
        np.testing.assert_array_equal(outputs[1][0, :n], expected.classes[0, :n])
        np.testing.assert_allclose(outputs[2][0, :n], expected.masks[0, :n], atol=1e-3)
        np.testing.assert_allclose(outputs[3][0, :n], expected.boxes[0, :n], atol=4)
        assert (outputs[3][0, :n, 2:] <= sizes.flip(1).numpy()).all()


def test_an_image_without_detections_gives_empty_outputs(exported):
    # The pixel mean normalises to 0, and a zero input gives the prior everywhere, below the
    # score threshold.
    mean = exported.model.pixel_mean.expand(3, 224, 288).clone()
    blank = {"image": mean, "height": 300, "width": 400}
    photo = model_input(photos()[0], 288, 384)
    with torch.no_grad():
        eager = exported.model.inference([blank, photo])
    results = exported.predictor.inference([blank, photo])
    empty = results[0]["instances"]
    assert len(empty) == len(eager[0]["instances"]) == 0
    assert empty.pred_masks.shape == (0, 300, 400) and empty.pred_masks.dtype == torch.bool
    assert empty.pred_boxes.tensor.shape == (0, 4) and empty.scores.shape == (0,)
    assert_same_instances(results[1], eager[1])

    session = exported.predictor.session
    images = mean[None].numpy()
    outputs = session.run(None, dict(zip(INPUT_NAMES, (images, np.array([[224, 288]])))))
    assert outputs[4].tolist() == [0] and outputs[5].tolist() == [0]
    assert outputs[0].shape == (1, 100) and (outputs[1] == -1).all()
    assert outputs[2].shape == (1, 100, 56, 72) and (outputs[2] == 0).all()


def test_the_candidate_bound_changes_nothing_for_images_within_it(exported):
    module = SOLOv2ExportModule(exported.model, max_candidates=300)
    images = model_input(photos()[2], 288, 384)["image"][None]
    sizes = torch.tensor([[288, 384]])
    with torch.no_grad():
        wide = module(images, sizes)
        count = int(wide.num_candidates[0])
        assert 10 < count < 300
        exact = SOLOv2ExportModule(exported.model, max_candidates=count)(images, sizes)
        narrow = SOLOv2ExportModule(exported.model, max_candidates=count // 2)(images, sizes)
    n = int(wide.count[0])
    assert exact.count[0] == n > 0
    for a, b in zip(wide, exact):  # per image min(bound, max_per_image) entries, or a count
        assert torch.equal(a[:, :n], b[:, :n]) if a.dim() > 1 else torch.equal(a, b)
    assert narrow.num_candidates[0] == count  # the runtime's cue that candidates were cut
    assert not torch.equal(narrow.scores, wide.scores)


def test_the_predictor_warns_when_an_image_has_more_candidates_than_the_bound(
    exported, caplog
):
    predictor = OnnxPredictor(exported.cfg, exported.path)
    predictor.max_candidates = 10  # as if exported with --max-candidates 10
    with caplog.at_level(logging.WARNING, logger="solov2_d2.export.predictor"):
        predictor(photos()[0])
    assert "more than the graph's bound of 10" in caplog.text


def test_demo_runs_the_exported_model(exported, tmp_path):
    image_path = DatasetCatalog.get("fruit_val")[0]["file_name"]
    args = demo.get_parser().parse_args(
        ["--config-file", FRUIT_CONFIG, "--input", image_path, "--output", str(tmp_path)]
        + ["--onnx", exported.path, "--confidence-threshold", "0.1"]
    )
    outputs = demo.main(args)
    picture, image = cv2.imread(outputs[0]), cv2.imread(image_path)
    assert picture.shape == image.shape
    assert np.abs(picture.astype(int) - image.astype(int)).mean() > 1


def test_missing_packages_name_the_extra():
    with pytest.raises(ImportError, match=r"no_such_package.*pip install -e \.\[export\]"):
        require_export_packages("onnx", "no_such_package")


@pytest.mark.parametrize(
    "key, value",
    [("INPUT.FORMAT", "RGB"), ("INPUT.MIN_SIZE_TEST", 320), ("INPUT.MAX_SIZE_TEST", 800)],
)
def test_the_predictor_refuses_a_config_that_disagrees_with_the_export(exported, key, value):
    cfg = exported.cfg.clone()
    exported_value = cfg[key.split(".")[0]][key.split(".")[1]]
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError) as e:
        OnnxPredictor(cfg, exported.path)
    assert f"{exported.path} was exported with {key} {exported_value!r}" in str(e.value)
    assert f"but the config has {key} {value!r}" in str(e.value)


def test_the_boxes_are_those_the_file_records(exported, tmp_path):
    """The runtime draws the boxes from the pasted masks as the file records: the fruit config's
    main parts (eager's boxes: the tests above), or, in a copy of the file that records
    "tight", eager's tight boxes, which on these fragmented random masks are not all the main
    parts' boxes; a config with the other setting is refused."""
    model = onnx.load(exported.path)
    for p in model.metadata_props:
        if p.key == "solov2.box_from":
            p.value = "tight"
    path = str(tmp_path / "tight.onnx")
    onnx.save(model, path)
    cfg = exported.cfg.clone()
    cfg.MODEL.SOLOV2.BOX_FROM = "tight"
    tight, eager = OnnxPredictor(cfg, path), DefaultPredictor(cfg)
    narrowed = 0
    for image in photos():
        ours = tight(image)
        assert_same_instances(ours, eager(image))
        main_parts = exported.predictor(image)["instances"].pred_boxes.tensor
        narrowed += int((ours["instances"].pred_boxes.tensor != main_parts).any(dim=1).sum())
    assert narrowed > 0
    with pytest.raises(ValueError, match="MODEL.SOLOV2.BOX_FROM 'tight'.*'main_parts'"):
        OnnxPredictor(exported.cfg, path)


def test_a_file_exported_before_the_config_was_recorded_uses_the_config(exported, tmp_path):
    model = onnx.load(exported.path)
    recorded = ("_test", "_format", "classes", "box_from", "fraction")
    kept = [p for p in model.metadata_props if not p.key.endswith(recorded)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = str(tmp_path / "old.onnx")
    onnx.save(model, old)
    cfg = exported.cfg.clone()
    cfg.merge_from_list(["INPUT.FORMAT", "RGB", "INPUT.MIN_SIZE_TEST", 320])
    predictor = OnnxPredictor(cfg, old)
    assert predictor.input_format == "RGB" and tuple(predictor.aug.short_edge_length) == (320, 320)
    assert predictor.thing_classes is None
    assert predictor.metadata.name == "fruit_val"  # the config's test dataset
    # The recorded values are the ones used by the current file.
    current = OnnxPredictor(exported.cfg, exported.path)
    assert current.input_format == "BGR" and tuple(current.aug.short_edge_length) == (288, 288)


def test_no_inputs_give_no_results_and_an_empty_output_size_is_refused(exported):
    assert exported.predictor.inference([]) == []
    photo = model_input(photos()[0], 224, 288)
    empty = dict(photo, height=0, width=0)
    with pytest.raises(ValueError, match="Input 1: output size 0 x 0"):
        exported.predictor.inference([photo, empty])


def test_demo_labels_with_the_classes_the_exported_model_records(exported, tmp_path, monkeypatch):
    """A config whose test dataset has COCO's classes: the fruit model's detections are still
    drawn with the fruit names."""
    drawn = []

    def draw(image, instances, metadata, threshold):
        drawn.append(metadata)
        return image[:, :, ::-1]

    monkeypatch.setattr(demo, "draw_predictions", draw)
    image_path = DatasetCatalog.get("fruit_val")[0]["file_name"]
    assert len(MetadataCatalog.get("coco_2017_val").thing_classes) == 80
    args = demo.get_parser().parse_args(
        ["--config-file", FRUIT_CONFIG, "--input", image_path, "--output", str(tmp_path)]
        + ["--onnx", exported.path, "--opts", "DATASETS.TEST", "('coco_2017_val',)"]
    )
    demo.main(args)
    assert [m.thing_classes for m in drawn] == [["date", "fig", "hazelnut"]]


def test_opsets_below_the_lowest_supported_are_refused_before_exporting(tmp_path, capsys):
    output = tmp_path / "onnx"
    argv = ["--config-file", FRUIT_CONFIG, "--output", str(output), "--opset", "9"]
    with pytest.raises(SystemExit):
        export_main(argv + ["MODEL.WEIGHTS", str(tmp_path / "absent.pth")])
    err = capsys.readouterr().err
    assert f"argument --opset: opset 9 is below {MIN_OPSET}, the lowest opset the export" in err
    assert not output.exists()
    with pytest.raises(ValueError, match=f"opset {MIN_OPSET - 1} is below {MIN_OPSET}"):
        export_onnx(build_model(fruit_cfg()), str(tmp_path / "model.onnx"), opset=MIN_OPSET - 1)
    assert list(tmp_path.iterdir()) == []
