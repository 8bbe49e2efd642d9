import math

import cv2
import numpy as np
import pytest
import torch
from conftest import small_solov2_cfg
from devices import HostSyncCounter, count_cuda_syncs, needs_cuda

import solov2_d2  # noqa: F401  # isort: split

from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

from solov2_d2.layers.dynamic_conv import dynamic_mask_logits, flatten_levels
from solov2_d2.modeling.losses import category_focal_loss, dice_loss, positive_cells_dice_loss


def test_dice_loss_matches_its_formula():
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 3.0]], [[-5.0, -5.0], [-5.0, -5.0]]])
    targets = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    loss = dice_loss(logits, targets)
    p = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0, 3.0)]
    t = [0.0, 1.0, 1.0, 1.0]
    a = sum(pi * ti for pi, ti in zip(p, t))
    b = sum(pi * pi for pi in p) + 1e-3
    c = sum(ti * ti for ti in t) + 1e-3
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(1 - 2 * a / (b + c), rel=1e-6)
    # Empty target, near-empty prediction: the eps terms keep it finite; numerator 0 -> loss 1.
    assert loss[1].item() == pytest.approx(1.0, abs=1e-6)


def test_dice_loss_of_a_perfect_mask_is_near_zero():
    targets = torch.zeros(1, 8, 8)
    targets[0, 2:6, 2:6] = 1
    logits = (targets * 2 - 1) * 30
    assert dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-3)


def test_category_focal_loss_matches_its_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    labels = torch.tensor([1, 3])  # second row: background (C = 3)
    loss = category_focal_loss(logits, labels, torch.tensor(1), alpha=0.25, gamma=2.0)
    total = 0.0
    for i in range(2):
        for k in range(3):
            p = 1 / (1 + math.exp(-logits[i, k].item()))
            if labels[i] == k:
                total += -0.25 * (1 - p) ** 2 * math.log(p)
            else:
                total += -0.75 * p**2 * math.log(1 - p)
    assert loss.item() == pytest.approx(total / 2, rel=1e-5)  # / (positives + 1)


def test_category_focal_loss_normalises_by_positives_plus_one():
    logits = torch.randn(10, 4)
    labels = torch.full((10,), 4)
    one = category_focal_loss(logits, labels, torch.tensor(0))
    four = category_focal_loss(logits, labels, torch.tensor(3))
    assert one.item() == pytest.approx(4 * four.item(), rel=1e-6)


def _cells_batch(k=1, seed=0, num_images=3, cells=40, dim=8, size=(12, 16), instances=6):
    """Mask features [B, E, H, W], kernels [B, T, E*k*k], bool targets [M, H, W] and `matched`
    [B, T] with about a third of the cells positive and none in the last image."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, dim, *size, generator=g, requires_grad=True)
    kernels = torch.randn(num_images, cells, dim * k * k, generator=g, requires_grad=True)
    targets = torch.rand(instances, *size, generator=g) > 0.6
    matched = torch.randint(0, instances, (num_images, cells), generator=g)
    matched[torch.rand(num_images, cells, generator=g) > 0.35] = -1
    matched[-1] = -1
    return features, kernels, targets, matched


def _plain_positive_dice(features, kernels, targets, matched):
    """The reference: every positive cell's mask logits at once, then their mean Dice loss."""
    losses = []
    for b in range(len(features)):
        cells = (matched[b] >= 0).nonzero()[:, 0]
        if not len(cells):
            continue
        logits = dynamic_mask_logits(features[b : b + 1], kernels[b, cells][None])[0]
        losses.append(dice_loss(logits, targets[matched[b, cells]].float()))
    return torch.cat(losses).mean()


def _grads(loss, *tensors):
    """d loss / d each tensor; zeros for a tensor the loss does not use."""
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("cells_per_chunk", [1, 7, 1000])
def test_chunked_dice_loss_equals_the_plain_loss_of_all_positive_cells(k, cells_per_chunk):
    features, kernels, targets, matched = _cells_batch(k)
    # Chunks of 7 split the positive cells of the first two images unevenly.
    assert ((matched[:2] >= 0).sum(1) % 7 > 0).all()
    ours = positive_cells_dice_loss(
        features, kernels, targets, matched, chunk_elements=cells_per_chunk * 12 * 16
    )
    ref = _plain_positive_dice(features, kernels, targets, matched)
    torch.testing.assert_close(ours, ref)
    for g, g_ref in zip(_grads(ours, features, kernels), _grads(ref, features, kernels)):
        torch.testing.assert_close(g, g_ref)


