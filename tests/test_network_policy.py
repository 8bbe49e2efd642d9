"""NetworkPolicy (solov2_d2/network_policy.py): how an inference batch goes through the network."""
import pytest
import torch

from solov2_d2.network_policy import NetworkPolicy


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
