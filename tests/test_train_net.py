"""train_net.py on the fruit data: training, checkpoints, resuming, evaluation, refusals."""
import json
import math
import subprocess
import sys

import solov2_d2  # noqa: F401  # isort: split

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402

FRUIT_CONFIG = str(REPO / "configs" / "fruit" / "SOLOv2_R18_fruit.yaml")

# The fruit config at a size that trains in seconds: short side 128, narrow heads, every cell
# kept at inference so that an untrained model has predictions to evaluate.
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLOV2.INSTANCE_CHANNELS", "64",
    "MODEL.SOLOV2.MASK_CHANNELS", "32", "MODEL.SOLOV2.MASK_DIM", "32",
    "MODEL.SOLOV2.SCORE_THRESH_TEST", "0.0", "MODEL.SOLOV2.UPDATE_THRESH_TEST", "0.0",
    "MODEL.SOLOV2.MAX_PER_IMAGE_TEST", "10",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
]  # fmt: skip


def _args(output_dir, *opts, eval_only=False, resume=False):
    argv = ["--config-file", FRUIT_CONFIG]
    argv += ["--eval-only"] if eval_only else []
    argv += ["--resume"] if resume else []
    argv += TINY + ["OUTPUT_DIR", str(output_dir), *opts]
    return train_net.argument_parser().parse_args(argv)


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
    assert {"model", "trainer"} <= set(checkpoint)  # trainer: optimizer, scheduler
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
