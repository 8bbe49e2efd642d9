import copy

import pytest
import torch
from conftest import small_solov2_cfg
from devices import needs_cuda
from torch import nn

import solov2_d2  # noqa: F401  # isort: split

from detectron2.solver import get_default_optimizer_params

from solov2_d2.engine.solver import build_optimizer, maybe_add_gradient_clipping


def _model():
    """Convolutions, GroupNorm (its own weight-decay group) and a linear layer."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )


def _loss(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    return model(x).pow(2).sum()


def _cfg(clip_type="full_model", value=35.0, enabled=True):
    cfg = small_solov2_cfg()
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0  # a second parameter group
    clip = cfg.SOLVER.CLIP_GRADIENTS
    clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE = enabled, clip_type, value, 2.0
    return cfg


def _reference_step(model, cfg, grad_scale, max_norm):
    """Plain SGD (same parameter groups) after clip_grad_norm_ over all parameters."""
    params = get_default_optimizer_params(
        model, base_lr=cfg.SOLVER.BASE_LR, weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM
    )
    sgd = torch.optim.SGD(
        params, lr=cfg.SOLVER.BASE_LR, momentum=0.9, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )
    (_loss(model) * grad_scale).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    sgd.step()
    return norm


def _total_grad_norm(model, grad_scale):
    model = copy.deepcopy(model)
    (_loss(model) * grad_scale).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()


@pytest.mark.parametrize("grad_scale", [1e-3, 100.0])
def test_full_model_clipping_equals_clip_grad_norm_over_all_parameters(grad_scale):
    cfg = _cfg()
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg, model)
    assert len(optimizer.param_groups) > 1  # the norm spans every group
    (_loss(model) * grad_scale).backward()
    optimizer.step()
    norm = _reference_step(reference, cfg, grad_scale, 35.0)
    assert (norm > 35) == (grad_scale > 1)  # below and above the threshold
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    if grad_scale > 1:
        clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        assert clipped.item() == pytest.approx(35.0, rel=1e-5)


def test_full_model_clipping_differs_from_detectron2_per_parameter_clipping():
    model, per_param = _model(), _model()
    optimizer = build_optimizer(_cfg("full_model", 1.0), model)
    per_param_optimizer = build_optimizer(_cfg("norm", 1.0), per_param)
    for m, opt in ((model, optimizer), (per_param, per_param_optimizer)):
        _loss(m).backward()
        opt.step()
    # detectron2's "norm": each parameter's gradient at most 1, together far more.
    norms = torch.tensor([p.grad.norm().item() for p in per_param.parameters()])
    assert norms.max().item() == pytest.approx(1.0, rel=1e-5)
    assert norms.norm().item() > 1.5
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert total == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("grad_scale", [0.1, 10.0])
def test_clipping_under_amp_sees_the_unscaled_gradients(grad_scale):
    """detectron2's AMPTrainer calls GradScaler.step(optimizer), which unscales the gradients
    and then calls optimizer.step(): the clip must act on the true gradients. With a loss scale
    of 2^12 the scaled gradients are far above the threshold even when the true ones are not."""
    true_norm = _total_grad_norm(_model(), grad_scale)
    assert (true_norm > 35) == (grad_scale > 1)
    assert true_norm * 2**12 > 35
    cfg = _cfg()
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(_loss(model) * grad_scale).backward()
    scaler.step(optimizer)
    scaler.update()
    _reference_step(reference, cfg, grad_scale, 35.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        # The scale is a power of two, so scaling and unscaling are exact.
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_amp_skips_the_step_and_the_clip_when_a_gradient_is_not_finite():
    model = _model()
    before = copy.deepcopy(model)
    optimizer = build_optimizer(_cfg(), model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(_loss(model)).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**11  # backed off
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)


def test_other_clip_types_and_disabled_clipping_are_detectron2s():
    assert maybe_add_gradient_clipping(_cfg(enabled=False), torch.optim.SGD) is torch.optim.SGD
    value = maybe_add_gradient_clipping(_cfg("value", 0.01), torch.optim.SGD)
    assert value.__name__ == "SGDWithGradientClip"
    model = _model()
    optimizer = value(model.parameters(), lr=0.0)
    _loss(model).backward()
    optimizer.step()
    assert max(p.grad.abs().max().item() for p in model.parameters()) == pytest.approx(0.01)


def test_full_model_clipping_rejects_a_non_positive_threshold():
    with pytest.raises(ValueError, match="CLIP_VALUE"):
        maybe_add_gradient_clipping(_cfg(value=0.0), torch.optim.SGD)


@needs_cuda
def test_cuda_amp_clipping_equals_clip_grad_norm_of_the_unscaled_gradients():
    """The same check with CUDA's GradScaler, as detectron2's AMPTrainer uses it. Tolerance:
    float32 rounding (both sides run the same kernels; no TF32 in the norms)."""
    cfg = _cfg()
    model = _model().cuda()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)).cuda()
    scaler.scale(model(x).pow(2).sum() * 10).backward()
    scaler.step(optimizer)
    scaler.update()
    params = get_default_optimizer_params(reference, base_lr=0.1, weight_decay_norm=0.0)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    (reference(x).pow(2).sum() * 10).backward()
    assert torch.nn.utils.clip_grad_norm_(reference.parameters(), 35.0) > 35
    sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