def test_without_positive_cells_the_dice_loss_is_a_zero_that_reaches_both_inputs():
    features, kernels, targets, matched = _cells_batch()
    loss = positive_cells_dice_loss(features, kernels, targets, torch.full_like(matched, -1))
    assert loss.item() == 0.0
    for g in _grads(loss, features, kernels):
        assert g is not None and not g.any()


def test_the_dice_loss_waits_for_the_device_once():
    """One host synchronisation, the number of positive cells per image, for the forward and
    backward passes together."""
    features, kernels, targets, matched = _cells_batch()
    with HostSyncCounter() as counter:
        loss = positive_cells_dice_loss(features, kernels, targets, matched, chunk_elements=999)
        loss.backward()
    assert counter.syncs == ["tolist"]


def _bytes_saved_for_backward(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of `fn()` (storages not
    counted twice)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_memory_kept_for_backward_does_not_grow_with_the_positive_cells():
    """Neither the positive cells' logits nor float copies of their targets are kept: what the
    plain formulation keeps grows with cells x pixels, the chunked one only with the inputs."""
    features, kernels, targets, matched = _cells_batch(cells=400, size=(64, 64))
    inputs = features.nbytes + kernels.nbytes + targets.nbytes + matched.nbytes
    one_float_copy = int((matched >= 0).sum()) * 64 * 64 * 4
    assert one_float_copy > 2 * inputs
    plain = _bytes_saved_for_backward(
        lambda: _plain_positive_dice(features, kernels, targets, matched)
    )
    ours = _bytes_saved_for_backward(
        lambda: positive_cells_dice_loss(features, kernels, targets, matched, chunk_elements=4096)
    )
    assert plain > 2 * one_float_copy
    assert ours < inputs + 0.05 * one_float_copy


def test_pure_float16_dice_sums_overflow_ours_do_not():
    """A 260 x 260 mask: 67600 pixels, above float16's largest value (65504)."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 260, 260, generator=g) + 2).half()
    targets = torch.ones(2, 260, 260, dtype=torch.float16)
    targets[1, :, :100] = 0
    assert torch.isinf((targets * targets).sum(dim=(1, 2))[0])
    loss = dice_loss(logits, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    p, t = logits.double().sigmoid().flatten(1), targets.double().flatten(1)
    ref = 1 - 2 * (p * t).sum(1) / ((p * p).sum(1) + (t * t).sum(1) + 2e-3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_losses_under_bfloat16_autocast_agree_with_float32():
    """CPU autocast runs the dynamic convolution in bfloat16 (8 bits of mantissa); the sums are
    float32. Tolerance: 5e-3 on losses in [0, 1], 5% on gradients."""
    features, kernels, targets, matched = _cells_batch(size=(130, 130))
    ref = positive_cells_dice_loss(features, kernels, targets, matched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = positive_cells_dice_loss(features, kernels, targets, matched)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), abs=5e-3)
    for g, g_ref in zip(_grads(ours, features, kernels), _grads(ref, features, kernels)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, rtol=0.05, atol=0.05 * g_ref.abs().max().item())

    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(50) % 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        focal = category_focal_loss(logits, labels, torch.tensor(40))
    assert focal.dtype == torch.float32
    torch.testing.assert_close(focal, category_focal_loss(logits, labels, torch.tensor(40)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32_losses(dtype):
    """Inputs already in half precision: the losses equal float32 losses of the same values,
    up to the half-precision product of the dynamic convolution."""
    features, kernels, targets, matched = _cells_batch(size=(260, 260), cells=12)
    features, kernels = features.detach().to(dtype), kernels.detach().to(dtype)
    ours = positive_cells_dice_loss(features, kernels, targets, matched)
    ref = positive_cells_dice_loss(features.float(), kernels.float(), targets, matched)
    assert ours.dtype == torch.float32 and torch.isfinite(ours)
    assert ours.item() == pytest.approx(ref.item(), abs=2e-3)
    logits = torch.randn(64, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    labels = torch.arange(64) % 4
    focal = category_focal_loss(logits, labels, torch.tensor(48))
    assert focal.dtype == torch.float32
    torch.testing.assert_close(
        focal, category_focal_loss(logits.float(), labels, torch.tensor(48)), rtol=0, atol=0
    )


@needs_cuda
@pytest.mark.parametrize("pairs", [False, True])
def test_cuda_dice_loss_in_amp_synchronises_once_and_holds_one_chunk(pairs):
    """On the GPU under float16 autocast: one host synchronisation; finite float32 loss within
    5e-3 of float32 on the CPU (float16 logits; TF32 products, if enabled, are finer); the peak
    memory of forward and backward stays below half of one float copy of the positive cells'
    (or pairs') masks, which the plain formulation would hold several times."""
    if pairs:
        features, kernels, targets, matched, cells = _pairs_batch(
            cells=1200, size=(260, 260), width=1500
        )
    else:
        features, kernels, targets, matched = _cells_batch(cells=1200, size=(260, 260))
        cells = None
    ref = positive_cells_dice_loss(features, kernels, targets, matched, cells)
    one_float_copy = int((matched >= 0).sum()) * 260 * 260 * 4
    features, kernels = (x.detach().cuda().requires_grad_() for x in (features, kernels))
    targets, matched = targets.cuda(), matched.cuda()
    cells = None if cells is None else cells.cuda()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = positive_cells_dice_loss(
                features, kernels, targets, matched, cells, chunk_elements=1 << 20
            )
        loss.backward()
        return loss

    loss, syncs = count_cuda_syncs(step)
    assert syncs == 1
    assert torch.cuda.max_memory_allocated() - before < one_float_copy / 2
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), abs=5e-3)


