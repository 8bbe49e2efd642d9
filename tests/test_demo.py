"""demo.py: pictures of the predictions, one per input image, of the input's size."""
import sys

import solov2_d2  # noqa: F401  # isort: split

import cv2
import numpy as np
import pytest
from conftest import FRUIT_CONFIG, REPO, TINY, copy_fruit

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config

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


def test_an_unreadable_image_is_reported_and_the_others_are_drawn(weights, tmp_path, caplog):
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
    assert f"{truncated}: skipped, cannot read it: image file is truncated" in caplog.text
    assert cv2.imread(str(out / "15.jpg")).shape == (600, 800, 3)
