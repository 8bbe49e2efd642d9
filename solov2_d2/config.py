"""SOLOv2 config keys (`cfg.MODEL.SOLOV2`) with the defaults of the paper and reference code, and
checks of the config's values that name the key."""
import math

from detectron2.config import CfgNode as CN

__all__ = ["add_solov2_config", "check_solov2_config", "check_solver_config"]


def add_solov2_config(cfg):
    """Add the SOLOv2 keys to a detectron2 config, in place.

    Like detectron2's own `add_*_config` functions it only adds keys; `configs/Base-SOLOv2.yaml`
    sets the detectron2 keys a SOLOv2 model needs (meta-architecture, backbone, MASK_ON).
    """
    cfg.MODEL.SOLOV2 = CN()
    _C = cfg.MODEL.SOLOV2
    _C.NUM_CLASSES = 80

    # Kernel/category branch: one FPN level per grid. P2 is resized to half its size and P6 to
    # P5's size before the head, hence the strides.
    _C.INSTANCE_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    _C.INSTANCE_STRIDES = [8, 8, 16, 32, 32]
    _C.NUM_GRIDS = [40, 36, 24, 16, 12]
    # Ranges of sqrt(box area) in input pixels; they overlap, so an instance can be positive on
    # two levels.
    _C.SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    # Positive region: half-extents 0.5 * SIGMA * (w, h) around the mask's centre of mass.
    _C.SIGMA = 0.2
    _C.INSTANCE_CHANNELS = 512
    _C.NUM_INSTANCE_CONVS = 4
    # Side of the dynamic kernel predicted per cell; each has MASK_DIM * k * k weights.
    _C.DYNAMIC_KERNEL_SIZE = 1
    _C.NORM = "GN"
    # Two normalised (x, y) channels on the kernel branch's input and the mask branch's
    # deepest level.
    _C.USE_COORD_CONV = True
    _C.PRIOR_PROB = 0.01

    # Mask-feature branch: P2..P5 to one map at stride 4 with MASK_DIM (E) channels.
    _C.MASK_IN_FEATURES = ["p2", "p3", "p4", "p5"]
    _C.MASK_CHANNELS = 128
    _C.MASK_DIM = 256

    # Deformable convolutions (DCNv2) in the heads. Backbone stages use detectron2's keys
    # MODEL.RESNETS.DEFORM_ON_PER_STAGE / DEFORM_MODULATED / DEFORM_NUM_GROUPS.
    _C.DCN_IN_TOWER = "none"  # "none", "last" (last conv of each tower) or "all"
    _C.DCN_IN_MASK_BRANCH = False

    # Losses.
    _C.FOCAL_LOSS_ALPHA = 0.25
    _C.FOCAL_LOSS_GAMMA = 2.0
    _C.FOCAL_LOSS_WEIGHT = 1.0
    _C.DICE_LOSS_WEIGHT = 3.0
    # Which (cell, instance) pairs the Dice loss averages over where instances share a cell:
    # "all": the cell's kernel against each claiming instance's mask, as the references train;
    # "last_owner": the last claiming instance only (the category target in both cases).
    _C.MASK_LOSS_PAIRS = "all"

    # Training augmentations (solov2_d2.data.augmentation), all off as published; checked by
    # check_augmentation_config. Large-scale jitter: ResizeScale(MIN_SCALE, MAX_SCALE, SIZE,
    # SIZE) + FixedSizeCrop(SIZE) in place of ResizeShortestEdge.
    cfg.INPUT.LSJ = CN({"ENABLED": False, "SIZE": 1024, "MIN_SCALE": 0.1, "MAX_SCALE": 2.0})
    cfg.INPUT.LSJ.PAD_VALUE = 128.0
    # Brightness, contrast, saturation: intensity ranges [min, max] (1 leaves the image alone).
    cfg.INPUT.COLOR_JITTER = CN({"ENABLED": False})
    for key in ("BRIGHTNESS", "CONTRAST", "SATURATION"):
        cfg.INPUT.COLOR_JITTER[key] = (0.8, 1.2)
    # Instance copy-paste (solov2_d2.data.copy_paste): with probability PROB, instances of
    # another training image are pasted; covered instances keeping less than
    # MIN_VISIBLE_FRACTION of their pixels are dropped.
    cfg.INPUT.COPY_PASTE = CN({"ENABLED": False, "PROB": 0.5, "MIN_VISIBLE_FRACTION": 0.05})

    # Inference.
    _C.SCORE_THRESH_TEST = 0.1
    # If > 0, at most this many candidates per image, taken by category score before any mask
    # is computed; 0 scores every candidate, as the references do.
    _C.MAX_MASK_CANDIDATES = 0
    # Candidates whose masks are computed at once: bounds memory without dropping candidates.
    _C.MASK_CHUNK_SIZE = 256
    # "plain": post-processing as specified, every pixel of every candidate mask; "fast": only
    # the blocks of pixels where a mask may pass MASK_THRESH_TEST, when scoring masks and when
    # pasting them (same results); "auto": fast on the CPU, plain elsewhere.
    _C.INFERENCE_PATH = "auto"
    _C.MASK_THRESH_TEST = 0.5
    _C.PRE_NMS_TOPK_TEST = 500
    _C.NMS_KERNEL = "gaussian"  # or "linear"
    _C.NMS_SIGMA = 2.0
    _C.UPDATE_THRESH_TEST = 0.05
    _C.MAX_PER_IMAGE_TEST = 100
    # Boxes of the detections: "tight", the masks' tight boxes; "main_parts", the tight boxes of
    # the masks' main parts (8-connected parts at the mask features' resolution holding at least
    # BOX_MIN_PART_FRACTION of the mask, and the largest), not widened by stray fragments.
    _C.BOX_FROM = "tight"
    _C.BOX_MIN_PART_FRACTION = 0.1

    # Exponential moving average of the weights in training (solov2_d2.engine.ema): used by
    # every evaluation and saved as model_final.pth's "model". The k-th update's decay is
    # DECAY * (1 - exp(-k / WARMUP_ITERS)) (DECAY from the start with WARMUP_ITERS 0).
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.999
    cfg.MODEL_EMA.WARMUP_ITERS = 2000