def _pairs_batch(seed=0, num_images=3, cells=40, dim=8, size=(12, 16), instances=6, width=30):
    """Like :func:`_cells_batch`, with (cell, instance) pairs instead of one instance per cell:
    `matched` and `cells` [B, N], several instances on some cells, -1 padding (cells of padding
    pairs are out of range: they must never be read) and no pair in the last image."""
    features, kernels, targets, _ = _cells_batch(
        seed=seed, num_images=num_images, cells=cells, dim=dim, size=size, instances=instances
    )
    g = torch.Generator().manual_seed(seed + 1)
    pair_cells = torch.randint(0, cells // 4, (num_images, width), generator=g)  # repeats
    matched = torch.randint(0, instances, (num_images, width), generator=g)
    padding = torch.rand(num_images, width, generator=g) > 0.7
    padding[-1] = True
    matched[padding] = -1
    pair_cells[padding] = 10**6
    return features, kernels, targets, matched, pair_cells


def _plain_pairs_dice(features, kernels, targets, matched, pair_cells):
    """The reference: a Python loop over the pairs, each one's mask with its cell's kernel."""
    losses = []
    for b in range(len(features)):
        for cell, instance in zip(pair_cells[b].tolist(), matched[b].tolist()):
            if instance < 0:
                continue
            logits = dynamic_mask_logits(features[b : b + 1], kernels[b, cell][None, None])[0]
            losses.append(dice_loss(logits, targets[instance][None].float()))
    return torch.cat(losses).mean()


@pytest.mark.parametrize("cells_per_chunk", [1, 7, 1000])
def test_chunked_dice_loss_of_pairs_equals_a_loop_over_the_pairs(cells_per_chunk):
    features, kernels, targets, matched, pair_cells = _pairs_batch()
    positive = pair_cells[matched >= 0]
    assert len(positive.unique()) < len(positive)  # cells in several pairs
    ours = positive_cells_dice_loss(
        features, kernels, targets, matched, pair_cells, chunk_elements=cells_per_chunk * 12 * 16
    )
    ref = _plain_pairs_dice(features, kernels, targets, matched, pair_cells)
    torch.testing.assert_close(ours, ref)
    for g, g_ref in zip(_grads(ours, features, kernels), _grads(ref, features, kernels)):
        torch.testing.assert_close(g, g_ref)


def test_memory_kept_for_backward_does_not_grow_with_the_pairs():
    """With several instances per cell, as with one: what is kept for the backward pass grows
    with the inputs only, not with pairs x pixels."""
    features, kernels, targets, matched, pair_cells = _pairs_batch(
        cells=400, size=(64, 64), width=1500
    )
    inputs = sum(x.nbytes for x in (features, kernels, targets, matched, pair_cells))
    one_float_copy = int((matched >= 0).sum()) * 64 * 64 * 4
    assert one_float_copy > 2 * inputs
    ours = _bytes_saved_for_backward(
        lambda: positive_cells_dice_loss(
            features, kernels, targets, matched, pair_cells, chunk_elements=4096
        )
    )
    assert ours < inputs + 0.05 * one_float_copy


def test_the_dice_loss_of_pairs_waits_for_the_device_once():
    features, kernels, targets, matched, pair_cells = _pairs_batch()
    with HostSyncCounter() as counter:
        loss = positive_cells_dice_loss(
            features, kernels, targets, matched, pair_cells, chunk_elements=999
        )
        loss.backward()
    assert counter.syncs == ["tolist"]


# Two images of 128 x 160 on the default grids and scale ranges. Image 0: A and B (sqrt area
# about 64: levels 0 and 1) with nearby centres, so that their centre regions share cells, and C
# apart; image 1: D alone. Ellipses: centres of mass differ from box centres.
OVERLAP_SIZE = (128, 160)
OVERLAP_ELLIPSES = [
    [((60, 56), (34, 30)), ((66, 62), (30, 34)), ((130, 100), (22, 20))],
    [((70, 60), (36, 28))],
]
DEFAULT_GRIDS = [40, 36, 24, 16, 12]
DEFAULT_RANGES = [(1, 96), (48, 192), (96, 384), (192, 768), (384, 2048)]


def _overlap_instances(ellipses=OVERLAP_ELLIPSES, size=OVERLAP_SIZE):
    """Per image, the bool masks [M, H, W] of the filled ellipses ((cx, cy), (ax, ay))."""
    out = []
    for image in ellipses:
        masks = np.zeros((len(image), *size), np.uint8)
        for m, (centre, axes) in zip(masks, image):
            cv2.ellipse(m, centre, axes, 0.0, 0, 360, 1, -1)
        out.append(masks.astype(bool))
    return out


def _gt(masks, classes):
    inst = Instances(masks.shape[1:])
    inst.gt_masks = BitMasks(torch.from_numpy(masks))
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.long)
    return inst


