"""Two CPU processes through solov2_d2.engine.launch.launch: training and evaluation in step."""
import sys

import solov2_d2  # noqa: F401  # isort: split

import pytest
import torch
from conftest import REPO, tiny_fruit_argv
from torch.nn.parallel import DistributedDataParallel

from detectron2.utils import comm

from solov2_d2.engine.launch import launch

sys.path.insert(0, str(REPO))
import train_net  # noqa: E402


def _train_and_report(args, report_file):
    """Runs in every process: train, evaluate, and send rank 0 what each process saw."""
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = {k: v.clone() for k, v in trainer.model.module.state_dict().items()}
    trainer.train()
    test_loader = train_net.Trainer.build_test_loader(cfg, "fruit_val")
    report = {
        "rank": comm.get_rank(),
        "local_rank": comm.get_local_rank(),
        "ddp": isinstance(trainer.model, DistributedDataParallel),
        "threads": torch.get_num_threads(),
        # After the loop, `iter` is one past the last iteration run.
        "iter": trainer.iter,
        "momentum_buffers": len(trainer.optimizer.state),
        "initial": initial,
        "final": trainer.model.module.state_dict(),
        "test_images": [x["image_id"] for batch in test_loader for x in batch],
    }
    reports = comm.all_gather(report)
    if comm.is_main_process():
        torch.save(reports, report_file)


def test_two_cpu_processes_train_in_step_and_gather_evaluation(tmp_path):
    out = tmp_path / "out"
    args = train_net.argument_parser().parse_args(tiny_fruit_argv(out, "SOLVER.MAX_ITER", "2"))
    report_file = tmp_path / "reports.pth"
    launch(
        _train_and_report,
        2,
        device="cpu",
        dist_url="auto",
        args=(args, str(report_file)),
    )
    reports = torch.load(report_file, weights_only=False)
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["local_rank"] for r in reports] == [0, 1]
    assert all(r["ddp"] for r in reports)
    assert all(r["threads"] == max(1, torch.multiprocessing.cpu_count() // 2) for r in reports)
    # Both processes stepped, and their parameters stayed equal: gradients are averaged.
    assert all(r["iter"] == 2 and r["momentum_buffers"] > 0 for r in reports)
    first, second = reports[0]["final"], reports[1]["final"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], reports[0]["initial"][k]) for k in first)
    # Evaluation: each process ran inference on its own half of fruit_val, and rank 0 evaluated
    # the predictions gathered from both.
    assert reports[0]["test_images"] and reports[1]["test_images"]
    assert sorted(reports[0]["test_images"] + reports[1]["test_images"]) == [14, 15, 16, 17]
    gathered = torch.load(
        out / "inference" / "fruit_val" / "instances_predictions.pth", weights_only=False
    )
    assert sorted(p["image_id"] for p in gathered) == [14, 15, 16, 17]
    assert (out / "inference" / "results.json").exists()


def test_train_net_launches_cpu_processes_with_gloo_and_gpus_with_detectron2(monkeypatch):
    calls = []
    monkeypatch.setattr(train_net, "launch", lambda *a, **k: calls.append((a, k)))
    parser = train_net.argument_parser()
    train_net.launch_main(parser.parse_args(["--num-cpu-processes", "2", "--dist-url", "auto"]))
    (func, processes), kwargs = calls[-1]
    assert (func, processes, kwargs["device"]) == (train_net.main, 2, "cpu")
    assert kwargs["dist_url"] == "auto"
    train_net.launch_main(parser.parse_args([]))
    assert calls[-1][0][1:] == (1,) and calls[-1][1]["device"] == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--num-cpu-processes"):
            train_net.launch_main(parser.parse_args(["--num-gpus", "2"]))
