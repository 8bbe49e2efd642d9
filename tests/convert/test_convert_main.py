"""The command line, ``python -m solov2_d2.convert`` (solov2_d2/convert/__main__.py)."""
import torch

from convert_fixtures import cfg_from_yaml, empty_model, load_strictly  # isort: split

from detectron2.checkpoint import DetectionCheckpointer

from solov2_d2.convert import CONFIGS_DIR
from solov2_d2.convert.__main__ import main


def test_cli_reports_failures_and_writes_nothing(tmp_path, capsys):
    assert main(["https://example.com/x.pth", str(tmp_path / "out.pth")]) == 1
    assert "is a URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_converts_and_prints_the_config(light_r18_file, tmp_path, capsys):
    src, source_sd = light_r18_file
    dst = tmp_path / "out" / "solov2_light_r18.pth"
    assert main([str(src), str(dst), "--from", "mmdet"]) == 0
    printed = capsys.readouterr().out
    assert "Config: SOLOv2_Light_448_R18_3x" in printed
    assert "Dropped on purpose: 20 (BatchNorm update counter)" in printed
    config_path = tmp_path / "out" / "solov2_light_r18.yaml"
    assert config_path.read_text() in printed
    assert f'_BASE_: {CONFIGS_DIR / "SOLOv2_Light_448_R18_3x.yaml"}' in printed

    # The written config runs as it is, on the repository's variant config.
    loaded = load_strictly(empty_model(cfg_from_yaml(config_path)), dst)
    assert torch.equal(loaded["ins_head.cate_pred.weight"], source_sd["mask_head.conv_cls.weight"])


def test_cli_refuses_to_overwrite_its_source(light_r18_file, tmp_path, capsys):
    src, _ = light_r18_file
    before = src.read_bytes()
    link = tmp_path / "same.pth"
    link.symlink_to(src)
    for dst in (src, link):
        assert main([str(src), str(dst), "--from", "mmdet"]) == 1
        assert f"{dst} is the source checkpoint {src}" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert not src.with_suffix(".yaml").exists()


def test_cli_says_when_a_checkpoint_is_already_converted(light_r18_file, tmp_path, capsys):
    src, _ = light_r18_file
    converted = tmp_path / "converted.pth"
    assert main([str(src), str(converted), "--from", "mmdet"]) == 0
    capsys.readouterr()
    # The converter's output, and a checkpoint as train_net.py writes it (model and trainer).
    trained = tmp_path / "model_final.pth"
    model = empty_model(cfg_from_yaml(tmp_path / "converted.yaml"))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final", iteration=9)
    for path in (converted, trained):
        for source in ([], ["--from", "adelaidet"]):
            assert main([str(path), str(tmp_path / "again.pth"), *source]) == 1
            err = capsys.readouterr().err
            assert f"{path} is already a solov2_d2 checkpoint" in err
            assert "nothing to convert" in err and "not part of" not in err
    assert not (tmp_path / "again.pth").exists() and not (tmp_path / "again.yaml").exists()
