"""End-to-end inference: DefaultPredictor, and the output format through detectron2's evaluators."""
import copy
import json

import cv2
import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_lvis_instances
from detectron2.engine import DefaultPredictor
from detectron2.evaluation import COCOEvaluator, LVISEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList

from solov2_d2.inference.pipeline import detections_to_instances, masks_to_boxes
from solov2_d2.modeling.meta_arch import NetworkPolicy

VAL = "coco_mini_val"


def _ground_truth_as_predictions(coco: COCO, image_id: int, to_label: dict, gt_boxes=False):
    """One image's non-crowd ground truth as model outputs, through the output path; with
    `gt_boxes`, the annotation boxes replace the boxes derived from the masks."""
    info = coco.imgs[image_id]
    anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
    masks = np.stack([coco.annToMask(a) for a in anns]) if anns else np.zeros((0, 1, 1))
    masks = torch.from_numpy(masks).bool().view(len(anns), info["height"], info["width"])
    classes = torch.tensor([to_label[a["category_id"]] for a in anns], dtype=torch.long)
    instances = detections_to_instances(masks, torch.ones(len(anns)), classes)
    if gt_boxes:
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).view(-1, 4)
        instances.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
    return instances


def _evaluate_ground_truth(gt_boxes):
    meta = MetadataCatalog.get(VAL)
    coco = COCO(meta.json_file)
    evaluator = COCOEvaluator(VAL, tasks=("segm", "bbox"), distributed=False, output_dir=None)
    evaluator.reset()
    for d in DatasetCatalog.get(VAL):
        instances = _ground_truth_as_predictions(
            coco, d["image_id"], meta.thing_dataset_id_to_contiguous_id, gt_boxes
        )
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    return evaluator.evaluate()


def test_ground_truth_through_the_output_path_scores_100_ap():
    """The output format end to end: classes, masks and boxes as the evaluator reads them."""
    results = _evaluate_ground_truth(gt_boxes=True)
    assert results["segm"]["AP"] == pytest.approx(100.0, abs=0.05)
    assert results["bbox"]["AP"] == pytest.approx(100.0, abs=0.05)


def test_boxes_from_ground_truth_masks_score_near_100_box_ap():
    """Boxes derived from the rasterised masks, as the model outputs them. COCO's boxes are the
    polygons' extents, a fraction of a pixel inside the rasterised masks' pixel edges, which
    costs the smallest objects the strictest IoU levels (measured: AP 96.7, AP50 100)."""
    results = _evaluate_ground_truth(gt_boxes=False)
    assert results["segm"]["AP"] == pytest.approx(100.0, abs=0.05)
    assert results["bbox"]["AP50"] == pytest.approx(100.0, abs=0.05)
    assert results["bbox"]["AP75"] > 99.0
    assert results["bbox"]["AP"] > 96.5


def _lvis_json_from_coco_mini(path):
    """coco_mini val in LVIS format (categories renumbered 1..80 as LVIS expects)."""
    coco = json.loads(open(MetadataCatalog.get(VAL).json_file).read())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    new_id = {c["id"]: i + 1 for i, c in enumerate(categories)}
    for c in coco["categories"]:
        c.update(id=new_id[c["id"]], frequency="f", synonyms=[c["name"]])
    for img in coco["images"]:
        img.update(
            coco_url="http://images.cocodataset.org/val2017/" + img["file_name"],
            not_exhaustive_category_ids=[],
            neg_category_ids=[],
        )
    coco["annotations"] = [a for a in coco["annotations"] if not a["iscrowd"]]
    for a in coco["annotations"]:
        a["category_id"] = new_id[a["category_id"]]
    path.write_text(json.dumps(coco))
    return coco


def test_lvis_evaluator_consumes_the_outputs(tmp_path):
    json_file = tmp_path / "lvis_mini_val.json"
    data = _lvis_json_from_coco_mini(json_file)
    name = "lvis_format_coco_mini_val"
    classes = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    if name not in DatasetCatalog.list():
        register_lvis_instances(name, {"thing_classes": classes}, str(json_file), str(tmp_path))
    coco = COCO(str(json_file))
    evaluator = LVISEvaluator(name, tasks=("segm", "bbox"), distributed=False, output_dir=None)
    evaluator.reset()
    to_label = {i + 1: i for i in range(len(classes))}
    for image_id in coco.getImgIds():
        instances = _ground_truth_as_predictions(coco, image_id, to_label)
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0, abs=0.05)
    assert results["bbox"]["AP50"] == pytest.approx(100.0, abs=0.05)


@pytest.fixture(scope="module")
def predictor_cfg():
    from conftest import small_solov2_cfg

    cfg = small_solov2_cfg(num_classes=80)
    # Untrained but with candidates: category scores start near 0.5, so the whole
    # post-processing path (masks, Matrix NMS, pasting) runs on every image.
    cfg.MODEL.SOLOV2.PRIOR_PROB = 0.5
    cfg.MODEL.SOLOV2.MAX_MASK_CANDIDATES = 100
    cfg.MODEL.SOLOV2.MAX_PER_IMAGE_TEST = 20
    # Small inputs keep 79 images fast on CPU; the odd-size test below covers full size.
    cfg.INPUT.MIN_SIZE_TEST = 192
    cfg.INPUT.MAX_SIZE_TEST = 320
    return cfg


def _check_output(out, h, w):
    inst = out["instances"]
    assert inst.image_size == (h, w)
    assert inst.pred_masks.shape[1:] == (h, w) and inst.pred_masks.dtype == torch.bool
    assert inst.scores.dtype == torch.float32 and inst.pred_classes.dtype == torch.int64
    assert torch.equal(inst.pred_boxes.tensor, masks_to_boxes(inst.pred_masks))


