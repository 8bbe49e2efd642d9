"""The learning-curve picture from a run's metrics.json."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from solov2_d2.engine.learning_curve import _series, draw_learning_curve, main, read_metrics


def _write_metrics(path, with_evaluation=True):
    """detectron2 JSONWriter-style lines: losses every 20 iterations, an evaluation at 40 and
    at the end (sharing the last iteration with its losses), NaN where COCO has no value."""
    lines = []
    for it in range(19, 100, 20):
        lines.append({"iteration": it, "total_loss": 3.0 / (it + 1), "loss_cate": 0.5 / (it + 1),
                      "loss_mask": 2.5 / (it + 1), "lr": 0.02})
    if with_evaluation:
        lines.insert(2, {"iteration": 39, "segm/AP": 10.0, "segm/AP50": 30.0, "bbox/AP": 5.0,
                         "bbox/AP50": 20.0, "bbox/APs": math.nan})
        lines.append({"iteration": 100, "segm/AP": 30.0, "segm/AP50": 60.0, "bbox/AP": 20.0,
                      "bbox/AP50": 50.0, "segm/APs": math.nan})
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_the_series_are_read_by_iteration_without_nan(tmp_path):
    _write_metrics(tmp_path / "metrics.json")
    records = read_metrics(str(tmp_path / "metrics.json"))
    assert _series(records, "segm/AP50") == ([39, 100], [30.0, 60.0])
    assert _series(records, "total_loss")[0] == [19, 39, 59, 79, 99]
    assert _series(records, "bbox/APs") == ([], [])


@pytest.mark.parametrize("with_evaluation", [True, False])
def test_the_picture_is_written(tmp_path, with_evaluation):
    _write_metrics(tmp_path / "metrics.json", with_evaluation)
    assert main([str(tmp_path), "--title", "test"]) == 0
    picture = np.asarray(Image.open(tmp_path / "learning_curve.png"))
    assert picture.shape[0] > 200 and picture.shape[1] > 600
    assert picture.std() > 10  # not blank


def test_bad_inputs_are_named_and_nothing_is_overwritten(tmp_path, capsys):
    assert main([str(tmp_path / "none")]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text('{"iteration": 1, "total_loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.json, line 2: not JSON"):
        read_metrics(str(tmp_path / "metrics.json"))
    (tmp_path / "metrics.json").write_text('{"iteration": 1, "segm/AP": 1}\n')
    with pytest.raises(ValueError, match="no training loss"):
        draw_learning_curve(str(tmp_path / "metrics.json"), str(tmp_path / "x.png"))
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"user's file")
    _write_metrics(tmp_path / "metrics.json")
    assert main([str(tmp_path), "--output", str(mine)]) == 2
    assert "mine.png exists" in capsys.readouterr().err
    assert mine.read_bytes() == b"user's file"
