"""OpenVINO as OnnxPredictor's second runtime (`runtime="openvino"`, `--onnx-runtime openvino`):
the exported float file gives ONNX Runtime's instances, the int8 file close ones, through the
predictor, demo.py and train_net.py --eval-only. openvino is installed by tools/bootstrap.sh (the
`openvino` extra): these tests fail, not skip, without it."""
import json
import os
import sys

import solov2_d2  # noqa: F401  # isort: split

import pytest
import torch
from conftest import FRUIT_CONFIG, REPO, tiny_fruit_argv
from export import test_quantize
from export.test_evaluate_onnx import evaluate
from export.test_export import assert_same_instances, fruit_cfg, model_input, photos
from export.test_quantize import assert_close_detections

from detectron2.data import DatasetCatalog

from solov2_d2.export import OnnxPredictor
from solov2_d2.export.graph import DEFORM_CONV_OPSET
from solov2_d2.export.translations import custom_translation_table
from solov2_d2.layers.deform_conv import ModulatedDeformConv2d

pytest.importorskip("onnxruntime", reason="ONNX inference needs onnxruntime")

sys.path.insert(0, str(REPO))
import demo  # noqa: E402
import train_net  # noqa: E402

# test_quantize's fixtures, run once for this module: the random fruit model's checkpoint, and its
# float and int8 files.
checkpoint, quantized = test_quantize.checkpoint, test_quantize.quantized
# The fruit config's test size, which the files record; tiny_fruit_argv's TINY sizes are smaller.
FRUIT_TEST_SIZE = ("INPUT.MIN_SIZE_TEST", "288", "INPUT.MAX_SIZE_TEST", "640")


def test_the_float_file_gives_onnx_runtimes_instances(quantized):
    cfg, float_path, _ = quantized
    ort = OnnxPredictor(cfg, float_path)
    ov = OnnxPredictor(cfg, float_path, runtime="openvino")
    assert ov.runtime == "openvino" and ov.session is None
    assert ov.thing_classes == ort.thing_classes == ["date", "fig", "hazelnut"]
    for photo in photos():
        assert_same_instances(ov(photo), ort(photo))
    # A batch of three sizes, after the photos' sizes: the compiled model's shapes are dynamic.
    sizes = [(288, 384), (224, 320), (320, 352)]
    inputs = [model_input(p, *s) for p, s in zip(photos(), sizes)]
    for a, b in zip(ov.inference(inputs), ort.inference(inputs)):
        assert_same_instances(a, b)


def test_openvino_computes_in_float32_with_the_threads_asked(quantized):
    """bfloat16, the CPU plugin's default on CPUs with AMX or AVX-512 BF16, would move scores
    and masks beyond the tolerances above."""
    import openvino

    cfg, float_path, _ = quantized
    predictor = OnnxPredictor(cfg, float_path, runtime="openvino", num_threads=1)
    compiled = predictor.graph.compiled
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    with pytest.raises(ValueError, match="num_threads is OpenVINO's"):
        OnnxPredictor(cfg, float_path, num_threads=1)
    with pytest.raises(ValueError, match="session_options are ONNX Runtime's"):
        OnnxPredictor(cfg, float_path, runtime="openvino", session_options=object())


def test_the_int8_file_gives_detections_close_to_onnx_runtimes(quantized):
    """Both runtimes run the int8 convolutions with their own kernels and rounding; the random
    model's masks are sensitive to it (see test_quantize): close, not equal."""
    cfg, _, int8_path = quantized
    ort = OnnxPredictor(cfg, int8_path)
    ov = OnnxPredictor(cfg, int8_path, runtime="openvino")
    for photo in photos()[:2]:
        assert_close_detections(ort(photo)["instances"], ov(photo)["instances"])