def _per_instance_pairs(gt_masks, grids, ranges, sigma=0.2):
    """(image, level, row, col, instance) of every cell each instance claims, by a plain loop
    over the images' instances (batch-global index), levels and cells."""
    pairs, k = [], 0
    for image, masks in enumerate(gt_masks):
        hp, wp = masks.shape[1:]
        for mask in masks:
            ys, xs = np.nonzero(mask)
            cy, cx = ys.mean(), xs.mean()
            w, h = xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()
            for level, (grid, (low, high)) in enumerate(zip(grids, ranges)):
                if not low <= math.sqrt(w * h) <= high:
                    continue
                ch, cw = hp / grid, wp / grid
                row, col = math.floor(cy / ch), math.floor(cx / cw)
                top = max(0, math.floor((cy - 0.5 * sigma * h) / ch), row - 1)
                bottom = min(grid - 1, math.floor((cy + 0.5 * sigma * h) / ch), row + 1)
                left = max(0, math.floor((cx - 0.5 * sigma * w) / cw), col - 1)
                right = min(grid - 1, math.floor((cx + 0.5 * sigma * w) / cw), col + 1)
                for r in range(top, bottom + 1):
                    for c in range(left, right + 1):
                        pairs.append((image, level, r, c, k))
            k += 1
    return pairs


