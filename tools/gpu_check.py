"""Check solov2_d2 on a CUDA GPU: tests, agreement with the CPU, AMP training, NCCL, speed, memory.

    .venv/bin/python tools/gpu_check.py                    # every step on the GPU
    .venv/bin/python tools/gpu_check.py --device cpu       # the steps' CPU versions
    .venv/bin/python tools/gpu_check.py --steps agreement training --tiny

`bash tools/gpu_check.sh` builds the environment first and runs this. Steps, in order, each within
what is left of --budget-s (counted from $SOLOV2_GPU_CHECK_START when set, else from the start):

- tests:     the CUDA tests, `pytest -m cuda` (skipped without a GPU).
- agreement: the fruit model (configs/fruit/SOLOv2_R18_fruit.yaml, seeded random initialisation,
             or --weights) on the CPU and on the device, on fruit photos: detections in
             inference; head outputs, losses and the gradient norm in training. The device computes
             in IEEE float32 for it (no TF32). Tolerance: |device - cpu| <= 1e-3 * max|cpu| for
             every head output and loss, 1e-2 relative for the gradient norm.
- training:  train_net's Trainer on fruit_train, AMP (float16, GradScaler) on CUDA and float32
             on the CPU: every loss finite and the mean of the last fifth of the iterations
             below that of the first fifth; peak memory on CUDA; the final evaluation runs too.
- nccl:      `train_net.py --num-gpus 2` (NCCL, AMP), when the machine has two GPUs.
- benchmark: `bench/benchmark.py --device DEVICE --quick`.
- memory:    `bench/bench_train_memory.py --device DEVICE`: peak memory of one training iteration
             of SOLOv2-R50 on 2 images of 800x1333 with 100 instances each.

Prints one summary table (Markdown) and writes it, with the details, to --out (gpu_check.md,
gpu_check.json). Exit status 1 when a step fails; skipped steps (no GPU, one GPU, no time left)
do not fail.
"""
import argparse
import contextlib
import copy
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this repository's solov2_d2 and train_net

import solov2_d2  # noqa: E402  # isort: split

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402

FRUIT_CONFIG = "configs/fruit/SOLOv2_R18_fruit.yaml"
STEPS = ("tests", "agreement", "training", "nccl", "benchmark", "memory")
# Seconds a step needs at least; with less left it is skipped.
MIN_SECONDS = {
    "tests": 60,
    "agreement": 30,
    "training": 60,
    "nccl": 90,
    "benchmark": 60,
    "memory": 60,
}
OUTPUT_TOLERANCE = 1e-3
GRADIENT_TOLERANCE = 1e-2
# The fruit config at small sizes for quick CPU runs (--tiny).
TINY = [
    "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 192,
    "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 192,
    "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.SOLOV2.INSTANCE_CHANNELS", 64,
    "MODEL.SOLOV2.MASK_CHANNELS", 32, "MODEL.SOLOV2.MASK_DIM", 32,
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 1,
]  # fmt: skip


@contextlib.contextmanager
def ieee_float32():
    """Float32 matrix products and convolutions in IEEE float32 on CUDA (TF32 off), restored
    afterwards: a comparison with the CPU at float32 tolerances needs it (convolutions use TF32
    by default)."""
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9
        flags = [(torch.backends.cuda.matmul, "fp32_precision", "ieee")]
        flags.append((torch.backends.cudnn.conv, "fp32_precision", "ieee"))
    else:
        flags = [(torch.backends.cuda.matmul, "allow_tf32", False)]
        flags.append((torch.backends.cudnn, "allow_tf32", False))
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


def fruit_cfg(device: str, tiny: bool, *opts):
    cfg = get_cfg()
    solov2_d2.add_solov2_config(cfg)
    cfg.merge_from_file(str(REPO / FRUIT_CONFIG))
    cfg.merge_from_list((TINY if tiny else []) + ["MODEL.DEVICE", device, *opts])
    return cfg