def test_demo_runs_the_exported_model_in_openvino(quantized, tmp_path, monkeypatch):
    _, float_path, _ = quantized
    predictors = []

    def predictor(*args, **kwargs):
        predictors.append(OnnxPredictor(*args, **kwargs))
        return predictors[-1]

    monkeypatch.setattr(demo, "OnnxPredictor", predictor)
    image_path = DatasetCatalog.get("fruit_val")[0]["file_name"]
    argv = ["--config-file", FRUIT_CONFIG, "--input", image_path, "--output", str(tmp_path)]
    argv += ["--onnx", float_path, "--onnx-runtime", "openvino"]
    outputs = demo.main(demo.get_parser().parse_args(argv))
    assert outputs == [os.path.join(tmp_path, os.path.basename(image_path))]
    assert [p.runtime for p in predictors] == ["openvino"]
    with pytest.raises(ValueError, match="--onnx-runtime openvino runs an exported model"):
        demo.main(demo.get_parser().parse_args(argv[:6] + ["--onnx-runtime", "openvino"]))


def test_train_net_evaluates_in_openvino_as_in_onnx_runtime(checkpoint, quantized, tmp_path):
    (_, weights), (_, float_path, _) = checkpoint, quantized
    runs = {}
    for runtime in ("onnxruntime", "openvino"):
        flags = ("--onnx", float_path, "--onnx-runtime", runtime)
        runs[runtime] = evaluate(tmp_path / runtime, weights, *flags, opts=FRUIT_TEST_SIZE)
    assert set(runs["openvino"]) == set(runs["onnxruntime"]) == {"segm", "bbox"}
    for task, results in runs["onnxruntime"].items():
        for key, value in results.items():
            assert runs["openvino"][task][key] == pytest.approx(value, abs=0.1, nan_ok=True)
    predictions = [
        json.loads(
            (tmp_path / runtime / "inference" / "fruit_val" / "coco_instances_results.json")
            .read_text()
        )
        for runtime in runs
    ]
    assert len(predictions[0]) == len(predictions[1]) > 0
    scores = [sorted(d["score"] for d in p) for p in predictions]
    assert max(abs(a - b) for a, b in zip(*scores)) <= 1e-3


def test_onnx_runtime_options_are_checked(tmp_path, capsys):
    argv = ["--onnx-runtime", "openvino"] + tiny_fruit_argv(tmp_path, eval_only=True)
    with pytest.raises(ValueError, match="--onnx-runtime openvino runs an exported model"):
        train_net.main(train_net.argument_parser().parse_args(argv))
    with pytest.raises(SystemExit):
        train_net.argument_parser().parse_args(["--onnx-runtime", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_an_unknown_runtime_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match="Unknown runtime 'tensorrt'; expected one of 'onnxruntime', 'openvino'"
    ):
        OnnxPredictor(fruit_cfg(), str(tmp_path / "model.onnx"), runtime="tensorrt")


def test_a_missing_openvino_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` fails
    with pytest.raises(ImportError, match=r"need openvino.*pip install -e \.\[openvino\]"):
        OnnxPredictor(fruit_cfg(), str(tmp_path / "model.onnx"), runtime="openvino")


def test_openvino_cannot_read_deformable_convolutions(tmp_path):
    """OpenVINO (2026.4) has no conversion of ONNX's DeformConv: the DCN configs' files run in
    ONNX Runtime only (docs/export.md). A newer OpenVINO that reads it fails this test: then
    check the DCN files' results and update the docs."""
    layer = ModulatedDeformConv2d(4, 4, kernel_size=3, padding=1).eval()
    path = str(tmp_path / "layer.onnx")
    with torch.no_grad():
        torch.onnx.export(
            layer,
            (torch.randn(1, 4, 8, 8),),
            path,
            dynamo=True,
            opset_version=DEFORM_CONV_OPSET,
            custom_translation_table=custom_translation_table(),
        )
    with pytest.raises(RuntimeError, match="No conversion rule found for operations: DeformConv"):
        OnnxPredictor(fruit_cfg(), path, runtime="openvino")
