"""Multi-process training on CPUs (gloo), beside detectron2's GPU launcher (NCCL).

Detectron2 0.6's :func:`detectron2.engine.launch` asserts CUDA, hard-codes the NCCL backend and
binds each process to a GPU; its :func:`detectron2.engine.create_ddp_model` passes
``device_ids``, which DistributedDataParallel refuses for CPU modules. Everything else of
detectron2's distributed machinery (``detectron2.utils.comm``: ranks, barriers, gather,
all_gather, the local process group; distributed samplers and evaluators) works with any
backend once a process group exists. So this module only adds:

* :func:`launch`: detectron2's launcher for GPUs, unchanged; for CPU processes the same
  protocol (one process per worker on each machine, a global process group, detectron2's local
  process group, a barrier) with the gloo backend;
* :func:`create_ddp_model`: detectron2's for GPU modules; for CPU modules the same wrapper
  without ``device_ids``.
"""
import logging
import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import create_ddp_model as _create_gpu_ddp_model
from detectron2.engine import launch as _launch_gpus
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm

__all__ = ["launch", "create_ddp_model"]

logger = logging.getLogger(__name__)


def launch(
    main_func,
    num_processes_per_machine: int,
    *,
    device: str = "cuda",
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args=(),
    timeout: timedelta = DEFAULT_TIMEOUT,
):
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each machine.

    Args:
        main_func: a picklable function (module level), called in every process.
        num_processes_per_machine: GPUs per machine (device "cuda") or CPU worker processes per
            machine (device "cpu").
        device: "cuda": detectron2's :func:`detectron2.engine.launch` (NCCL, one GPU per
            process). "cpu": processes with the gloo backend; each gets an equal share of the
            machine's cores as torch threads.
        num_machines, machine_rank, dist_url, timeout: as in detectron2's launch (``dist_url``
            "auto" picks a free local port; single machine only).
        args: the arguments of ``main_func``.
    """
    if device != "cpu":
        _launch_gpus(
            main_func,
            num_processes_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
            timeout=timeout,
        )
        return
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url 'auto' only works on one machine; give a tcp:// URL.")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    worker_args = (main_func, world_size, num_processes_per_machine, machine_rank, dist_url)
    mp.spawn(
        _cpu_worker,
        nprocs=num_processes_per_machine,
        args=(*worker_args, args, timeout),
        daemon=False,
    )


def _cpu_worker(
    local_rank, main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
    timeout,
):
    """One CPU process: what detectron2's GPU worker does, with gloo and no GPU binding."""
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logger.error("Process group URL: %s", dist_url)
        raise

    # detectron2's local process group: the ranks of this machine (comm.get_local_rank() etc.).
    if comm._LOCAL_PROCESS_GROUP is not None:
        raise RuntimeError("The local process group already exists in this process.")
    num_machines = world_size // num_processes_per_machine
    for i in range(num_machines):
        ranks_on_i = list(
            range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine)
        )
        group = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group

    # Processes share the machine's cores; more threads than cores slows every one down.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_processes_per_machine))
    comm.synchronize()
    main_func(*args)


def create_ddp_model(model, **kwargs):
    """Wrap ``model`` in DistributedDataParallel when there is more than one process.

    GPU modules go through detectron2's :func:`detectron2.engine.create_ddp_model` (one device
    per process, ``device_ids`` set, optional fp16 gradient compression). CPU modules are wrapped
    without ``device_ids``, which DDP requires for them.

    Args:
        model: a torch.nn.Module, already on its device.
        kwargs: for GPU modules, arguments of detectron2's ``create_ddp_model``; for CPU
            modules, of DistributedDataParallel.
    """
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type != "cpu":
        return _create_gpu_ddp_model(model, **kwargs)
    return DistributedDataParallel(model, **kwargs)
