"""Int8 quantization of an exported model (`python -m solov2_d2.export --quantize int8`): the
network's convolutions in int8, the rest in float, the float file's metadata, run by
OnnxPredictor unchanged, close to the float model."""
import subprocess
import sys

import solov2_d2  # noqa: F401  # isort: split

import pytest
import torch
from conftest import FRUIT_CONFIG, REPO
from export.test_export import candidate_rich_model, fruit_cfg, photos

from detectron2.checkpoint import DetectionCheckpointer

from solov2_d2.export import OnnxPredictor
from solov2_d2.export.__main__ import main as export_main
from solov2_d2.export.quantize import calibration_dicts, quantized_path

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install -e .[export]")
pytest.importorskip("onnxruntime", reason="ONNX inference needs onnxruntime")
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """test_export's random fruit model, saved: (config, checkpoint path)."""
    folder = tmp_path_factory.mktemp("quantize")
    cfg = fruit_cfg()
    model = candidate_rich_model(cfg)
    DetectionCheckpointer(model, save_dir=str(folder)).save("model")
    cfg.MODEL.WEIGHTS = str(folder / "model.pth")
    return cfg, cfg.MODEL.WEIGHTS


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """The command's float and int8 files, calibrated on 4 images of fruit_train."""
    cfg, weights = checkpoint
    output = tmp_path_factory.mktemp("quantized")
    command = [sys.executable, "-m", "solov2_d2.export", "--config-file", FRUIT_CONFIG]
    command += ["--output", str(output), "--quantize", "int8", "--calibration", "fruit_train"]
    command += ["--calibration-images", "4", "MODEL.WEIGHTS", weights]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "calibrated on 4 images of fruit_train" in result.stderr
    return cfg, str(output / "model.onnx"), str(output / "model_int8.onnx")


def test_the_int8_file_quantizes_the_network_convolutions_only(quantized):
    cfg, float_path, int8_path = quantized
    assert quantized_path(float_path) == int8_path
    model = onnx.load(int8_path)
    onnx.checker.check_model(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    initializers = {x.name for x in model.graph.initializer}
    weights = [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in initializers
    ]
    assert len(weights) > 40
    # Only convolutions have quantized weights; everything else (the post-processing
    # included) computes in float, on the convolutions' dequantized outputs.
    assert {c.op_type for n in weights for c in consumers[n.output[0]]} == {"Conv"}
    assert {n.op_type for n in model.graph.node} & {"QLinearConv", "MatMulInteger"} == set()
    # Every Conv has quantized weights: the dynamic mask convolution (kernels computed by the
    # network) is a MatMul in the graph, and stays float.
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(producers[n.input[1]].op_type == "DequantizeLinear" for n in convs)
    # int8 weights: a quarter of the float file's size or so.
    int8 = {x.name for x in model.graph.initializer if x.data_type == onnx.TensorProto.INT8}
    assert all(producers[n.input[1]].input[0] in int8 for n in convs)
    float_model = onnx.load(float_path)
    float_metadata = {p.key: p.value for p in float_model.metadata_props}
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata.pop("solov2.quantization").startswith("int8 QDQ")
    assert metadata == float_metadata and "solov2.thing_classes" in metadata
    assert float_model.ByteSize() > 3 * model.ByteSize()


def assert_close_detections(a, b):
    """Instances `a` and `b` of one photo are close: more than 10 each, counts within half of
    `a`'s, the top 10 scores within 0.02, and the top 10 masks of `a` found in `b` (best IoU:
    median >= 0.5, max >= 0.8)."""
    assert len(a) > 10 and len(b) > 10
    assert abs(len(a) - len(b)) <= 0.5 * len(a)
    torch.testing.assert_close(a.scores[:10], b.scores[:10], atol=0.02, rtol=0)
    masks_a = a.pred_masks[:10].flatten(1).float()
    masks_b = b.pred_masks.flatten(1).float()
    inter = masks_a @ masks_b.T
    union = masks_a.sum(1)[:, None] + masks_b.sum(1)[None] - inter
    best = (inter / union.clamp(min=1)).max(dim=1).values
    assert best.median() >= 0.5 and best.max() >= 0.8


def test_int8_detections_are_close_to_the_float_models(quantized):
    """The random model's masks are noise of kernels scaled by 30, which makes them sensitive
    to rounding: close, not equal."""
    cfg, float_path, int8_path = quantized
    float_predictor, int8_predictor = OnnxPredictor(cfg, float_path), OnnxPredictor(cfg, int8_path)
    assert int8_predictor.thing_classes == ["date", "fig", "hazelnut"]
    for photo in photos()[:2]:
        assert_close_detections(
            float_predictor(photo)["instances"], int8_predictor(photo)["instances"]
        )


def test_calibration_errors_name_the_dataset(checkpoint, tmp_path):
    cfg, weights = checkpoint
    output = tmp_path / "onnx"
    argv = ["--config-file", FRUIT_CONFIG, "--output", str(output), "--quantize", "int8"]
    with pytest.raises(KeyError, match="Calibration dataset 'no_such_set' is not registered"):
        export_main(argv + ["--calibration", "no_such_set", "MODEL.WEIGHTS", weights])
    with pytest.raises(ValueError, match="'fruit_val' has 4 images, fewer than the 5 asked"):
        export_main(
            argv + ["--calibration", "fruit_val", "--calibration-images", "5"]
            + ["MODEL.WEIGHTS", weights]
        )
    assert not output.exists()  # refused before exporting
    assert len(calibration_dicts("fruit_val", 4)) == 4


def test_quantize_needs_a_calibration_dataset(checkpoint, tmp_path, capsys):
    cfg, weights = checkpoint
    argv = ["--config-file", FRUIT_CONFIG, "--output", str(tmp_path), "--quantize", "int8"]
    with pytest.raises(SystemExit):
        export_main(argv + ["MODEL.WEIGHTS", weights])
    assert "--quantize int8 needs --calibration DATASET" in capsys.readouterr().err