def check_solov2_config(cfg):
    """Raise ValueError naming the keys when SOLOv2 settings disagree with each other."""
    c = cfg.MODEL.SOLOV2
    num_levels = len(c.INSTANCE_IN_FEATURES)
    for key in ("INSTANCE_STRIDES", "NUM_GRIDS", "SCALE_RANGES"):
        if len(c[key]) != num_levels:
            raise ValueError(
                f"MODEL.SOLOV2.{key} has {len(c[key])} entries but "
                f"MODEL.SOLOV2.INSTANCE_IN_FEATURES has {num_levels} levels "
                f"({list(c.INSTANCE_IN_FEATURES)}): give one per level."
            )
    for i, rng in enumerate(c.SCALE_RANGES):
        if len(rng) != 2 or not 0 <= rng[0] < rng[1]:
            raise ValueError(
                f"MODEL.SOLOV2.SCALE_RANGES[{i}] = {list(rng)} must be [low, high] "
                "with 0 <= low < high."
            )
    if num_levels < 1 or len(c.MASK_IN_FEATURES) < 1:
        raise ValueError(
            "MODEL.SOLOV2.INSTANCE_IN_FEATURES and MODEL.SOLOV2.MASK_IN_FEATURES must not be empty."
        )
    if c.DCN_IN_TOWER not in ("none", "last", "all"):
        raise ValueError(
            f"MODEL.SOLOV2.DCN_IN_TOWER = {c.DCN_IN_TOWER!r}; expected 'none', 'last' or 'all'."
        )
    if c.MASK_LOSS_PAIRS not in ("all", "last_owner"):
        raise ValueError(
            f"MODEL.SOLOV2.MASK_LOSS_PAIRS = {c.MASK_LOSS_PAIRS!r}; expected 'all' or "
            "'last_owner'."
        )
    if c.NMS_KERNEL not in ("gaussian", "linear"):
        raise ValueError(
            f"MODEL.SOLOV2.NMS_KERNEL = {c.NMS_KERNEL!r}; expected 'gaussian' or 'linear'."
        )
    if c.DYNAMIC_KERNEL_SIZE < 1 or c.DYNAMIC_KERNEL_SIZE % 2 == 0:
        raise ValueError(
            f"MODEL.SOLOV2.DYNAMIC_KERNEL_SIZE = {c.DYNAMIC_KERNEL_SIZE}; expected an odd size."
        )
    for key in ("PRE_NMS_TOPK_TEST", "MASK_CHUNK_SIZE"):
        if c[key] < 1:
            raise ValueError(f"MODEL.SOLOV2.{key} = {c[key]}; expected a positive integer.")
    if c.MAX_MASK_CANDIDATES < 0:
        raise ValueError(
            f"MODEL.SOLOV2.MAX_MASK_CANDIDATES = {c.MAX_MASK_CANDIDATES}; expected 0 (no cap) "
            "or a positive cap."
        )
    if c.INFERENCE_PATH not in ("auto", "plain", "fast"):
        raise ValueError(
            f"MODEL.SOLOV2.INFERENCE_PATH = {c.INFERENCE_PATH!r}; expected 'auto', 'plain' or "
            "'fast'."
        )
    if c.BOX_FROM not in ("tight", "main_parts"):
        raise ValueError(
            f"MODEL.SOLOV2.BOX_FROM = {c.BOX_FROM!r}; expected 'tight' or 'main_parts'."
        )
    if not 0 <= c.BOX_MIN_PART_FRACTION <= 1:
        raise ValueError(
            f"MODEL.SOLOV2.BOX_MIN_PART_FRACTION = {c.BOX_MIN_PART_FRACTION}; expected a value "
            "in [0, 1]."
        )
    if not 0 <= c.MASK_THRESH_TEST < 1:
        raise ValueError(
            f"MODEL.SOLOV2.MASK_THRESH_TEST = {c.MASK_THRESH_TEST}; expected a value in [0, 1)."
        )
    if c.NUM_CLASSES < 1:
        raise ValueError(f"MODEL.SOLOV2.NUM_CLASSES = {c.NUM_CLASSES}; expected at least 1.")
    if any(s < 1 for s in c.NUM_GRIDS):
        raise ValueError(
            f"MODEL.SOLOV2.NUM_GRIDS = {list(c.NUM_GRIDS)}; every grid needs at least 1 cell."
        )
    # Matrix NMS would cut nothing with MAX_PER_IMAGE_TEST <= 0, and a gaussian sigma <= 0 turns
    # suppression off (or into a boost): both silently change the results.
    if c.MAX_PER_IMAGE_TEST < 1:
        raise ValueError(
            f"MODEL.SOLOV2.MAX_PER_IMAGE_TEST = {c.MAX_PER_IMAGE_TEST}; expected at least 1 "
            "(the number of detections kept per image)."
        )
    if not c.NMS_SIGMA > 0:
        raise ValueError(f"MODEL.SOLOV2.NMS_SIGMA = {c.NMS_SIGMA}; expected a value > 0.")
    # Formats of detectron2's read_image with 3 channels, or "L": 1 channel, replicated to the 3
    # of PIXEL_MEAN or normalised on its own with a 1-value PIXEL_MEAN.
    channels_of_format = {"BGR": (3,), "RGB": (3,), "YUV-BT.601": (3,), "L": (1, 3)}
    fmt, mean, std = cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD
    if fmt not in channels_of_format:
        raise ValueError(f"INPUT.FORMAT = {fmt!r}; expected one of {sorted(channels_of_format)}.")
    if len(mean) not in channels_of_format[fmt]:
        raise ValueError(
            f"MODEL.PIXEL_MEAN = {list(mean)} has {len(mean)} values, but INPUT.FORMAT {fmt!r} "
            f"images have {' or '.join(map(str, channels_of_format[fmt]))} channels: give "
            "one value per channel."
        )
    if len(std) != len(mean) or not all(s > 0 for s in std):
        raise ValueError(
            f"MODEL.PIXEL_STD = {list(std)}; expected {len(mean)} values > 0, one per value "
            f"of MODEL.PIXEL_MEAN = {list(mean)}."
        )