def test_default_predictor_on_every_coco_mini_val_image(predictor_cfg):
    torch.manual_seed(0)
    predictor = DefaultPredictor(predictor_cfg)
    counts = []
    for d in DatasetCatalog.get(VAL):
        image = cv2.imread(d["file_name"])
        out = predictor(image)
        _check_output(out, *image.shape[:2])
        counts.append(len(out["instances"]))
    assert sum(counts) > 0


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (800, 1333)])
def test_default_predictor_on_odd_sizes(predictor_cfg, size):
    torch.manual_seed(0)
    cfg = copy.deepcopy(predictor_cfg)
    cfg.INPUT.MIN_SIZE_TEST = 0  # no resizing: the network sees the odd size itself
    predictor = DefaultPredictor(cfg)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    _check_output(predictor(image), *size)


def test_rgb_and_bgr_formats_agree(predictor_cfg):
    torch.manual_seed(0)
    bgr = DefaultPredictor(predictor_cfg)
    cfg = copy.deepcopy(predictor_cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = predictor_cfg.MODEL.PIXEL_MEAN[::-1]
    cfg.MODEL.PIXEL_STD = predictor_cfg.MODEL.PIXEL_STD[::-1]
    rgb = DefaultPredictor(cfg)
    rgb.model.load_state_dict(bgr.model.state_dict())
    # The same weights see the same normalised image only if each predictor is given its own
    # channel order; a wrong order would change the result.
    with torch.no_grad():
        conv = rgb.model.backbone.bottom_up.stem.conv1
        conv.weight.copy_(conv.weight.flip(1))
    image = cv2.imread(DatasetCatalog.get(VAL)[0]["file_name"])
    a, b = bgr(image)["instances"], rgb(image)["instances"]
    assert len(a) > 0
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3


def test_grayscale_works_and_four_channels_fail_clearly(predictor_cfg):
    predictor = DefaultPredictor(predictor_cfg)
    gray = np.full((64, 80, 1), 128, dtype=np.uint8)
    _check_output(predictor(gray), 64, 80)
    with pytest.raises(ValueError, match="COLOR_BGRA2BGR"):
        predictor(np.zeros((64, 80, 4), dtype=np.uint8))


def test_cpu_inference_is_channels_last_with_the_same_results(predictor_cfg):
    """CPU inference runs the network on channels-last tensors (faster oneDNN convolutions);
    its outputs equal those of the NCHW layout up to float rounding."""
    torch.manual_seed(0)
    model = build_model(predictor_cfg).eval()
    seen = {}
    hooks = [
        model.backbone.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
        model.mask_head.register_forward_hook(lambda m, args, out: seen.update(out=out)),
    ]
    inputs = [{"image": torch.randint(0, 256, (3, 192, 256), dtype=torch.uint8)}]
    with torch.no_grad():
        model(inputs)
        for hook in hooks:
            hook.remove()
        images = ImageList.from_tensors(model.preprocess_image(inputs), 32)
        features = model.backbone(images.tensor)
        expected = model.mask_head([features[f] for f in model.mask_in_features])
    assert seen["x"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-4, atol=1e-4)


def _fruit_inputs(sizes):
    """Real photos (fruit val) resized to `sizes`, as DatasetMapper gives them: uint8 BGR CHW."""
    files = sorted(d["file_name"] for d in DatasetCatalog.get("fruit_val"))
    inputs = []
    for file, (h, w) in zip(files, sizes):
        image = cv2.resize(cv2.imread(file), (w, h), interpolation=cv2.INTER_AREA)
        inputs.append({"image": torch.from_numpy(image.transpose(2, 0, 1).copy())})
    return inputs


def test_an_image_gets_identical_instances_alone_and_in_any_batch(predictor_cfg):
    """On the CPU the network sees one image at a time, over its own padded extent, and the
    post-processing keeps each image to that extent: identical instances alone and batched."""
    torch.manual_seed(0)
    model = build_model(predictor_cfg).eval()
    inputs = _fruit_inputs([(512, 512), (375, 500), (333, 250)])
    batch_sizes = []
    model.backbone.register_forward_pre_hook(lambda m, args: batch_sizes.append(len(args[0])))
    with torch.no_grad():
        batched = model(inputs)
        reversed_batch = model(inputs[::-1])[::-1]
        alone = [model([x])[0] for x in inputs]
    assert batch_sizes[:3] == [1, 1, 1]
    assert all(len(r["instances"]) > 0 for r in alone)
    for results in (batched, reversed_batch):
        for ours, ref in zip(results, alone):
            ours, ref = ours["instances"], ref["instances"]
            assert torch.equal(ours.scores, ref.scores)
            assert torch.equal(ours.pred_classes, ref.pred_classes)
            assert torch.equal(ours.pred_masks, ref.pred_masks)


def test_batched_network_policy_runs_the_whole_batch_at_once(predictor_cfg):
    """The policy used off the CPU: one padded batch through the network. The grids then cover
    the batch's padded extent, so a smaller image's detections differ from its own."""
    torch.manual_seed(0)
    model = build_model(predictor_cfg).eval()
    model.network_policy = NetworkPolicy(per_image=False, channels_last=False)
    inputs = _fruit_inputs([(320, 320), (256, 320)])
    batch_sizes = []
    model.backbone.register_forward_pre_hook(lambda m, args: batch_sizes.append(len(args[0])))
    with torch.no_grad():
        batched = model(inputs)
        alone = model(inputs[:1])
    assert batch_sizes == [2, 1]
    # The largest image fills the padded batch: its grids and detections are its own.
    a, b = batched[0]["instances"], alone[0]["instances"]
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    assert (a.pred_masks != b.pred_masks).float().mean() < 1e-4
    assert batched[1]["instances"].image_size == (256, 320)