def _environment() -> dict:
    """The subprocesses' environment: this repository first on the Python path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(cmd, timeout, log: Path):
    """Run `cmd` in the repository; its output goes to `log`. Returns (return code, seconds);
    return code None when it ran out of time."""
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, cwd=REPO, env=_environment(), stdout=f, stderr=subprocess.STDOUT,
                timeout=timeout,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = None
    return rc, time.perf_counter() - start


def _tail(log: Path, lines=5) -> str:
    return " / ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


class GpuCheck:
    """The steps; each returns (status, details), status "pass", "FAIL" or "skipped"."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.tiny = args.tiny
        self.weights = args.weights
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        start = float(os.environ.get("SOLOV2_GPU_CHECK_START", time.time()))
        self.deadline = start + args.budget_s

    def remaining(self) -> float:
        return self.deadline - time.time()

    def unavailable(self):
        """Why the device cannot run the checks, or None."""
        if self.device.type != "cuda" or torch.cuda.is_available():
            return None
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        return (
            f"no CUDA GPU: torch {torch.__version__} ({build}) sees none; on a GPU machine "
            "install a torch for its driver (SOLOV2_CUDA_TORCH, tools/gpu_check.sh)"
        )

    # -- steps -----------------------------------------------------------------------------

    def tests(self):
        xml = self.out / "cuda_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
        cmd += [f"--junitxml={xml}", "tests"]
        rc, _ = _run(cmd, self.remaining() - 5, self.out / "cuda_tests.log")
        if rc is None:
            return "FAIL", "timed out"
        if not xml.exists():
            return "FAIL", f"pytest exit {rc}: {_tail(self.out / 'cuda_tests.log')}"
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total, skipped = int(suite.get("tests")), int(suite.get("skipped"))
        failed = int(suite.get("failures")) + int(suite.get("errors"))
        details = f"{total - skipped - failed} passed, {failed} failed, {skipped} skipped"
        if failed or rc not in (0, 5):
            return "FAIL", details + f" (see {self.out / 'cuda_tests.log'})"
        return ("pass" if total > skipped else "skipped"), details

    def agreement(self):
        opts = ["INPUT.RANDOM_FLIP", "none", "INPUT.MASK_FORMAT", "bitmask"]
        cfg = fruit_cfg("cpu", self.tiny, *opts)
        torch.manual_seed(0)
        cpu_model = build_model(cfg)
        if self.weights:
            DetectionCheckpointer(cpu_model).load(self.weights)
        device_model = copy.deepcopy(cpu_model).to(self.device)
        test_inputs = _mapped(cfg, "fruit_val", 2, is_train=False)
        train_inputs = _mapped(cfg, "fruit_train", 2, is_train=True)
        with ieee_float32():
            runs = [_outputs(m, test_inputs, train_inputs) for m in (cpu_model, device_model)]
        (cpu_values, cpu_dets, cpu_grad), (values, dets, grad) = runs
        worst = max(
            (a.cpu() - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
            for a, b in zip(values, cpu_values)
        )
        grad_error = abs(grad - cpu_grad) / cpu_grad
        counts = [len(d) for d in dets] == [len(d) for d in cpu_dets]
        score_error = max(
            [(a.cpu() - b).abs().max().item() for a, b in zip(dets, cpu_dets) if len(b)] or [0.0]
        ) if counts else math.inf  # fmt: skip
        ok = worst <= OUTPUT_TOLERANCE and grad_error <= GRADIENT_TOLERANCE
        ok = ok and counts and score_error <= OUTPUT_TOLERANCE
        details = (
            f"heads and losses max rel. diff {worst:.1e} (tol {OUTPUT_TOLERANCE:g}), gradient norm "
            f"{grad_error:.1e} (tol {GRADIENT_TOLERANCE:g}), detections "
            f"{[len(d) for d in dets]} vs cpu {[len(d) for d in cpu_dets]}, max score diff "
            f"{score_error:.1e}; {'weights ' + self.weights if self.weights else 'seeded init'}"
        )
        return ("pass" if ok else "FAIL"), details

    def training(self):
        import train_net

        out = self.out / "training"
        out.mkdir(exist_ok=True)
        cuda = self.device.type == "cuda"
        iterations = 40 if self.tiny else 60
        cfg = fruit_cfg(
            str(self.device), self.tiny,
            "SOLVER.AMP.ENABLED", cuda, "SOLVER.MAX_ITER", iterations, "TEST.EVAL_PERIOD", 0,
            "SOLVER.CHECKPOINT_PERIOD", 10**6, "OUTPUT_DIR", str(out), "SEED", 0,
        )  # fmt: skip
        _log_to(out / "log.txt")
        seed_all_rng(cfg.SEED)  # as train_net's default_setup: model and data order
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        trainer = train_net.Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        losses = [v for v, _ in trainer.storage.history("total_loss").values()]
        fifth = max(1, len(losses) // 5)
        first, last = statistics.mean(losses[:fifth]), statistics.mean(losses[-fifth:])
        ok = len(losses) == iterations and all(map(math.isfinite, losses)) and last < first
        kind = "AMP float16" if cuda else "float32"
        details = f"{kind}, {len(losses)} iterations, total loss {first:.3f} -> {last:.3f}"
        if cuda:
            details += f", peak {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MB"
        ap = trainer.storage.latest().get("segm/AP")
        if ap is not None:
            details += f", fruit_val mask AP {ap[0]:.1f}"
        return ("pass" if ok else "FAIL"), details

    def nccl(self):
        found = torch.cuda.device_count() if self.device.type == "cuda" else 0
        if found < 2:
            return "skipped", f"needs 2 CUDA GPUs, found {found}"
        out = self.out / "nccl"
        cmd = [sys.executable, "train_net.py", "--config-file", FRUIT_CONFIG, "--num-gpus", "2"]
        cmd += ["MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "40"]
        cmd += ["SOLVER.IMS_PER_BATCH", "8", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out)]
        cmd += ["SOLVER.CHECKPOINT_PERIOD", "1000000"]
        out.mkdir(exist_ok=True)
        rc, seconds = _run(cmd, self.remaining() - 5, out / "stdout.log")
        if rc != 0:
            return "FAIL", f"exit {rc}: {_tail(out / 'stdout.log')}"
        metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
        losses = [m["total_loss"] for m in metrics if "total_loss" in m]
        ok = bool(losses) and all(map(math.isfinite, losses))
        return ("pass" if ok else "FAIL"), f"2 processes, 40 iterations, total loss {losses}"

    def benchmark(self):
        out = self.out / "benchmark"
        cmd = [sys.executable, "bench/benchmark.py", "--device", str(self.device), "--quick"]
        rc, _ = _run(cmd + ["--out", str(out)], self.remaining() - 5, self.out / "benchmark.log")
        if rc != 0:
            return "FAIL", f"exit {rc}: {_tail(self.out / 'benchmark.log')}"
        return "pass", f"results in {out / 'benchmark.md'}"

    def memory(self):
        cmd = [sys.executable, "bench/bench_train_memory.py", "--device", str(self.device)]
        if self.tiny:
            cmd += ["--config", FRUIT_CONFIG, "--height", "256", "--width", "320"]
            cmd += ["--instances", "10"]
        log = self.out / "memory.log"
        rc, _ = _run(cmd + ["--json"], self.remaining() - 5, log)
        if rc != 0:
            return "FAIL", f"exit {rc}: {_tail(log)}"
        results = json.loads(log.read_text().strip().splitlines()[-1])
        parts = ", ".join(
            f"{r['part']} peak {r['peak_mb']:.0f} MB (+{r['increase_mb']:.0f})" for r in results
        )
        r = results[0]
        return "pass", (
            f"{parts}; {Path(r['config']).stem}, {r['batch']} x {r['height']}x{r['width']}, "
            f"{r['positive_cells']} positive cells"
        )

    # -- driver ----------------------------------------------------------------------------

    def run(self, steps):
        results = []
        reason = self.unavailable()
        for step in STEPS:
            start = time.perf_counter()
            if step not in steps:
                status, details = "skipped", "not selected"
            elif reason:
                status, details = "skipped", reason
            elif self.remaining() < MIN_SECONDS[step]:
                status, details = "skipped", f"time budget: {self.remaining():.0f} s left"
            else:
                try:
                    status, details = getattr(self, step)()
                except Exception as e:  # a failing step is reported; the others still run
                    logging.getLogger(__name__).exception("step %s", step)
                    status, details = "FAIL", f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - start
            results.append({"step": step, "status": status, "seconds": seconds, "details": details})
            print(f"[gpu_check] {step}: {status} ({seconds:.0f} s) {details}", flush=True)
        return results

    def header(self) -> str:
        if self.device.type == "cuda" and torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            where = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        else:
            where = str(self.device) + ("" if self.device.type == "cpu" else " (unavailable)")
        return (
            f"solov2_d2 GPU check on {where}; torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}."
        )


def _mapped(cfg, dataset: str, count: int, is_train: bool):
    mapper = DatasetMapper(cfg, is_train=is_train)
    return [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get(dataset)[:count]]


def _outputs(model, test_inputs, train_inputs):
    """Detection scores in inference; in training, the head outputs (the network runs on the
    padded batch there, on every device), the losses and the gradient norm."""
    model.eval()
    with torch.no_grad():
        scores = [r["instances"].scores for r in model(test_inputs)]
    heads = []
    hooks = [
        model.ins_head.register_forward_hook(lambda m, i, o: heads.extend(o[0] + o[1])),
        model.mask_head.register_forward_hook(lambda m, i, o: heads.append(o)),
    ]
    model.train()
    model.zero_grad()
    losses = model(train_inputs)
    for h in hooks:
        h.remove()
    sum(losses.values()).backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    grad_norm = torch.cat(grads).norm().item()
    values = [h.detach() for h in heads] + [losses[k].detach() for k in sorted(losses)]
    return values, scores, grad_norm


def _log_to(path: Path):
    """detectron2's log to `path` only, so that the console keeps the check's own lines."""
    logger = logging.getLogger("detectron2")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s"))
    logger.addHandler(handler)


def markdown(header: str, results) -> str:
    lines = [header, "", "| step | status | s | details |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['details']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--budget-s", type=float, default=480.0, help="for all steps together")
    parser.add_argument("--tiny", action="store_true", help="small inputs (quick CPU runs)")
    parser.add_argument("--weights", default="", help="a fruit checkpoint for the agreement step")
    parser.add_argument("--out", default=str(REPO / "output" / "gpu_check"))
    args = parser.parse_args(argv)
    check = GpuCheck(args)
    results = check.run(args.steps)
    table = markdown(check.header(), results)
    (check.out / "gpu_check.md").write_text(table)
    (check.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
