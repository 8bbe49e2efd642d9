"""The cropped pasting of the CPU's fast path (`paste_cropped`) against the plain path's pasting
of every mask over the whole map."""
import pytest
import torch

from solov2_d2.inference.cpu import cropped_paste
from solov2_d2.inference.cpu.cropped_paste import CROP_FRACTION, NEAR_MARGIN, paste_cropped
from solov2_d2.inference.masks import paste_masks

COVERAGE_LIMIT = CROP_FRACTION


@pytest.fixture(autouse=True)
def crops_of_any_coverage(monkeypatch):
    """The small maps of these tests are mostly covered by their masks' crops: the equality
    tests take the cropped path whatever the coverage (the limit has a test of its own)."""
    monkeypatch.setattr(cropped_paste, "CROP_FRACTION", 1.0)


def _blobs(size, centres, radii, sharpness=3.0):
    """float32 [N, h, w] probabilities of elliptical blobs: sigmoid(sharpness (1 - d)) at
    normalised distance d from each centre (y, x) with radii (ry, rx)."""
    ys = torch.arange(size[0], dtype=torch.float32)[:, None]
    xs = torch.arange(size[1], dtype=torch.float32)[None, :]
    probs = []
    for (cy, cx), (ry, rx) in zip(centres, radii):
        dist = (((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2).sqrt()
        probs.append(torch.sigmoid(sharpness * (1 - dist)))
    return torch.stack(probs) if probs else torch.zeros(0, *size)


def _random_blobs(num, size, g, largest):
    """`num` blobs of random centres and radii (0.5 .. `largest` pixels)."""
    h, w = size
    centres = (torch.rand(num, 2, generator=g) * torch.tensor([h - 1.0, w - 1.0])).tolist()
    radii = (0.5 + torch.rand(num, 2, generator=g) * (largest - 0.5)).tolist()
    return _blobs(size, centres, radii, sharpness=2 + 4 * torch.rand(1, generator=g).item())


def _edge_blobs(size):
    """Blobs touching each edge and corner of the map, a stripe along each edge and single
    pixels in the corners."""
    h, w = size
    centres = [(0, w / 2), (h - 1, w / 3), (h / 2, 0), (h / 3, w - 1)]
    centres += [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (-1, w / 2), (h / 2, w)]
    probs = _blobs(size, centres, [(3, 4)] * 4 + [(2, 2)] * 4 + [(2.5, 3)] * 2)
    stripes = torch.full((4, h, w), 0.2)
    stripes[0, 0], stripes[1, -1], stripes[2, :, 0], stripes[3, :, -1] = 0.8, 0.7, 0.9, 0.6
    pixels = torch.full((4, h, w), 0.01)
    pixels[0, 0, 0], pixels[1, 0, -1], pixels[2, -1, 0], pixels[3, -1, -1] = 0.9, 0.51, 0.99, 0.6
    return torch.cat([probs, stripes, pixels])


def _plain(soft, thresh, stride, image_size):
    """The plain computation's pasting of every mask over the whole map."""
    return paste_masks(soft, image_size, image_size, stride, thresh)


def _assert_equal_to_plain(soft, stride, image_size, thresh=0.5, max_bytes=1 << 24):
    """Asserts that `paste_cropped` gives the plain path's masks and boxes, also given the rows
    and columns near the threshold; returns them."""
    near = soft > thresh - NEAR_MARGIN
    masks, boxes = _plain(soft, thresh, stride, image_size)
    for lines in [None, (near.any(dim=2), near.any(dim=1))]:
        found = paste_cropped(soft, thresh, stride, image_size, max_bytes, lines)
        assert found is not None
        assert found[0].dtype == torch.bool and found[0].shape == (soft.shape[0], *image_size)
        assert found[1].dtype == torch.float32 and found[1].shape == (soft.shape[0], 4)
        assert torch.equal(found[0], masks)
        assert torch.equal(found[1], boxes)
    return masks, boxes


@pytest.fixture(params=["int32", "int64"])
def positions(request, monkeypatch):
    """Output positions in int32 (outputs up to 2^31 pixels) or, as for larger ones, int64."""
    if request.param == "int64":
        monkeypatch.setattr(cropped_paste, "_INT32_POSITIONS", 0)
    return request.param


@pytest.mark.parametrize("thresh", [0.5, 0.3])
@pytest.mark.parametrize("stride", [4, 8])
@pytest.mark.parametrize("cut", [(0, 0), (3, 5)])
def test_blobs_of_many_sizes_and_at_every_edge(stride, cut, thresh, positions):
    """`cut`: the image is that many output pixels smaller than the upsampled map."""
    size = (30, 38)
    g = torch.Generator().manual_seed(stride + cut[0] + int(10 * thresh))
    soft = torch.cat(
        [
            _random_blobs(30, size, g, largest=2.5),
            _random_blobs(10, size, g, largest=6),
            _random_blobs(2, size, g, largest=12),
            _edge_blobs(size),
        ]
    )
    image = (size[0] * stride - cut[0], size[1] * stride - cut[1])
    masks, boxes = _assert_equal_to_plain(soft, stride, image, thresh)
    areas = masks.flatten(1).sum(dim=1)
    assert (areas > 0).sum() >= 50 and areas.max() > 50 * stride**2
    assert ((areas > 0) & (areas < stride**2)).any()  # smaller than a map pixel
    # Masks on each edge of the image.
    assert masks[:, 0].any() and masks[:, -1].any()
    assert masks[:, :, 0].any() and masks[:, :, -1].any()
    assert (boxes[:, 2] == image[1]).any() and (boxes[:, 3] == image[0]).any()


@pytest.mark.parametrize("stride", [4, 8])
def test_an_empty_mask_and_pixels_at_the_threshold(stride):
    """Probabilities exactly at the threshold (not above it) and within 1e-4 below it, next to
    ones just above: upsampled values within float rounding of the threshold."""
    g = torch.Generator().manual_seed(stride)
    size = (13, 17)
    soft = torch.full((6, *size), 0.1)
    soft[1, 3:6, 4:9] = 0.5  # exactly at the threshold
    soft[2, 3:6, 4:9] = 0.5 - 1e-4 * torch.rand(3, 5, generator=g)
    soft[3, 3:6, 4:9] = 0.5 + 1e-4 * (2 * torch.rand(3, 5, generator=g) - 1)
    soft[4, 3:6, 4:9] = 0.5 + 1e-7 * torch.randint(-3, 4, (3, 5), generator=g)
    soft[5] = 0.5 - 1e-4 * torch.rand(*size, generator=g)  # the whole map just below
    soft[5, 6, 8] = 0.5001
    masks, boxes = _assert_equal_to_plain(soft, stride, (size[0] * stride, size[1] * stride))
    assert not masks[0].any() and boxes[0].tolist() == [0, 0, 0, 0]
    assert not masks[1].any() and not masks[2].any()
    assert masks[3].any() and masks[4].any() and masks[5].any()


def test_no_mask():
    masks, boxes = _assert_equal_to_plain(torch.zeros(0, 13, 17), 4, (49, 65))
    assert masks.shape == (0, 49, 65) and boxes.shape == (0, 4)


@pytest.mark.parametrize("stride,image", [(4, (49, 65)), (8, (97, 130)), (4, (52, 61))])
def test_a_padded_map_cropped_to_the_image(stride, image, positions):
    """The map 13 x 17 upsampled is larger than the image: masks past its right and bottom edges
    (or its right edge only) are cut. The masks are a view of a batch's larger map, as in the
    post-processor."""
    size = (13, 17)
    g = torch.Generator().manual_seed(stride + image[0])
    masks = torch.cat([_random_blobs(20, size, g, largest=3), _edge_blobs(size)])
    batch = torch.full((masks.shape[0], 16, 24), 0.9)
    batch[:, :13, :17] = masks
    soft = batch[:, :13, :17]
    assert not soft.is_contiguous()
    masks, boxes = _assert_equal_to_plain(soft, stride, image)
    assert masks[:, -1].any() and masks[:, :, -1].any()
    assert boxes[:, 2].max() == image[1] and boxes[:, 3].max() == image[0]


@pytest.mark.parametrize("max_bytes", [1, 13 * 16 * 40, 13 * 16 * 400])
@pytest.mark.parametrize("stride", [4, 8])
def test_small_chunks(stride, max_bytes):
    """Chunks of one mask, or of a few masks of crops of different sizes."""
    size = (30, 38)
    g = torch.Generator().manual_seed(stride)
    soft = torch.cat(
        [
            _random_blobs(15, size, g, largest=2),
            _random_blobs(15, size, g, largest=7),
            _edge_blobs(size),
            torch.zeros(2, *size),
        ]
    )
    soft = soft[torch.randperm(soft.shape[0], generator=g)]
    image = (size[0] * stride - 5, size[1] * stride - 2)
    _assert_equal_to_plain(soft, stride, image, max_bytes=max_bytes)


@pytest.mark.parametrize("side", [4, 12, 15, 16, 17, 18, 30, 60])
def test_gives_up_where_the_crops_cover_more_than_the_limit(side, monkeypatch):
    """Squares of `side` mask pixels in a 64 x 64 map: crops of side + 4 (2 pixels around), so a
    coverage of (side + 4)^2 / 64^2 against the limit."""
    monkeypatch.setattr(cropped_paste, "CROP_FRACTION", COVERAGE_LIMIT)
    soft = torch.full((3, 64, 64), 0.1)
    for i, top in enumerate([0, 20, 64 - side]):
        soft[i, top : top + side, 10 : 10 + side] = 0.9
    covered = (min(64, top + side + 2) - max(0, top - 2) for top in [0, 20, 64 - side])
    coverage = sum(rows * min(64, side + 4) for rows in covered) / (3 * 64 * 64)
    if coverage > COVERAGE_LIMIT:
        assert paste_cropped(soft, 0.5, 4, (256, 256), 1 << 24) is None
    else:
        masks, _ = _assert_equal_to_plain(soft, 4, (256, 256))
        areas = masks.flatten(1).sum(dim=1)
        assert ((areas - side * side * 16).abs() <= 4).all()  # the corners lose a pixel or so
