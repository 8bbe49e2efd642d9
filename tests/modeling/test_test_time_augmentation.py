"""SOLOv2WithTTA: exactly the plain model with the identity view, the geometry of a flipped
view, valid Instances from several views, the predictor, and train_net.py's TTA evaluation."""
import json
import sys

import cv2
import pytest
import torch
from conftest import REPO, small_solov2_cfg, tiny_fruit_argv

import detectron2.data.transforms as T
from detectron2.modeling import build_model

from solov2_d2 import SOLOv2Predictor
from solov2_d2.inference.masks import masks_to_boxes
from solov2_d2.modeling.test_time_augmentation import SOLOv2WithTTA, _to_frame

sys.path.insert(0, str(REPO / "bench"))
try:
    from benchmark import ForcedCandidates
finally:
    sys.path.remove(str(REPO / "bench"))
sys.path.insert(0, str(REPO))
import train_net  # noqa: E402

# Inputs of 160 x 224 (a multiple of the backbone's 32 on both sides), from a 600 x 800 photo.
SIZE = (160, 224)


def _cfg(path="auto"):
    cfg = small_solov2_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = SIZE[0], 256
    cfg.MODEL.SOLOV2.INFERENCE_PATH = path
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE, cfg.TEST.AUG.FLIP = (SIZE[0],), 256, False
    return cfg


def _model(cfg, candidates=300, heavy=False):
    """A random-weight model under a forced load of compact candidates (near-duplicates), or
    with `heavy` of noisy masks (fragmented)."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ForcedCandidates(candidates, heavy=heavy).attach(model)
    return model


def _photo(name="0.jpg"):
    return cv2.imread(str(REPO / "datasets" / "fruit" / name))  # BGR, 600 x 800


def _input(photo):
    """The test mapper's dict: the photo resized to SIZE, output at the photo's size."""
    image = cv2.resize(photo, SIZE[::-1], interpolation=cv2.INTER_LINEAR)
    tensor = torch.as_tensor(image.transpose(2, 0, 1).copy())
    return {"image": tensor, "height": photo.shape[0], "width": photo.shape[1]}


def _assert_same(a, b):
    assert a.image_size == b.image_size
    assert len(a) > 0
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_masks, b.pred_masks)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


@pytest.mark.parametrize("path, box_from", [("plain", "tight"), ("fast", "main_parts")])
def test_the_identity_view_gives_exactly_the_plain_models_instances(path, box_from):
    cfg = _cfg(path)
    cfg.MODEL.SOLOV2.BOX_FROM = box_from
    # Main parts: fragmented masks, whose boxes differ from the tight ones.
    model = _model(cfg, heavy=box_from == "main_parts")
    inputs = [_input(_photo("0.jpg")), _input(_photo("1.jpg"))]
    plain = model(inputs)
    augmented = SOLOv2WithTTA(cfg, model)(inputs)
    assert len(augmented) == 2
    for a, b in zip(plain, augmented):
        _assert_same(a["instances"], b["instances"])
    if box_from == "main_parts":
        instances = plain[0]["instances"]
        assert not torch.equal(instances.pred_boxes.tensor, masks_to_boxes(instances.pred_masks))


class _FlipOnly:
    """A TTA mapper whose one view is the mirrored input (at its size)."""

    def __call__(self, dataset_dict):
        image = dataset_dict["image"]
        flip = T.HFlipTransform(image.shape[2])
        view = dict(dataset_dict, image=image.flip(2), transforms=T.TransformList([flip]))
        return [view]


def test_a_flipped_views_masks_are_mirrored_back():
    """The forced load depends only on the input's shape, so the flipped view has the plain
    model's detections, mirrored: mapped back, they are the plain masks mirrored."""
    cfg = _cfg()
    model = _model(cfg)
    x = _input(_photo())
    x["height"], x["width"] = SIZE  # no resize to the output: pixel-exact mirror images
    plain = model([x])[0]["instances"]
    flipped = SOLOv2WithTTA(cfg, model, tta_mapper=_FlipOnly())([x])[0]["instances"]
    assert len(plain) > 0
    assert torch.equal(flipped.pred_classes, plain.pred_classes)
    torch.testing.assert_close(flipped.scores, plain.scores)
    assert torch.equal(flipped.pred_masks, plain.pred_masks.flip(2))


@pytest.mark.parametrize("flipped", [False, True])
def test_masks_are_resampled_through_the_fractions_of_the_image(flipped):
    """A mask that is linear in the image's fractions (u, v) at a view's pixel centres is that
    function at the frame's pixel centres (bilinear sampling reproduces it inside the map); a
    flipped view's mask is read mirrored, v -> 1 - v."""
    stride, view, frame, extent = 4, (96, 136), (64, 88), (16, 22)

    def linear(size, rows, cols, mirrored=False):
        u = (torch.arange(rows) + 0.5) * stride / size[0]
        v = (torch.arange(cols) + 0.5) * stride / size[1]
        v = 1 - v if mirrored else v
        return 0.2 + 0.3 * u[:, None] + 0.4 * v[None, :]

    probs = linear(view, 24, 34, mirrored=flipped)[None].repeat(2, 1, 1)
    out = _to_frame(probs, view, flipped, frame, extent, stride)
    assert out.shape == (2, *extent)
    expected = linear(frame, *extent)
    # Away from the map's border, where bilinear sampling has neighbours on both sides.
    torch.testing.assert_close(out[:, 1:-1, 1:-1], expected[None, 1:-1, 1:-1].expand(2, -1, -1))


