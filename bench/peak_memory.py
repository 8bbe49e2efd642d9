"""Peak memory of one call, each measurement in a fresh process: shared by the benchmarks."""
import json
import subprocess
import sys

import torch


def peak_memory_mb(fn, device: torch.device):
    """Run fn() once; returns (its result, peak MB, peak MB over the memory before the call).
    On the CPU: the process's peak RSS (VmHWM, reset first); on CUDA: max_memory_allocated."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return result, peak, peak - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _proc_status_mb("VmRSS")
    result = fn()
    peak = _proc_status_mb("VmHWM")
    return result, peak, peak - before


def run_in_fresh_process(script: str, flag: str, spec: dict) -> dict:
    """`python script flag JSON(spec)` in a new process (so that earlier measurements leave
    nothing behind); returns `spec` updated with the JSON dict of its last output line."""
    run = subprocess.run(
        [sys.executable, script, flag, json.dumps(spec)], capture_output=True, text=True, check=True
    )
    return dict(spec, **json.loads(run.stdout.strip().splitlines()[-1]))


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)
