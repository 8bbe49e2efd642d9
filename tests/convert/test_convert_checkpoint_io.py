"""Reading foreign checkpoint files and writing Detectron2 ones
(solov2_d2/convert/checkpoint_io.py): containers, metadata, URLs, detectron2's .pkl format."""
import pickle

import pytest
import torch

from convert_fixtures import cfg_from_yaml, empty_model, load_strictly  # isort: split

from solov2_d2.convert import ConversionError, convert_checkpoint
from solov2_d2.convert.checkpoint_io import load_state_dict


@pytest.mark.parametrize(
    "url", ["https://example.com/solov2_r50.pth", "torchvision://resnet50", "s3://bucket/x.pth"]
)
def test_url_is_refused_without_network(url, tmp_path):
    with pytest.raises(ConversionError, match="is a URL; the converter does not download"):
        convert_checkpoint(url, str(tmp_path / "out.pth"))
    assert not (tmp_path / "out.pth").exists()


def test_metadata_of_foreign_classes_is_read_inertly(light_r18_file):
    src, source_sd = light_r18_file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(src, weights_only=True)
    loaded = load_state_dict(str(src))
    assert loaded.keys() == source_sd.keys()
    assert all(torch.equal(loaded[k], v) for k, v in source_sd.items())


def test_detectron2_pkl_format(light_r18_file, tmp_path):
    src, source_sd = light_r18_file
    dst = tmp_path / "solov2_light_r18.pkl"
    result = convert_checkpoint(str(src), str(dst))
    with open(dst, "rb") as f:
        assert pickle.load(f)["__author__"].startswith("solov2_d2.convert from mmdetection")
    loaded = load_strictly(empty_model(cfg_from_yaml(result.config_path)), dst)
    assert torch.equal(
        loaded["mask_head.conv_pred.norm.weight"],
        source_sd["mask_head.mask_feature_head.conv_pred.gn.weight"],
    )


def test_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "not_a_checkpoint.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.01}}, path)
    with pytest.raises(ConversionError, match="holds no state dict.*'epoch', 'optimizer'"):
        convert_checkpoint(str(path), str(tmp_path / "out.pth"))


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ConversionError, match="Cannot read .*notes.pth as a PyTorch checkpoint"):
        convert_checkpoint(str(path), str(tmp_path / "out.pth"))
