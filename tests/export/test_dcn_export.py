"""ONNX export of deformable convolutions (the DCN configs): torchvision's deform_conv2d becomes
ONNX's DeformConv (opset 19), which ONNX Runtime runs with the same offset layout."""
import numpy as np
import pytest
import torch
from conftest import FRUIT_CONFIG, REPO
from export.test_export import model_input, photos

import solov2_d2  # isort: split

from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from solov2_d2.export import OnnxPredictor, SOLOv2ExportModule
from solov2_d2.export.__main__ import main as export_main
from solov2_d2.export.graph import DEFORM_CONV_OPSET, INPUT_NAMES, check_opset, export_onnx
from solov2_d2.export.translations import custom_translation_table
from solov2_d2.layers.deform_conv import ModulatedDeformConv2d
from solov2_d2.modeling.meta_arch import NetworkPolicy

onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install -e .[export]")
onnxruntime = pytest.importorskip(
    "onnxruntime", reason="ONNX inference needs onnxruntime: pip install -e .[export]"
)
pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install -e .[export]")


def run_onnx(path, *inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [x.name for x in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1, deform_groups=2),
        dict(kernel_size=3, stride=2, padding=2, dilation=2),
        dict(kernel_size=(3, 1), padding=(1, 0), groups=2, bias=False),
    ],
)
def test_one_layer_matches_torchvision(tmp_path, kwargs):
    """Offsets of several pixels (most taps between pixels, some outside the image) and
    modulation far from 1: a transposed (dy, dx) pair or another tap order would differ."""
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(8, 6, **kwargs).eval()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.3)
        layer.conv_offset.bias.normal_(0, 2)
    x = torch.randn(2, 8, 13, 17)
    path = tmp_path / "layer.onnx"
    with torch.no_grad():
        torch.onnx.export(
            layer,
            (x,),
            str(path),
            dynamo=True,
            opset_version=DEFORM_CONV_OPSET,
            custom_translation_table=custom_translation_table(),
        )
        expected = layer(x).numpy()
        # The taps moved: a plain convolution of the same weights gives something else.
        plain = torch.nn.functional.conv2d(
            x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
        ).numpy()
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("DeformConv") == 1
    assert np.abs(expected - 0.5 * plain).max() > 0.5
    np.testing.assert_allclose(run_onnx(path, x), expected, atol=1e-5, rtol=1e-5)


def test_deform_conv2d_without_mask(tmp_path):
    """torchvision's op without a mask (use_mask False, a zero mask passed) is DeformConv of
    unit modulation."""
    from torchvision.ops import deform_conv2d

    class Layer(torch.nn.Module):
        def forward(self, x, offset, weight):
            return deform_conv2d(x, offset, weight, stride=2, padding=1)

    torch.manual_seed(0)
    x, weight = torch.randn(1, 4, 11, 9), torch.randn(5, 4, 3, 3)
    offset = 3 * torch.randn(1, 18, 6, 5)
    path = tmp_path / "plain.onnx"
    torch.onnx.export(
        Layer(),
        (x, offset, weight),
        str(path),
        dynamo=True,
        opset_version=20,
        custom_translation_table=custom_translation_table(),
    )
    expected = deform_conv2d(x, offset, weight, stride=2, padding=1).numpy()
    np.testing.assert_allclose(run_onnx(path, x, offset, weight), expected, atol=1e-5)


# Small test images: the DCN configs' random models at short side 224.
SIZE = ["INPUT.MIN_SIZE_TEST", 224, "INPUT.MAX_SIZE_TEST", 320]


