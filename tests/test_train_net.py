"""train_net.py on the fruit data: training, checkpoints, resuming, evaluation, refusals."""
import json
import math
import os
import subprocess
import sys
import time

import solov2_d2  # noqa: F401  # isort: split

import pytest
import torch
from conftest import FRUIT_CONFIG, REPO, TINY, tiny_fruit_argv

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from solov2_d2 import add_solov2_config
from solov2_d2.engine.checkpoint import IncompleteWeightsError, ResumeMismatchError

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402


def _args(output_dir, *opts, **flags):
    return train_net.argument_parser().parse_args(tiny_fruit_argv(output_dir, *opts, **flags))


def _metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two iterations of training, checkpointed, evaluated at the end: (output dir, results)."""
    out = tmp_path_factory.mktemp("train")
    train_net.main(_args(out, "SOLVER.MAX_ITER", "2"))
    with open(out / "inference" / "results.json") as f:
        return out, json.load(f)


def test_training_writes_finite_losses_a_checkpoint_and_evaluation(trained):
    out, results = trained
    losses = [m for m in _metrics(out) if "loss_mask" in m]
    assert losses and losses[-1]["iteration"] == 1
    assert all(math.isfinite(m[k]) for m in losses for k in ("loss_cate", "loss_mask"))
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    checkpoint = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["iteration"] == 1
    assert {"model", "trainer"} <= set(checkpoint)
    # What determines the rest of a resumed run: optimizer, LR scheduler, data stream.
    optimizer_state = checkpoint["trainer"]["_trainer"]["optimizer"]["state"]
    assert "momentum_buffer" in next(iter(optimizer_state.values()))
    assert "LRScheduler" in checkpoint["trainer"]["hooks"]
    assert checkpoint["trainer"]["data_loader"] == {"seed": 0}
    # COCO-style mask and box AP of the evaluation at the end of training.
    assert {"segm", "bbox"} <= set(results)
    assert {"AP", "AP50", "AP75"} <= set(results["segm"])


def test_resume_continues_the_iteration_counter(trained, tmp_path):
    out, _ = trained
    resumed = tmp_path / "resumed"
    # A copy of the run, so that the other tests keep the original checkpoint.
    resumed.mkdir()
    for name in ("model_final.pth", "last_checkpoint"):
        (resumed / name).write_bytes((out / name).read_bytes())
    args = _args(resumed, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "()", resume=True)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    assert trainer.start_iter == 2
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    loaded = trainer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    trainer.train()
    assert [it for _, it in trainer.storage.history("loss_mask").values()] == [2, 3]
    final = torch.load(resumed / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 3
    assert [m["iteration"] for m in _metrics(resumed) if "loss_mask" in m] == [3]


def test_eval_only_gives_the_same_metrics_as_the_evaluation_after_training(trained, tmp_path):
    """Two evaluations of the same weights: at the end of training, and --eval-only on the
    checkpoint it wrote."""
    out, results_after_training = trained
    results = train_net.main(
        _args(tmp_path, "MODEL.WEIGHTS", str(out / "model_final.pth"), eval_only=True)
    )
    predictions = [
        json.loads((run / "inference" / "fruit_val" / "coco_instances_results.json").read_text())
        for run in (out, tmp_path)
    ]
    assert predictions[0], "every cell is kept: there must be predictions"
    assert {d["image_id"] for d in predictions[0]} == {14, 15, 16, 17}
    assert predictions[1] == predictions[0]
    assert json.dumps(results, sort_keys=True) == json.dumps(
        results_after_training, sort_keys=True
    )


def test_remote_weights_fail_fast_with_a_clear_message(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_net.py"),
            "--config-file",
            FRUIT_CONFIG,
            "MODEL.WEIGHTS",
            "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "never downloads weights" in proc.stderr
    assert "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl" in (
        proc.stderr
    )
    assert "python -m solov2_d2.convert" in proc.stderr
    # It stops before any setup: no output folder, no model built.
    assert not (tmp_path / "out").exists()


def test_amp_on_cpu_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"SOLVER\.AMP\.ENABLED.*MODEL\.DEVICE cuda"):
        train_net.main(_args(tmp_path, "SOLVER.AMP.ENABLED", "True"))
    assert not tmp_path.joinpath("config.yaml").exists()


def test_cpu_processes_need_the_cpu_device(tmp_path):
    args = _args(tmp_path, "MODEL.DEVICE", "cuda")
    args.num_cpu_processes = 2
    with pytest.raises(ValueError, match="--num-cpu-processes.*MODEL.DEVICE cpu"):
        train_net.setup(args)


def _final_weights(output_dir):
    path = output_dir / "model_final.pth"
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# The small-data recipe: large-scale jitter, colour jitter, copy-paste and weight averaging.
RECIPE = [
    "INPUT.LSJ.ENABLED", "True", "INPUT.LSJ.SIZE", "128", "INPUT.COLOR_JITTER.ENABLED", "True",
    "INPUT.COPY_PASTE.ENABLED", "True", "MODEL_EMA.ENABLED", "True", "MODEL_EMA.WARMUP_ITERS", "2",
]  # fmt: skip


@pytest.mark.parametrize("num_workers, recipe", [("0", []), ("2", []), ("2", RECIPE)])
def test_a_killed_run_resumes_to_the_weights_of_the_uninterrupted_run(
    tmp_path, num_workers, recipe
):
    """SIGKILL after the first checkpoint, --resume: the final weights are bit-identical to
    those of a run that was never stopped (same seed), with random resizing and flipping, and
    with the small-data recipe (whose weight average is saved and resumed too)."""
    opts = [
        "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
        "DATALOADER.NUM_WORKERS", num_workers,
        "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.RANDOM_FLIP", "horizontal", *recipe,
    ]  # fmt: skip
    train_net.main(_args(tmp_path / "uninterrupted", *opts))

    killed = tmp_path / "killed"
    argv = ["--config-file", FRUIT_CONFIG] + TINY + ["OUTPUT_DIR", str(killed)] + opts
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_net.py"), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "last_checkpoint"
    deadline = time.monotonic() + 300
    try:
        while not (last.exists() and last.read_text().strip() == "model_0000001.pth"):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "model_final.pth").exists()

    train_net.main(_args(killed, *opts, resume=True))
    expected, resumed = _final_weights(tmp_path / "uninterrupted"), _final_weights(killed)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(resumed[k], v) for k, v in expected.items())


def test_garbled_last_checkpoint_is_named(tmp_path):
    (tmp_path / "last_checkpoint").write_bytes(os.urandom(32) + b"\xff")
    args = _args(tmp_path, "SOLVER.MAX_ITER", "4", resume=True)
    trainer = train_net.Trainer(train_net.setup(args))
    with pytest.raises(ValueError, match=f"{tmp_path}/last_checkpoint must hold the file name"):
        trainer.resume_or_load(resume=True)


@pytest.mark.parametrize(
    "opts, eval_only, message",
    [
        (["MODEL.SOLOV2.NUM_CLASSES", "1"], False,
         "NUM_CLASSES is 1, but dataset 'fruit_train' has 3 classes"),
        (["MODEL.SOLOV2.NUM_CLASSES", "80", "DATASETS.TRAIN", "('coco_mini_train',)"], False,
         "NUM_CLASSES is 80, but dataset 'fruit_val' has 3 classes"),
        (["DATASETS.TEST", "('coco_mini_val',)"], True,
         "NUM_CLASSES is 3, but dataset 'coco_mini_val' has 80 classes"),
    ],
)  # fmt: skip
def test_num_classes_must_match_the_datasets(tmp_path, opts, eval_only, message):
    with pytest.raises(ValueError, match=message):
        train_net.main(_args(tmp_path, *opts, eval_only=eval_only))
    assert not (tmp_path / "config.yaml").exists()  # refused before any setup


def test_eval_only_refuses_a_random_model_unless_asked(tmp_path):
    with pytest.raises(IncompleteWeightsError, match="MODEL.WEIGHTS is empty"):
        train_net.main(_args(tmp_path / "refused", eval_only=True))
    args = _args(tmp_path / "asked", eval_only=True)
    args.eval_incomplete_weights = True
    assert {"segm", "bbox"} <= set(train_net.main(args))


def test_eval_only_refuses_weights_that_do_not_fit(tmp_path):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(FRUIT_CONFIG)
    cfg.merge_from_list(TINY + ["MODEL.SOLOV2.NUM_CLASSES", "2"])
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("two_classes")
    weights = str(tmp_path / "two_classes.pth")
    with pytest.raises(IncompleteWeightsError, match=f"{weights} does not fit the model") as e:
        train_net.main(_args(tmp_path / "out", "MODEL.WEIGHTS", weights, eval_only=True))
    assert "ins_head.cate_pred.weight ([3, 64, 3, 3] in the model, [2, 64, 3, 3]" in str(e.value)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"Cannot read {tmp_path}/notes.pth as a checkpoint"):
        train_net.main(_args(tmp_path / "out", "MODEL.WEIGHTS", str(tmp_path / "notes.pth"),
                             eval_only=True))


def test_the_optimizer_clips_the_norm_of_all_gradients_together(tmp_path):
    """The fruit config inherits the authors' clipping (Base-SOLOv2.yaml: full_model at 35);
    after a step the norm of all gradients together is 35."""
    cfg = train_net.setup(_args(tmp_path))
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    model = train_net.Trainer.build_model(cfg)
    optimizer = train_net.Trainer.build_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    total = torch.cat([p.grad.flatten() for p in params]).double().norm().item()
    assert total == pytest.approx(35.0, rel=1e-5)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD = 0; expected an integer"),
        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER = 0; expected an integer >= 1"),
        (["SOLVER.STEPS", "(5,)", "SOLVER.MAX_ITER", "5"], r"SOLVER.STEPS = \[5\]: every step"),
        (["TEST.EVAL_PERIOD", "-1"], r"TEST.EVAL_PERIOD = -1; expected 0"),
    ],
)  # fmt: skip
def test_solver_values_are_refused_before_training(tmp_path, opts, message):
    with pytest.raises(ValueError, match=message):
        train_net.main(_args(tmp_path, *opts))
    assert not (tmp_path / "config.yaml").exists()  # refused before any setup


@pytest.mark.parametrize("count", ["-1", "0"])
def test_num_cpu_processes_below_one_is_refused_naming_the_flag(count, capsys):
    with pytest.raises(SystemExit):
        train_net.argument_parser().parse_args(["--num-cpu-processes", count])
    assert f"argument --num-cpu-processes: {count}; expected a number of processes >= 1" in (
        capsys.readouterr().err
    )
    args = train_net.argument_parser().parse_args([])
    args.num_cpu_processes = -1  # arguments built in code
    with pytest.raises(ValueError, match="--num-cpu-processes -1; expected a number"):
        train_net.launch_main(args)


def test_resuming_a_checkpoint_of_another_model_is_refused_naming_the_tensors(trained, tmp_path):
    """A finished run's OUTPUT_DIR resumed with another MASK_DIM: nothing would be trained and
    the evaluation would score random tensors, so it stops; the same checkpoint as MODEL.WEIGHTS
    (fine-tuning) still loads what fits."""
    out, _ = trained
    for name in ("model_final.pth", "last_checkpoint"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    with pytest.raises(ResumeMismatchError) as e:
        train_net.main(_args(tmp_path, "SOLVER.MAX_ITER", "2", "MODEL.SOLOV2.MASK_DIM", "64",
                             resume=True))
    message = str(e.value)
    assert f"Cannot resume from {tmp_path}/model_final.pth, the last checkpoint in {tmp_path}" in (
        message
    )
    assert "mask_head.conv_pred.weight ([64, 32, 1, 1] in the model, [32, 32, 1, 1]" in message
    assert not (tmp_path / "inference").exists()  # nothing evaluated

    args = _args(tmp_path / "finetune", "SOLVER.MAX_ITER", "2", "MODEL.SOLOV2.MASK_DIM", "64",
                 "MODEL.WEIGHTS", str(out / "model_final.pth"))
    trainer = train_net.Trainer(train_net.setup(args))
    trainer.resume_or_load(resume=args.resume)
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    loaded = trainer.model.state_dict()
    assert trainer.start_iter == 0
    assert torch.equal(loaded["backbone.fpn_output2.weight"], saved["backbone.fpn_output2.weight"])
    assert loaded["mask_head.conv_pred.weight"].shape[0] == 64


def test_a_random_file_as_weights_ends_with_our_message(tmp_path):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(os.urandom(4096))
    argv = tiny_fruit_argv(tmp_path / "out", "MODEL.WEIGHTS", str(weights), eval_only=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "train_net.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ValueError: Cannot read {weights} as a checkpoint"), last
    assert "weights_only" not in proc.stderr  # never the advice to load it unsafely
