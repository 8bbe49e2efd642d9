#!/usr/bin/env python
"""
Train or evaluate SOLOv2 with detectron2's standard training loop.

Examples:

    # training (add --resume to continue from the last checkpoint in OUTPUT_DIR)
    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --num-gpus 8 \\
        MODEL.WEIGHTS /path/to/R-50.pkl
    # evaluation of a trained model
    python train_net.py --config-file configs/SOLOv2_R50_3x.yaml --eval-only \\
        MODEL.WEIGHTS output/model_final.pth
    # from scratch on the CPU, in 2 processes (gloo)
    python train_net.py --config-file configs/fruit/SOLOv2_R18_fruit.yaml --num-cpu-processes 2

Evaluation picks detectron2's evaluator from the test dataset's metadata `evaluator_type`:
"coco" (COCOEvaluator, mask and box AP) or "lvis" (LVISEvaluator). `--eval-only` refuses
weights that leave part of the model at its random initialisation (empty MODEL.WEIGHTS, a
checkpoint of another config) unless `--eval-incomplete-weights` is given.

A resumed run (`--resume`) trains on the same batches as the uninterrupted run would have (see
solov2_d2.data.train_loader), so its weights are the same.
"""
import argparse
import json
import logging
import os
import weakref

import torch

# Bridges a detectron2 without compiled ops before any detectron2 module is imported.
import solov2_d2  # noqa: F401  # isort: split

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
    hooks,
)
from detectron2.evaluation import COCOEvaluator, LVISEvaluator, verify_results
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from solov2_d2 import add_solov2_config
from solov2_d2.checks import check_amp_device, check_dataset_classes, check_weights_are_local
from solov2_d2.config import check_solver_config
from solov2_d2.data import (
    SOLOv2DatasetMapper,
    build_resumable_train_loader,
    check_coco_datasets,
    refresh_coco_json,
)
from solov2_d2.engine.checkpoint import SOLOv2Checkpointer
from solov2_d2.engine.ema import add_model_ema_hook
from solov2_d2.engine.launch import create_ddp_model, launch
from solov2_d2.engine.solver import build_optimizer
from solov2_d2.export import add_runtime_argument
from solov2_d2.modeling.test_time_augmentation import SOLOv2WithTTA