def test_several_views_with_flips_give_valid_instances():
    cfg = _cfg()
    cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE = (128, 160, 192), 300
    cfg.TEST.AUG.FLIP = True
    cfg.MODEL.SOLOV2.MAX_PER_IMAGE_TEST = 50
    model = _model(cfg)
    photo = _photo()
    tta = SOLOv2WithTTA(cfg, model)
    views = tta.tta_mapper(_input(photo))
    assert [tuple(v["image"].shape[1:]) for v in views] == [(128, 179), (128, 179), (160, 224),
                                                            (160, 224), (192, 269), (192, 269)]
    out = tta([_input(photo)])[0]["instances"]
    plain = model([_input(photo)])[0]["instances"]
    assert out.image_size == photo.shape[:2]
    assert 0 < len(out) <= 50
    assert out.pred_masks.dtype == torch.bool and out.pred_masks.shape[1:] == photo.shape[:2]
    assert out.scores.dtype == torch.float32 and out.pred_classes.dtype == torch.int64
    assert torch.all(out.scores[:-1] >= out.scores[1:]) and torch.all(out.scores > 0)
    assert torch.all((out.pred_classes >= 0) & (out.pred_classes < 3))
    assert torch.equal(out.pred_boxes.tensor, masks_to_boxes(out.pred_masks))
    assert out.pred_masks.flatten(1).any(dim=1).all()
    # The views add candidates: the merged detections are not the identity view's.
    assert not (len(out) == len(plain) and torch.equal(out.scores, plain.scores))


def test_the_predictor_runs_it_as_its_model():
    cfg = _cfg()
    predictor = SOLOv2Predictor(cfg, allow_incomplete_weights=True)
    ForcedCandidates(200).attach(predictor.model)
    photo = cv2.resize(_photo(), (300, 225))
    plain = predictor(photo)["instances"]
    predictor.model = SOLOv2WithTTA(cfg, predictor.model)
    _assert_same(plain, predictor(photo)["instances"])


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("MIN_SIZES", (), r"TEST.AUG.MIN_SIZES = \(\); expected one or more"),
        ("MIN_SIZES", (0, 800), r"TEST.AUG.MIN_SIZES = \(0, 800\); expected"),
        ("MAX_SIZE", 0, r"TEST.AUG.MAX_SIZE = 0; expected"),
    ],
)
def test_meaningless_settings_are_refused_naming_the_key(key, value, message):
    cfg = _cfg()
    cfg.TEST.AUG[key] = value
    with pytest.raises(ValueError, match=message):
        SOLOv2WithTTA(cfg, build_model(cfg))


def test_train_net_eval_only_evaluates_with_and_without_it(tmp_path):
    """--eval-only with TEST.AUG.ENABLED and the identity view (the tiny fruit config's 128 /
    192): two evaluations, the second's results keyed "_TTA" and written under inference_TTA,
    with the same predictions."""
    argv = tiny_fruit_argv(
        tmp_path, "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(128,)",
        "TEST.AUG.MAX_SIZE", "192", "TEST.AUG.FLIP", "False", eval_only=True,
    )  # fmt: skip
    args = train_net.argument_parser().parse_args(argv)
    args.eval_incomplete_weights = True  # a random model: every cell is kept (conftest.TINY)
    results = train_net.main(args)
    assert {"segm", "bbox", "segm_TTA", "bbox_TTA"} <= set(results)
    written = json.loads((tmp_path / "inference_TTA" / "results.json").read_text())
    assert set(written) == {"segm_TTA", "bbox_TTA"}
    # json.dumps: the metrics hold NaN (no small objects), which equals nothing.
    assert json.dumps(written, sort_keys=True) == json.dumps(
        {k: results[k] for k in written}, sort_keys=True
    )
    predictions = [
        json.loads((tmp_path / folder / "fruit_val" / "coco_instances_results.json").read_text())
        for folder in ("inference", "inference_TTA")
    ]
    assert predictions[0] and predictions[1] == predictions[0]
    for task in ("segm", "bbox"):
        assert json.dumps(results[f"{task}_TTA"]) == json.dumps(results[task])


def test_training_evaluates_with_it_after_the_plain_evaluation(tmp_path):
    argv = tiny_fruit_argv(tmp_path, "TEST.AUG.ENABLED", "True", "SOLVER.MAX_ITER", "1")
    trainer = train_net.Trainer(train_net.setup(train_net.argument_parser().parse_args(argv)))
    evaluations = [h for h in trainer._hooks if type(h).__name__ == "EvalHook"]
    assert len(evaluations) == 2
    names = [type(h).__name__ for h in trainer._hooks]
    assert names.index("PeriodicWriter") > max(i for i, n in enumerate(names) if n == "EvalHook")
    called = []
    trainer.test_with_TTA = lambda cfg, model: called.append(model) or {}
    evaluations[1]._func()
    assert called == [trainer.model]