def _require(ok: bool, key: str, value, expected: str):
    if not ok:
        raise ValueError(f"{key} = {value!r}; expected {expected}.")


def check_solver_config(cfg):
    """Raise ValueError naming the key and its value when a training setting (``SOLVER.*``,
    ``TEST.EVAL_PERIOD``) would crash training after it started (``CHECKPOINT_PERIOD 0``:
    ZeroDivisionError in fvcore after the first iteration; ``MAX_ITER 0``: an error of the LR
    scheduler) or train meaninglessly (a negative learning rate, a batch of no images).

    Checked: MAX_ITER, CHECKPOINT_PERIOD, IMS_PER_BATCH >= 1; BASE_LR, MOMENTUM, WEIGHT_DECAY,
    WEIGHT_DECAY_NORM, WEIGHT_DECAY_BIAS (unless None), BIAS_LR_FACTOR, WARMUP_ITERS,
    REFERENCE_WORLD_SIZE and TEST.EVAL_PERIOD >= 0 (finite); GAMMA > 0; WARMUP_FACTOR in
    [0, 1]; WARMUP_METHOD "linear" or "constant"; with LR_SCHEDULER_NAME "WarmupMultiStepLR",
    STEPS strictly increasing, each > 0 and none equal to MAX_ITER (fvcore's scheduler refuses
    it; detectron2 ignores larger ones with a warning).
    """
    s = cfg.SOLVER
    for key in ("MAX_ITER", "CHECKPOINT_PERIOD", "IMS_PER_BATCH"):
        _require(s[key] >= 1, f"SOLVER.{key}", s[key], "an integer >= 1")
    non_negative = ["BASE_LR", "MOMENTUM", "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "BIAS_LR_FACTOR"]
    non_negative += ["WARMUP_ITERS", "REFERENCE_WORLD_SIZE"]
    if s.WEIGHT_DECAY_BIAS is not None:
        non_negative.append("WEIGHT_DECAY_BIAS")
    for key in non_negative:
        _require(
            math.isfinite(s[key]) and s[key] >= 0, f"SOLVER.{key}", s[key], "a finite value >= 0"
        )
    _require(
        cfg.TEST.EVAL_PERIOD >= 0,
        "TEST.EVAL_PERIOD",
        cfg.TEST.EVAL_PERIOD,
        "0 (evaluate only at the end) or a period >= 1",
    )
    _require(math.isfinite(s.GAMMA) and s.GAMMA > 0, "SOLVER.GAMMA", s.GAMMA, "a value > 0")
    _require(
        0 <= s.WARMUP_FACTOR <= 1, "SOLVER.WARMUP_FACTOR", s.WARMUP_FACTOR, "a value in [0, 1]"
    )
    _require(
        s.WARMUP_METHOD in ("linear", "constant"),
        "SOLVER.WARMUP_METHOD",
        s.WARMUP_METHOD,
        "'linear' or 'constant'",
    )
    if s.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
        steps = list(s.STEPS)
        # Steps past MAX_ITER are dropped by detectron2 with a warning (a shortened run of a
        # published config keeps working); one at MAX_ITER crashes fvcore's scheduler.
        if any(step <= 0 or step == s.MAX_ITER for step in steps):
            raise ValueError(
                f"SOLVER.STEPS = {steps}: every step must be > 0 and not equal SOLVER.MAX_ITER "
                f"= {s.MAX_ITER} (the scheduler refuses a step at the last iteration). Scale "
                "the steps with MAX_ITER, or give SOLVER.STEPS () for a constant learning rate."
            )
        if any(a >= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"SOLVER.STEPS = {steps}; expected strictly increasing iterations.")
