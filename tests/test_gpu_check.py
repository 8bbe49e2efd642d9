"""tools/gpu_check.sh and tools/gpu_check.py without a GPU: the CPU versions of the steps, the
skips (no GPU, no time left) and the failure report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


def _check(tmp_path, *args, timeout=600):
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = {r["step"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())}
    return run, results


def test_cpu_versions_of_the_steps_pass_and_one_table_is_printed(tmp_path):
    steps = ["tests", "agreement", "training", "memory"]
    run, results = _check(tmp_path, "--device", "cpu", "--tiny", "--steps", *steps)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert list(results) == list(gpu_check.STEPS)
    # The CUDA tests are collected; without a GPU every one is skipped.
    assert results["tests"]["status"] in ("pass", "skipped")
    assert " 0 failed" in results["tests"]["details"]
    # The same model on the same device: no difference at all.
    assert results["agreement"]["status"] == "pass"
    assert "max rel. diff 0.0e+00" in results["agreement"]["details"]
    assert results["training"]["status"] == "pass"
    assert results["training"]["details"].startswith("float32, 40 iterations")
    assert results["memory"]["status"] == "pass"
    assert "iteration peak" in results["memory"]["details"]
    for step in ("nccl", "benchmark"):
        assert results[step] == dict(results[step], status="skipped", details="not selected")
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in run.stdout
    assert table.count("\n| ") == 1 + len(gpu_check.STEPS)  # header row and one row per step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_script_without_a_gpu_reports_every_step_skipped(tmp_path):
    env = dict(os.environ, SOLOV2_VENV=str(Path(sys.executable).parents[1]))
    run = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh"), "--no-bootstrap", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["step"] for r in results] == list(gpu_check.STEPS)
    for r in results:
        assert r["status"] == "skipped" and r["details"].startswith("no CUDA GPU"), r


def test_steps_that_do_not_fit_the_budget_are_skipped(tmp_path):
    run, results = _check(tmp_path, "--device", "cpu", "--budget-s", "20", "--steps", "training")
    assert run.returncode == 0
    assert results["training"]["status"] == "skipped"
    assert results["training"]["details"].startswith("time budget")


def test_a_failing_step_is_reported_and_fails_the_check(tmp_path):
    missing = str(tmp_path / "missing.pth")
    run, results = _check(
        tmp_path, "--device", "cpu", "--tiny", "--steps", "agreement", "--weights", missing
    )
    assert run.returncode == 1
    assert results["agreement"]["status"] == "FAIL"
    assert "missing.pth" in results["agreement"]["details"]
    assert "| agreement | FAIL |" in run.stdout


def test_ieee_float32_turns_tf32_off_and_restores_the_settings():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        with gpu_check.ieee_float32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert conv.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
