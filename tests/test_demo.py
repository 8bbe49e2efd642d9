"""demo.py: pictures of the predictions, one per input image, of the input's size; never over an
input or another picture; images that cannot be read or resized are reported and skipped."""
import logging
import shutil
import subprocess
import sys

import solov2_d2  # noqa: F401  # isort: split

import cv2
import numpy as np
import pytest
import torch
from conftest import FRUIT, FRUIT_CONFIG, REPO, TINY, copy_fruit
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image as detectron2_read_image
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config
from solov2_d2.engine.predictor import SOLOv2Predictor

sys.path.insert(0, str(REPO))
import demo  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A just-initialised model of the tiny fruit config, saved as a checkpoint."""
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(FRUIT_CONFIG)
    cfg.merge_from_list(TINY)
    folder = tmp_path_factory.mktemp("weights")
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save("model")
    return str(folder / "model.pth")


def test_demo_draws_predictions_on_pictures_of_the_input_size(weights, tmp_path):
    image_path = DatasetCatalog.get("fruit_val")[0]["file_name"]
    args = demo.get_parser().parse_args(
        ["--config-file", FRUIT_CONFIG, "--input", image_path, "--output", str(tmp_path)]
        + ["--confidence-threshold", "0", "--opts", "MODEL.WEIGHTS", weights]
        + TINY
    )
    outputs = demo.main(args)
    assert outputs == [str(tmp_path / "14.jpg")]
    picture = cv2.imread(outputs[0])
    image = cv2.imread(image_path)
    assert picture.shape == image.shape
    # TINY keeps every cell: masks, boxes and labels are drawn over the photo.
    assert np.abs(picture.astype(int) - image.astype(int)).mean() > 1


def test_inputs_are_files_folders_or_globs(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert demo.list_images([str(tmp_path)]) == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    assert demo.list_images([str(tmp_path / "*.jpg")]) == [str(tmp_path / "b.jpg")]
    assert demo.list_images([str(tmp_path / "notes.txt")]) == [str(tmp_path / "notes.txt")]
    with pytest.raises(FileNotFoundError, match="missing"):
        demo.list_images([str(tmp_path / "missing*.jpg")])


def test_demo_needs_local_trained_weights():
    for weights, message in (("", "needs trained weights"), ("https://x/y.pth", "never downloads")):
        args = demo.get_parser().parse_args(
            ["--config-file", FRUIT_CONFIG, "--input", "x.jpg", "--output", "out"]
            + ["--opts", "MODEL.WEIGHTS", weights]
        )
        with pytest.raises(ValueError, match=message):
            demo.setup_cfg(args)


@pytest.fixture
def demo_log(caplog):
    """`caplog`, also given the records of the demo's logger (detectron2's setup_logger stops
    them at that logger)."""
    logger = logging.getLogger("solov2_demo")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_an_unreadable_image_is_reported_and_the_others_are_drawn(weights, tmp_path, demo_log):
    folder = copy_fruit(tmp_path / "photos", ["14", "15"])
    truncated = folder / "14.jpg"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    out = tmp_path / "out"
    args = demo.get_parser().parse_args(
        ["--config-file", FRUIT_CONFIG, "--input", str(folder), "--output", str(out)]
        + ["--opts", "MODEL.WEIGHTS", weights]
        + TINY
    )
    assert demo.main(args) == [None, str(out / "15.jpg")]
    assert (
        f"Skipped: Cannot read the image {truncated}: OSError: image file is truncated"
        in demo_log.text
    )
    assert cv2.imread(str(out / "15.jpg")).shape == (600, 800, 3)


def _demo_args(inputs, output, weights):
    return demo.get_parser().parse_args(
        ["--config-file", FRUIT_CONFIG, "--input", *map(str, inputs), "--output", str(output)]
        + ["--confidence-threshold", "0", "--opts", "MODEL.WEIGHTS", weights]
        + TINY
    )


def test_output_folder_of_the_inputs_is_refused(weights, tmp_path):
    """--output the input folder would replace the photos with the pictures (exit status 0)."""
    folder = copy_fruit(tmp_path / "photos", ["14", "15"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    message = (
        f"The picture of {folder / '14.jpg'} would be written over the input "
        f"{folder / '14.jpg'}: give an --output folder other than the inputs' folders"
    )
    with pytest.raises(ValueError, match=message):
        demo.main(_demo_args([folder], folder, weights))
    # Also as a command (refused before the model is built), and with a path spelt otherwise.
    argv = [sys.executable, str(REPO / "demo.py")]
    argv += vars_to_argv(_demo_args([folder / "15.jpg"], tmp_path / "photos" / ".", weights))
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert f"would be written over the input {folder / '15.jpg'}" in result.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def vars_to_argv(args):
    """demo.py's command-line arguments for parsed `args`."""
    argv = ["--config-file", args.config_file, "--input", *args.input, "--output", args.output]
    argv += ["--confidence-threshold", str(args.confidence_threshold)]
    return argv + ["--opts", *args.opts]