class Trainer(DefaultTrainer):
    """
    Detectron2's DefaultTrainer (SGD, LR schedule, gradient clipping from
    ``SOLVER.CLIP_GRADIENTS``, checkpoints, periodic evaluation with ``TEST.EVAL_PERIOD``,
    console/JSON/TensorBoard writers, AMP with ``SOLVER.AMP.ENABLED``), with SOLOv2's evaluators,
    DistributedDataParallel that also works for CPU processes, a training data stream that a
    resumed run continues exactly, data errors that name the image and checkpoint errors that
    name the file.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with solov2_d2's create_ddp_model and checkpointer: it offers
        # no hook for either (detectron2's create_ddp_model passes `device_ids`, which DDP
        # refuses for CPU modules).
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = SOLOv2Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """detectron2's hooks; with TEST.AUG.ENABLED also an evaluation with test-time
        augmentation after training; with MODEL_EMA.ENABLED the weight average, which every
        evaluation and model_final.pth use (solov2_d2.engine.ema)."""
        ret = super().build_hooks()
        if self.cfg.TEST.AUG.ENABLED:  # after the plain evaluation, before the writers
            last = max(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            tta = hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model))
            ret.insert(last + 1, tta)
        return add_model_ema_hook(self, ret)

    def resume_or_load(self, resume=True):
        """detectron2's, and the data stream skips the batches of the iterations done."""
        super().resume_or_load(resume)
        self._trainer.data_loader.start_batch = self.start_iter

    def state_dict(self):
        """detectron2 0.6's (iteration, hooks: the LR scheduler), plus what else determines the
        rest of the run: the optimizer's state (momentum; AMP's grad scaler) under the key of
        later detectron2 versions, and the data stream's seed."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["data_loader"] = self._trainer.data_loader.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Both are absent from checkpoints written before they were saved.
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        if "data_loader" in state_dict:
            self._trainer.data_loader.load_state_dict(state_dict["data_loader"])

    @classmethod
    def build_train_loader(cls, cfg):
        """Batches that depend only on (seed, iteration): see
        :func:`solov2_d2.data.build_resumable_train_loader`."""
        return build_resumable_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader with a mapper whose errors name the image."""
        return build_detection_test_loader(
            cfg, dataset_name, mapper=SOLOv2DatasetMapper(cfg, False)
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SGD with ``SOLVER.CLIP_GRADIENTS``, including the authors' clipping of the norm of
        all gradients together (``CLIP_TYPE "full_model"``, :mod:`solov2_d2.engine.solver`)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCOEvaluator (segm and bbox) or LVISEvaluator, by the dataset's `evaluator_type`."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type == "coco":
            # A dataset without a json file is converted again: not detectron2's cached conversion.
            refresh_coco_json(dataset_name, output_folder)
            return COCOEvaluator(dataset_name, tasks=("segm", "bbox"), output_dir=output_folder)
        if evaluator_type == "lvis":
            return LVISEvaluator(dataset_name, tasks=("segm", "bbox"), output_dir=output_folder)
        raise NotImplementedError(
            f"No SOLOv2 evaluator for dataset {dataset_name!r} with evaluator_type "
            f"{evaluator_type!r}: register it with evaluator_type 'coco' or 'lvis' (e.g. with "
            "solov2_d2.data.register_labelme_instances or register_coco_instances)."
        )

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """The evaluation of :meth:`test` with test-time augmentation (TEST.AUG, SOLOv2WithTTA):
        results keyed "<task>_TTA", written under OUTPUT_DIR/inference_TTA."""
        logging.getLogger("detectron2.trainer").info("Evaluation with test-time augmentation")
        folder = os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=os.path.join(folder, name))
            for name in cfg.DATASETS.TEST
        ]
        results = super().test(cfg, SOLOv2WithTTA(cfg, model), evaluators)
        results = {f"{k}_TTA": v for k, v in results.items()}
        if comm.is_main_process():
            PathManager.mkdirs(folder)
            with PathManager.open(os.path.join(folder, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
        return results

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """detectron2's evaluation on every test dataset; the main process also writes the
        results to OUTPUT_DIR/inference/results.json (overwritten by each evaluation)."""
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            path = os.path.join(cfg.OUTPUT_DIR, "inference", "results.json")
            PathManager.mkdirs(os.path.dirname(path))
            with PathManager.open(path, "w") as f:
                json.dump(results, f, indent=2)
        return results


def setup(args):
    """Load the config from the file and the command line, check that it can run here, and do
    detectron2's default setup (logging, seeds, config backup in OUTPUT_DIR)."""
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if args.num_cpu_processes > 0 and cfg.MODEL.DEVICE != "cpu":
        raise ValueError(
            f"--num-cpu-processes runs CPU processes, but MODEL.DEVICE is "
            f"{cfg.MODEL.DEVICE!r}: add MODEL.DEVICE cpu, or use --num-gpus for GPUs."
        )
    check_weights_are_local(cfg.MODEL.WEIGHTS)
    if not args.eval_only:
        check_amp_device(cfg)
        check_solver_config(cfg)
    # Training ends with an evaluation on DATASETS.TEST.
    datasets = cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN + cfg.DATASETS.TEST
    check_dataset_classes(cfg.MODEL.SOLOV2.NUM_CLASSES, datasets)
    # COCO json files (also those registered with detectron2's register_coco_instances) are
    # checked: duplicate ids, annotations without segmentation, empty or inconsistent boxes.
    check_coco_datasets(datasets)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)

    runtime = getattr(args, "onnx_runtime", "onnxruntime")
    if runtime != "onnxruntime" and not getattr(args, "onnx", None):
        raise ValueError(f"--onnx-runtime {runtime} runs an exported model: give --onnx FILE.")
    if getattr(args, "onnx", None):
        # A model exported by `python -m solov2_d2.export`, evaluated in ONNX Runtime (or
        # OpenVINO) as --eval-only evaluates the eager model (same evaluators, same results.json).
        from solov2_d2.export import OnnxInferenceModel, OnnxPredictor

        if not args.eval_only:
            raise ValueError(
                f"--onnx {args.onnx}: an exported model is only evaluated, with --eval-only."
            )
        if cfg.TEST.AUG.ENABLED:  # the graph runs one view at its recorded size
            logging.getLogger(__name__).warning(
                f"--onnx {args.onnx}: test-time augmentation (TEST.AUG.ENABLED) is not run on "
                "an exported model; it is evaluated without it."
            )
        res = Trainer.test(cfg, OnnxInferenceModel(OnnxPredictor(cfg, args.onnx, runtime=runtime)))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    if args.eval_only:
        model = Trainer.build_model(cfg)
        SOLOv2Checkpointer(
            model, save_dir=cfg.OUTPUT_DIR, require_complete=not args.eval_incomplete_weights
        ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _process_count(text: str) -> int:
    """--num-cpu-processes: an integer >= 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}; expected a number of processes >= 1")
    return value


def argument_parser():
    """detectron2's default arguments, plus --num-cpu-processes and --eval-incomplete-weights."""
    parser = default_argument_parser()
    parser.add_argument(
        "--num-cpu-processes",
        type=_process_count,
        default=0,
        help="number of CPU processes per machine for distributed training with the gloo "
        "backend (needs MODEL.DEVICE cpu); --num-gpus is ignored when this is set",
    )
    parser.add_argument(
        "--eval-incomplete-weights",
        action="store_true",
        help="with --eval-only: evaluate even if MODEL.WEIGHTS is empty or leaves some of the "
        "model's parameters at their random initialisation (refused otherwise)",
    )
    parser.add_argument(
        "--onnx",
        metavar="FILE",
        help="with --eval-only: evaluate this model exported by `python -m solov2_d2.export` "
        "(in ONNX Runtime, on the CPU) instead of MODEL.WEIGHTS",
    )
    add_runtime_argument(parser)
    return parser


def launch_main(args):
    """Run :func:`main` in the processes the arguments ask for."""
    if args.num_cpu_processes < 0:  # the parser refuses it; arguments built in code may not
        raise ValueError(
            f"--num-cpu-processes {args.num_cpu_processes}; expected a number of processes >= 1."
        )
    on_cpu = args.num_cpu_processes > 0
    if not on_cpu and args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        raise ValueError(
            f"--num-gpus {args.num_gpus} (x {args.num_machines} machines) needs CUDA, which "
            "is not available: for CPU processes use --num-cpu-processes N with MODEL.DEVICE cpu."
        )
    launch(
        main,
        args.num_cpu_processes if on_cpu else args.num_gpus,
        device="cpu" if on_cpu else "cuda",
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_main(args)