def _last_owner_pairs(pairs):
    """Each claimed cell once, with the instance listed last among its claimers."""
    owner = {}
    for *cell, k in pairs:
        owner[tuple(cell)] = k  # a later instance overwrites
    return [(*cell, k) for cell, k in owner.items()]


def _per_pair_dice(pairs, gt_masks, features, kernels, stride=4):
    """Dice loss (float64) of each pair: kernel [E] of its cell (level's [B, E, S, S]) applied
    to its image's features [E, h, w], against the instance's mask resized as OpenCV does."""
    masks = [m for image in gt_masks for m in image]
    out = {}
    for b, level, r, c, k in pairs:
        h, w = masks[k].shape
        t = cv2.resize(masks[k].astype(np.uint8), (w // stride, h // stride), cv2.INTER_LINEAR)
        t = torch.from_numpy(t).double()
        p = torch.einsum("e,ehw->hw", kernels[level][b, :, r, c], features[b]).double().sigmoid()
        loss = 1 - 2 * (p * t).sum() / ((p * p).sum() + 1e-3 + (t * t).sum() + 1e-3)
        out[(b, level, r, c, k)] = loss
    return out


def _overlap_model(which):
    """The small CPU model with MODEL.SOLOV2.MASK_LOSS_PAIRS = `which`, and its MASK_DIM."""
    cfg = small_solov2_cfg()
    cfg.MODEL.SOLOV2.MASK_LOSS_PAIRS = which
    torch.manual_seed(0)
    return build_model(cfg).train(), cfg.MODEL.SOLOV2.MASK_DIM


def _leaf_outputs(model, dim, batch, size):
    """Random leaf tensors shaped as the network's outputs: category logits and kernels
    [B, C or E, S, S] per level, mask features [B, E, H / 4, W / 4]."""
    g = torch.Generator().manual_seed(3)
    grids, stride = model.num_grids, model.mask_stride
    cate = [torch.randn(batch, model.num_classes, s, s, generator=g) for s in grids]
    kernels = [(0.3 * torch.randn(batch, dim, s, s, generator=g)).requires_grad_() for s in grids]
    features = torch.randn(batch, dim, size[0] // stride, size[1] // stride, generator=g)
    return cate, kernels, features.requires_grad_()


def _model_losses(which, gt_masks):
    """`SOLOv2.losses` of the model for `which` on the images' masks (classes 0, 1, 2, ...),
    the leaf outputs it was computed from, and the per-instance loop's pairs for `which`."""
    model, dim = _overlap_model(which)
    gt = [_gt(m, np.arange(len(m)) % 3) for m in gt_masks]
    cate, kernels, features = _leaf_outputs(model, dim, len(gt), OVERLAP_SIZE)
    losses = model.losses(cate, kernels, features, gt, OVERLAP_SIZE)
    pairs = _per_instance_pairs(gt_masks, model.num_grids, model.scale_ranges)
    if which == "last_owner":
        pairs = _last_owner_pairs(pairs)
    return losses, (cate, kernels, features), pairs


@pytest.mark.parametrize("which", ["all", "last_owner"])
def test_model_mask_loss_equals_a_per_instance_loop_on_overlapping_instances(which):
    """"all" (the default): the mean Dice loss over every (instance, cell) pair claimed;
    "last_owner": over the positive cells, each with its last claiming instance. The category
    loss is the same for both, normalised by the distinct positive cells + 1."""
    gt_masks = _overlap_instances()
    losses, (cate, kernels, features), pairs = _model_losses(which, gt_masks)
    dice = _per_pair_dice(pairs, gt_masks, features, kernels)
    ref = torch.stack(list(dice.values())).mean()
    assert losses["loss_mask"].dtype == torch.float32
    torch.testing.assert_close(losses["loss_mask"].double(), 3 * ref, rtol=1e-5, atol=0)
    grads = _grads(losses["loss_mask"], features, *kernels)
    for g, g_ref in zip(grads, _grads(3 * ref, features, *kernels)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())

    # Category targets: each claimed cell's last claimer's class (instance k of image b has
    # class k % 3, image-local k), background 3 elsewhere.
    classes = [k % 3 for masks in gt_masks for k in range(len(masks))]
    offsets = np.cumsum([0] + [s * s for s in DEFAULT_GRIDS])
    labels = torch.full((len(gt_masks), offsets[-1]), 3)
    owners = _last_owner_pairs(pairs)
    for b, level, r, c, k in owners:
        labels[b, offsets[level] + r * DEFAULT_GRIDS[level] + c] = classes[k]
    logits = flatten_levels(cate).reshape(-1, 3)
    focal = category_focal_loss(logits, labels.view(-1), torch.tensor(len(owners)))
    torch.testing.assert_close(losses["loss_cate"], focal)


def _shared_cells(pairs):
    claimers = {}
    for *cell, k in pairs:
        claimers.setdefault(tuple(cell), []).append(k)
    return {cell for cell, ks in claimers.items() if len(ks) > 1}


def test_the_default_differs_from_last_owner_exactly_on_shared_cells():
    """The pairs of "all" are those of "last_owner" plus each earlier claimer of a shared cell.
    Hence N_all * loss_all - N_last * loss_last is the Dice sum of those extra pairs, and the
    kernels' gradients of the two sums differ at the shared cells and nowhere else."""
    gt_masks = _overlap_instances()
    (all_losses, (_, k_all, f_all), all_pairs) = _model_losses("all", gt_masks)
    (last_losses, (_, k_last, f_last), last_pairs) = _model_losses("last_owner", gt_masks)
    assert all(torch.equal(a, b) for a, b in zip(k_all + [f_all], k_last + [f_last]))
    shared = _shared_cells(all_pairs)
    extra = set(all_pairs) - set(last_pairs)
    assert set(last_pairs) < set(all_pairs) and len(all_pairs) == len(set(all_pairs))
    assert {tuple(cell) for *cell, _ in extra} == shared
    # Image 0's A and B only, on both levels they share.
    assert {b for b, *_ in shared} == {0} and {level for _, level, *_ in shared} == {0, 1}
    assert len(extra) == len(all_pairs) - len(last_pairs)

    extra_dice = sum(_per_pair_dice(extra, gt_masks, f_all, k_all).values())
    sum_all = all_losses["loss_mask"] / 3 * len(all_pairs)
    sum_last = last_losses["loss_mask"] / 3 * len(last_pairs)
    assert abs(all_losses["loss_mask"] - last_losses["loss_mask"]) > 1e-3
    assert (sum_all - sum_last).item() == pytest.approx(extra_dice.item(), rel=1e-4)
    torch.testing.assert_close(all_losses["loss_cate"], last_losses["loss_cate"])

    g_all = _grads(sum_all, *k_all)
    g_last = _grads(sum_last, *k_last)
    for level, (a, b) in enumerate(zip(g_all, g_last)):
        differs = (a - b).abs().amax(dim=1) > 1e-6 * a.abs().max()  # [B, S, S]
        expected = torch.zeros_like(differs)
        for b_, l_, r, c in shared:
            if l_ == level:
                expected[b_, r, c] = True
        assert torch.equal(differs, expected), level


def test_without_shared_cells_both_choices_give_the_same_loss():
    """Image 0 without B: no cell has two claimers, so the pairs are the same."""
    gt_masks = _overlap_instances([[OVERLAP_ELLIPSES[0][0], OVERLAP_ELLIPSES[0][2]]])
    all_losses, _, pairs = _model_losses("all", gt_masks)
    last_losses, _, _ = _model_losses("last_owner", gt_masks)
    assert not _shared_cells(pairs)
    torch.testing.assert_close(all_losses["loss_mask"], last_losses["loss_mask"])


def test_mask_loss_pairs_is_validated():
    cfg = small_solov2_cfg()
    assert cfg.MODEL.SOLOV2.MASK_LOSS_PAIRS == "all"
    cfg.MODEL.SOLOV2.MASK_LOSS_PAIRS = "first_owner"
    with pytest.raises(ValueError, match="MODEL.SOLOV2.MASK_LOSS_PAIRS = 'first_owner'"):
        build_model(cfg)