def test_inputs_of_the_same_name_get_distinct_pictures(weights, tmp_path, demo_log):
    a = copy_fruit(tmp_path / "a", ["14"])
    b = tmp_path / "b"
    b.mkdir()
    shutil.copyfile(FRUIT / "15.jpg", b / "14.jpg")  # another photo of the same name
    # c/14_1.jpg is an input too: the second picture's name skips it.
    c = tmp_path / "c"
    c.mkdir()
    shutil.copyfile(FRUIT / "16.jpg", c / "14_1.jpg")
    out = tmp_path / "out"
    args = _demo_args([a / "14.jpg", b / "14.jpg", c / "14_1.jpg"], out, weights)
    args.confidence_threshold = 2  # nothing drawn: each picture is its photo (JPEG again)
    outputs = demo.main(args)
    assert outputs == [str(out / "14.jpg"), str(out / "14_2.jpg"), str(out / "14_1.jpg")]
    message = f"{b / '14.jpg'}: another input is also named 14.jpg: its picture is {outputs[1]}"
    assert message in demo_log.text
    # Each picture is of its own photo.
    photos = [cv2.imread(str(FRUIT / f"{stem}.jpg")).astype(int) for stem in ("14", "15", "16")]
    for i, path in enumerate(outputs):
        picture = cv2.imread(path).astype(int)
        assert [np.abs(picture - photo).mean() < 3 for photo in photos] == [
            j == i for j in range(3)
        ]


def test_16_bit_pngs_give_the_pictures_of_the_8_bit_ones(weights, tmp_path):
    """Detectron2 reads a 16-bit grayscale PNG as white, a 16-bit color one by its high byte
    (x * 257 + 200 has high byte x + 1 from x = 56)."""
    rgb = detectron2_read_image(str(FRUIT / "14.jpg"), format="RGB")
    eight, sixteen = tmp_path / "8", tmp_path / "16"
    eight.mkdir()
    sixteen.mkdir()
    for name, image in (("color.png", rgb[:, :, ::-1]), ("gray.png", rgb[:, :, 0])):
        assert cv2.imwrite(str(eight / name), image)
        wide = image.astype(np.uint16) * 257
        wide[image < 255] += 200  # 255 * 257 is 65535
        assert cv2.imwrite(str(sixteen / name), wide)
    np.random.seed(0)  # the Visualizer's colors
    expected = demo.main(_demo_args([eight], tmp_path / "out8", weights))
    np.random.seed(0)
    outputs = demo.main(_demo_args([sixteen], tmp_path / "out16", weights))
    for picture, expected_picture in zip(outputs, expected):
        assert np.array_equal(cv2.imread(picture), cv2.imread(expected_picture))
    # The same detections through the demo's reading and the predictor.
    predictor = SOLOv2Predictor(demo.setup_cfg(_demo_args([eight], tmp_path, weights)))
    for name in ("color.png", "gray.png"):
        a = predictor(demo.read_image(str(sixteen / name), "BGR"))["instances"]
        b = predictor(demo.read_image(str(eight / name), "BGR"))["instances"]
        assert len(a) > 0
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


def test_too_elongated_images_are_reported_and_the_others_drawn(weights, tmp_path, demo_log):
    """TINY's MAX_SIZE_TEST 192 resizes 1 x 1500 to 0 x 192: PIL fails, and the run with it."""
    folder = copy_fruit(tmp_path / "photos", ["15"])
    thin = folder / "thin.png"
    assert cv2.imwrite(str(thin), np.full((1, 1500, 3), 128, dtype=np.uint8))
    out = tmp_path / "out"
    assert demo.main(_demo_args([folder], out, weights)) == [str(out / "15.jpg"), None]
    assert (
        f"Skipped: The image {thin} has shape (1, 1500, 3): resized to a short side of 128 and a "
        "long side of at most INPUT.MAX_SIZE_TEST = 192, it would be 0x192 pixels. Its aspect "
        "ratio, 1500.0:1, exceeds the limit 2 x INPUT.MAX_SIZE_TEST : 1 = 384:1"
    ) in demo_log.text
    assert cv2.imread(str(out / "15.jpg")).shape == (600, 800, 3)
    assert not (out / "thin.png").exists()


def test_decompression_bombs_are_reported_and_the_others_drawn(
    weights, tmp_path, demo_log, monkeypatch
):
    """PIL's DecompressionBombError is no OSError: it ended the run. With a limit of 100000
    pixels the 800 x 600 photo is one (over twice the limit), its 400 x 300 copy is not."""
    folder = copy_fruit(tmp_path / "photos", ["14"])
    small = folder / "small.jpg"
    assert cv2.imwrite(str(small), cv2.resize(cv2.imread(str(FRUIT / "15.jpg")), (400, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100000)
    out = tmp_path / "out"
    assert demo.main(_demo_args([folder], out, weights)) == [None, str(out / "small.jpg")]
    assert (
        f"Skipped: Cannot read the image {folder / '14.jpg'}: DecompressionBombError: "
        in demo_log.text
    )
    assert "1 of 2 images were skipped" in demo_log.text
