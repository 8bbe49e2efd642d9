import copy

import pytest
import torch
from conftest import REPO
from devices import HostSyncCounter, count_cuda_syncs, needs_cuda

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, ImageList, Instances

from solov2_d2 import add_solov2_config
from solov2_d2.engine.solver import build_optimizer
from solov2_d2.modeling.meta_arch import NetworkPolicy, SOLOv2


def _synthetic_input(h, w, boxes, classes):
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        m[y1:y2, x1:x2] = True
    inst = Instances((h, w))
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = BitMasks(masks).get_bounding_boxes()
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    return {"image": image, "instances": inst}


def _head_params(model):
    return {
        n: p
        for n, p in model.named_parameters()
        if n.startswith(("ins_head.", "mask_head.")) and p.requires_grad
    }


def test_r50_parameter_count_matches_the_references():
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "Base-SOLOv2.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert isinstance(model, SOLOv2)
    count = sum(p.numel() for p in model.parameters())
    # The reference implementations report about 46.5 M for SOLOv2-R50.
    assert 46.4e6 < count < 46.6e6, count


def test_training_returns_finite_losses_and_gradients_reach_every_head(small_cfg):
    torch.manual_seed(0)
    model = build_model(small_cfg).train()
    batch = [
        _synthetic_input(160, 224, [(20, 30, 90, 100), (100, 40, 200, 150)], [0, 2]),
        _synthetic_input(128, 192, [(10, 10, 60, 50)], [1]),
    ]
    losses = model(batch)
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


@pytest.mark.parametrize("case", ["empty_image", "no_positive_batch"])
def test_images_without_instances_train(small_cfg, case):
    """An image without annotations, or a batch where no instance reaches any level (its scale
    is outside every range), gives finite losses and gradients for every head parameter."""
    torch.manual_seed(0)
    if case == "no_positive_batch":
        small_cfg.MODEL.SOLOV2.SCALE_RANGES = [[1000, 2000]] * 5
        batch = [_synthetic_input(128, 160, [(10, 10, 60, 60)], [1])]
    else:
        batch = [_synthetic_input(128, 160, [], [])]
    model = build_model(small_cfg).train()
    losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] == 0
    assert losses["loss_cate"] > 0  # every cell is a negative
    sum(losses.values()).backward()
    heads = _head_params(model)
    assert all(p.grad is not None for p in heads.values())
    assert any(p.grad.abs().sum() > 0 for p in heads.values())


