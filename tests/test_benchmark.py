"""bench/benchmark.py --quick: every stage is measured and the results are written."""
import json
import subprocess
import sys

from conftest import REPO


def test_quick_benchmark_writes_sane_results(tmp_path):
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "benchmark.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "benchmark.json").read_text())
    table = (tmp_path / "benchmark.md").read_text()
    assert "load average" in table and "OMP_WAIT_POLICY" in table
    assert results["matmul_gflops"] > 0
    assert {(r["model"], r["batch"]) for r in results["inference"]} == {
        (model, batch)
        for model in ("SOLOv2-R50", "SOLOv2-Light-448-R50")
        for batch in (1, 2)
    }
    for r in results["inference"]:
        assert r["flops"] > 0
        for load in ("none", "compact", "heavy"):
            stages = [r[load][s] for s in ("preprocess", "backbone", "heads", "postprocess")]
            assert all(t > 0 for t in stages)
            assert r[load]["total"] >= sum(stages) * 0.999
        assert r["none"]["detections"] == 0
        assert r["compact"]["detections"] > 0 and r["heavy"]["detections"] > 0
    assert all(r["same_keep_and_labels"] and r["ours_ms"] > 0 for r in results["matrix_nms"])
    assert {r["load"] for r in results["postprocess"]} == {"compact", "heavy"}
    assert all(r["same"] and r["detections"] > 0 for r in results["postprocess"])
    assert results["training"]["ms"] > 0 and results["training"]["targets_ms"] > 0
    assert {r["load"] for r in results["peak_memory"]} == {"compact", "heavy"}
    assert all(r["peak_mb"] > 0 and r["detections"] > 0 for r in results["peak_memory"])


def test_stage_timer_counts_only_the_post_processors_call_as_post_processing(monkeypatch):
    """A model whose steps advance a fake clock by known amounts: the network's return (where
    it frees its features) counts in heads, the post-processor's call in post-processing, the
    model's own clean-up only in the total."""
    import torch

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import benchmark

    clock = [0.0]
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])

    def spend(seconds):
        clock[0] += seconds

    class Step(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            spend(self.seconds)
            return x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.mask_head = Step(1.0), Step(0.5)
            self.postprocessor = lambda x: spend(0.25) or x

        def network(self, x):
            x = self.mask_head(self.backbone(x))
            spend(0.125)  # returning: intermediate features freed
            return x

        def forward(self, x):
            spend(2.0)  # preprocessing
            out = self.postprocessor(self.network(x))
            spend(4.0)  # the model's clean-up
            return out

    model = Model()
    timer = benchmark.StageTimer(model, torch.device("cpu"))
    times = timer(lambda: model(torch.zeros(1)))
    expected = {"preprocess": 2000, "backbone": 1000, "heads": 625, "postprocess": 250}
    assert times == {**expected, "total": 7875}