def dcn_model(config, category_bias):
    """The config's model with random weights, its deformable layers' offsets and modulation
    random per tap and channel (they start at zero: the taps would be a plain convolution's;
    offsets computed from the random features instead make the deep random networks chaotic:
    their float32 and float64 results differ as much as eager's and ONNX's), the category prior
    raised to `category_bias` so that cells pass the score threshold, and the kernels scaled
    (as in test_export) so that mask probabilities are rarely within rounding of the threshold.

    (bench's ForcedCandidates cannot give the load here: its hooks return tensors cached by
    shape, which torch.export's symbolic shapes cannot key.)"""
    cfg = get_cfg()
    solov2_d2.add_solov2_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.merge_from_list(SIZE + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    deformable = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert deformable
    with torch.no_grad():
        for layer in deformable:
            layer.conv_offset.weight.zero_()
            layer.conv_offset.bias.normal_(0, 1)
        model.ins_head.cate_pred.bias.fill_(category_bias)
        model.ins_head.kernel_pred.weight.mul_(30.0)
    model.network_policy = NetworkPolicy(per_image=False, channels_last=False)
    return cfg, model, deformable


@pytest.mark.parametrize(
    "config, category_bias",
    [
        # The light model's random mask features are positive nearly everywhere: its masks
        # cover the image.
        ("SOLOv2_Light_512_R50_DCN_3x.yaml", -3.25),
        ("SOLOv2_R101_DCN_3x.yaml", -3.75),
    ],
)
def test_dcn_configs_export_and_match_eager(tmp_path, config, category_bias):
    cfg, model, deformable = dcn_model(config, category_bias)
    path = str(tmp_path / "model.onnx")
    export_onnx(model, path, cfg=cfg)
    photo = photos()[1]
    predictor = DefaultPredictor(cfg)
    predictor.model = model
    calls = []
    for layer in deformable:
        layer.register_forward_hook(lambda *args: calls.append(1))
    eager = predictor(photo)
    assert len(eager["instances"]) >= 5
    # One DeformConv per call (the heads' towers run once per level).
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("DeformConv") == len(calls) > len(deformable)

    onnx_predictor = OnnxPredictor(cfg, path)
    a, b = onnx_predictor(photo)["instances"], eager["instances"]
    # The deeper random networks' rounding is larger than the fruit model's: detections whose
    # decayed scores are within it of the update threshold may come or go, and their many
    # near-identical random masks cannot be matched one to one (the graph's outputs are,
    # below). The top scores and their classes agree.
    assert abs(len(a) - len(b)) <= 2
    np.testing.assert_allclose(a.scores[:10], b.scores[:10], atol=1e-3)
    assert sorted(a.pred_classes[:10].tolist()) == sorted(b.pred_classes[:10].tolist())

    # The graph's outputs, entry by entry, against the export module run eagerly.
    images = model_input(photo, 224, 288)["image"][None]
    sizes = torch.tensor([[224, 288]])
    outputs = onnx_predictor.session.run(
        None, dict(zip(INPUT_NAMES, (images.numpy(), sizes.numpy())))
    )
    with torch.no_grad():
        expected = SOLOv2ExportModule(model)(images, sizes)
    n = int(expected.count[0])
    assert outputs[4][0] == n > 0
    np.testing.assert_allclose(outputs[0][0, :n], expected.scores[0, :n], atol=1e-4)
    np.testing.assert_array_equal(outputs[1][0, :n], expected.classes[0, :n])
    # Kernels scaled by 30 scale the mask logits' rounding too (a few 1e-3 near 0.5).
    np.testing.assert_allclose(outputs[2][0, :n], expected.masks[0, :n], atol=3e-3)


def test_dcn_needs_opset_19(tmp_path, capsys):
    with pytest.raises(ValueError, match="deformable convolutions.*DeformConv from opset 19"):
        check_opset(18, deformable=True)
    check_opset(18)
    check_opset(19, deformable=True)
    output = tmp_path / "onnx"
    argv = ["--config-file", FRUIT_CONFIG, "--output", str(output), "--opset", "18"]
    argv += ["MODEL.SOLOV2.DCN_IN_MASK_BRANCH", "True", "MODEL.WEIGHTS", ""]
    with pytest.raises(ValueError, match="opset 18 is below 19: the model has deformable"):
        export_main(argv)
    assert not output.exists()