def _fruit_inputs(cfg, mask_format, count=2, size=256):
    cfg = copy.deepcopy(cfg)
    cfg.INPUT.MASK_FORMAT = mask_format
    cfg.INPUT.MIN_SIZE_TRAIN = (size,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = DatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get("fruit_train")[:count]
    return [mapper(copy.deepcopy(d)) for d in dicts]


def test_polygon_and_bitmask_inputs_give_the_same_losses(small_cfg):
    torch.manual_seed(0)
    model = build_model(small_cfg).train()
    polygons = _fruit_inputs(small_cfg, "polygon")
    bitmasks = _fruit_inputs(small_cfg, "bitmask")
    assert type(polygons[0]["instances"].gt_masks).__name__ == "PolygonMasks"
    assert type(bitmasks[0]["instances"].gt_masks).__name__ == "BitMasks"
    for a, b in zip(polygons, bitmasks):
        b["image"] = a["image"]
    with torch.no_grad():
        la, lb = model(polygons), model(bitmasks)
    for key in la:
        torch.testing.assert_close(la[key], lb[key], rtol=1e-5, atol=1e-6)


def test_overfits_two_real_fruit_images(small_cfg):
    """The whole training path learns: on two real images (160 x 213) the loss falls below half
    of its start within a bounded number of steps (about 50 are needed)."""
    torch.manual_seed(0)
    small_cfg.MODEL.FPN.OUT_CHANNELS = 128
    model = build_model(small_cfg).train()
    batch = _fruit_inputs(small_cfg, "polygon", size=160)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(100):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        # From-scratch GN networks take a few wild steps without it.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        history.append(total.item())
        if total.item() < history[0] / 2:
            break
    assert history[-1] < history[0] / 2, history


def test_wrong_channel_count_is_rejected_clearly(small_cfg):
    model = build_model(small_cfg).eval()
    with pytest.raises(ValueError, match="shape \\(4, 32, 32\\)"):
        model([{"image": torch.zeros(4, 32, 32, dtype=torch.uint8)}])


def test_missing_masks_in_training_is_explained(small_cfg):
    model = build_model(small_cfg).train()
    inputs = _synthetic_input(64, 64, [(5, 5, 30, 30)], [0])
    inputs["instances"].remove("gt_masks")
    with pytest.raises(ValueError, match="MODEL.MASK_ON"):
        model([inputs])


def test_inconsistent_config_lengths_fail_at_build(small_cfg):
    small_cfg.MODEL.SOLOV2.INSTANCE_STRIDES = [8, 8, 16, 32]
    with pytest.raises(ValueError, match="INSTANCE_STRIDES has 4 entries.*5 levels"):
        build_model(small_cfg)
    small_cfg.MODEL.SOLOV2.INSTANCE_STRIDES = [8, 8, 16, 32, 32]
    small_cfg.MODEL.SOLOV2.NUM_GRIDS = [40, 36, 24]
    with pytest.raises(ValueError, match="NUM_GRIDS"):
        build_model(small_cfg)


def _loss_inputs(cfg, model, batch, device="cpu", seed=0):
    """Arguments of `SOLOv2.losses` for `batch`: head outputs as random leaf tensors of the
    network's shapes (category logits near the prior), the ground truth on `device`."""
    c = cfg.MODEL.SOLOV2
    images = ImageList.from_tensors([x["image"] for x in batch], model.backbone.size_divisibility)
    b, _, h, w = images.tensor.shape
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0, shift=0.0):
        x = scale * torch.randn(shape, generator=g) + shift
        return x.to(device).requires_grad_()

    dim = c.MASK_DIM * c.DYNAMIC_KERNEL_SIZE**2
    cate = [leaf(b, c.NUM_CLASSES, s, s, shift=-4.6) for s in c.NUM_GRIDS]
    kernels = [leaf(b, dim, s, s, scale=0.1) for s in c.NUM_GRIDS]
    stride = model.mask_stride
    features = leaf(b, c.MASK_DIM, h // stride, w // stride)
    gt = [x["instances"].to(device) for x in batch]
    return cate, kernels, features, gt, (h, w)


def test_losses_wait_for_the_device_once(small_cfg):
    """Target assignment and both losses, forward and backward: one host synchronisation (the
    number of positive cells per image) with the ground truth on the device."""
    model = build_model(small_cfg).train()
    args = _loss_inputs(small_cfg, model, _fruit_inputs(small_cfg, "bitmask"))
    with HostSyncCounter() as counter:
        losses = model.losses(*args)
        sum(losses.values()).backward()
    assert counter.syncs == ["tolist"]
    assert losses["loss_mask"] > 0


def test_losses_under_bfloat16_autocast_agree_with_float32(small_cfg):
    """Under CPU autocast the dynamic convolution runs in bfloat16, the sums in float32: the
    losses are float32 and within 1% of the float32 ones."""
    model = build_model(small_cfg).train()
    args = _loss_inputs(small_cfg, model, _fruit_inputs(small_cfg, "bitmask"))
    ref = model.losses(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model.losses(*args)
    for key in ("loss_cate", "loss_mask"):
        assert ours[key].dtype == torch.float32
        assert ours[key].item() == pytest.approx(ref[key].item(), rel=1e-2), key


@needs_cuda
def test_cuda_losses_synchronise_once_and_agree_with_the_cpu(small_cfg):
    """Float32 losses on the GPU equal the CPU ones to 1e-3 (TF32 matrix products, if enabled,
    stay within it: the Dice sums average thousands of pixels); under float16 autocast they are
    float32 and within 1%."""
    model = build_model(small_cfg).train()
    batch = _fruit_inputs(small_cfg, "bitmask")
    cpu = model.losses(*_loss_inputs(small_cfg, model, batch))
    args = _loss_inputs(small_cfg, model, batch, device="cuda")

    def step():
        losses = model.losses(*args)
        sum(losses.values()).backward()
        return losses

    gpu, syncs = count_cuda_syncs(step)
    assert syncs == 1
    with torch.autocast("cuda", dtype=torch.float16):
        amp = model.losses(*args)
    for key in ("loss_cate", "loss_mask"):
        assert gpu[key].item() == pytest.approx(cpu[key].item(), rel=1e-3), key
        assert amp[key].dtype == torch.float32
        assert amp[key].item() == pytest.approx(cpu[key].item(), rel=1e-2), key


@needs_cuda
def test_cuda_amp_training_steps_are_finite_and_learn(small_cfg):
    """detectron2's AMPTrainer step (float16 autocast, GradScaler, the optimizer of train_net
    with full-model clipping) on real fruit images: finite losses that fall (in float32 on the
    CPU the last 5 of 30 steps average 0.78 of the first 5)."""
    torch.manual_seed(0)
    small_cfg.MODEL.DEVICE = "cuda"
    small_cfg.SOLVER.BASE_LR = 0.01
    model = build_model(small_cfg).train()
    optimizer = build_optimizer(small_cfg, model)
    scaler = torch.amp.GradScaler("cuda")
    batch = _fruit_inputs(small_cfg, "bitmask", count=4)
    history = []
    for _ in range(40):
        with torch.autocast("cuda", dtype=torch.float16):
            losses = model(batch)
        total = sum(losses.values())
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append(total.item())
    assert sum(history[-5:]) < 0.9 * sum(history[:5]), history


# NetworkPolicy: how an inference batch goes through the network.


class FakeNetwork:
    """Records its inputs; outputs S x S grids of the batch's means and, as mask features, the
    input at stride 4 (so that each output pixel says which input pixel it came from)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x)
        b = x.shape[0]
        means = x.mean(dim=(1, 2, 3)).view(b, 1, 1, 1)
        cate = [means.expand(b, 3, s, s) for s in (4, 2)]
        kernels = [means.expand(b, 5, s, s) * 2 for s in (4, 2)]
        return cate, kernels, x[:, :2, ::4, ::4]


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, h, w, generator=g) + 1 for h, w in [(64, 96), (40, 50), (70, 33)]]


def test_per_image_pads_each_image_on_its_own():
    network, images = FakeNetwork(), _images()
    out = NetworkPolicy(per_image=True, channels_last=False).run(network, images, 32, 4)
    shapes = [tuple(x.shape) for x in network.inputs]
    assert shapes == [(1, 3, 64, 96), (1, 3, 64, 64), (1, 3, 96, 64)]
    assert out.mask_extents == [(16, 24), (16, 16), (24, 16)]
    assert out.mask_features.shape == (3, 2, 24, 24)
    for i, (image, (h, w)) in enumerate(zip(images, out.mask_extents)):
        # Each image's own features, zero beyond its extent.
        own = torch.zeros(3, h * 4, w * 4)
        own[:, : image.shape[1], : image.shape[2]] = image
        assert torch.equal(out.mask_features[i, :, :h, :w], own[:2, ::4, ::4])
        assert not out.mask_features[i, :, h:].any() and not out.mask_features[i, :, :, w:].any()
        assert torch.equal(out.cate_logits[0][i], own.mean().expand(3, 4, 4))


def test_batched_runs_the_padded_batch_once_with_each_image_extent():
    network, images = FakeNetwork(), _images()
    out = NetworkPolicy(per_image=False, channels_last=True).run(network, images, 32, 4)
    assert len(network.inputs) == 1 and network.inputs[0].shape == (3, 3, 96, 96)
    assert network.inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert out.mask_extents == [(16, 24), (16, 16), (24, 16)]
    assert out.mask_features.shape == (3, 2, 24, 24)
    assert [c.shape[0] for c in out.cate_logits + out.kernels] == [3] * 4


@pytest.mark.parametrize("device, per_image", [("cpu", True), ("cuda", False), ("meta", False)])
def test_for_device(device, per_image):
    policy = NetworkPolicy.for_device(torch.device(device))
    assert policy.per_image == policy.channels_last == per_image


def test_an_empty_batch_gives_no_results_in_eval_and_a_clear_error_in_training(small_cfg):
    model = build_model(small_cfg).eval()
    assert model([]) == []
    model.train()
    with pytest.raises(ValueError, match="SOLOv2 training got an empty batch"):
        model([])


@pytest.mark.parametrize("size", [(0, 0), (0, 40), (30, -1)])
def test_an_output_size_below_one_pixel_is_refused_naming_the_input(small_cfg, size):
    model = build_model(small_cfg).eval()
    image = torch.zeros(3, 64, 64)
    inputs = [{"image": image}, {"image": image, "height": size[0], "width": size[1]}]
    with pytest.raises(ValueError, match=f"Input 1: output size {size[0]} x {size[1]}"):
        model(inputs)
