import math

import pytest
import torch
from devices import HostSyncCounter, count_cuda_syncs, needs_cuda

import solov2_d2  # noqa: F401  # isort: split

from solov2_d2.layers.dynamic_conv import dynamic_mask_logits
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
    return torch.autograd.grad(loss, tensors)


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
def test_cuda_dice_loss_in_amp_synchronises_once_and_holds_one_chunk():
    """On the GPU under float16 autocast: one host synchronisation; finite float32 loss within
    5e-3 of float32 on the CPU (float16 logits; TF32 products, if enabled, are finer); the peak
    memory of forward and backward stays below half of one float copy of the positive cells'
    masks, which the plain formulation would hold several times."""
    features, kernels, targets, matched = _cells_batch(cells=1200, size=(260, 260))
    ref = positive_cells_dice_loss(features, kernels, targets, matched)
    one_float_copy = int((matched >= 0).sum()) * 260 * 260 * 4
    features, kernels = (x.detach().cuda().requires_grad_() for x in (features, kernels))
    targets, matched = targets.cuda(), matched.cuda()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = positive_cells_dice_loss(
                features, kernels, targets, matched, chunk_elements=1 << 20
            )
        loss.backward()
        return loss

    loss, syncs = count_cuda_syncs(step)
    assert syncs == 1
    assert torch.cuda.max_memory_allocated() - before < one_float_copy / 2
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(ref.item(), abs=5e-3)
