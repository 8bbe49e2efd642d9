"""Matrix NMS: against a brute-force reference, label awareness, limits, batching, edge cases."""
import math

import pytest
import torch
from devices import needs_cuda

import solov2_d2.inference.matrix_nms as matrix_nms_module
from solov2_d2.inference.matrix_nms import batched_matrix_nms, matrix_nms, matrix_nms_decay


def brute_force(masks, labels, scores, kernel="gaussian", sigma=2.0):
    """Matrix NMS by its definition, one pair at a time in float64.

    Returns (decayed scores, labels, keep) of all candidates, sorted by decayed score (ties in
    input score order, itself stable).
    """
    n = len(scores)
    order = sorted(range(n), key=lambda i: -float(scores[i]))
    flat = masks.reshape(n, -1).double()
    iou = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            i, j = order[a], order[b]
            inter = float((flat[i] * flat[j]).sum())
            union = float(flat[i].sum() + flat[j].sum()) - inter
            if labels[i] == labels[j] and union > 0:
                iou[a][b] = inter / union
    comp = [max([iou[k][a] for k in range(a)], default=0.0) for a in range(n)]
    result = []
    for b in range(n):
        decay = 1.0
        for a in range(b):
            if labels[order[a]] != labels[order[b]]:
                continue
            if kernel == "gaussian":
                ratio = math.exp(-sigma * iou[a][b] ** 2) / math.exp(-sigma * comp[a] ** 2)
            else:
                ratio = (1 - iou[a][b]) / max(1 - comp[a], matrix_nms_module._LINEAR_EPS)
            decay = min(decay, ratio)
        result.append((float(scores[order[b]]) * decay, int(labels[order[b]]), order[b]))
    result.sort(key=lambda r: -r[0])
    return (
        torch.tensor([r[0] for r in result], dtype=torch.float64),
        torch.tensor([r[1] for r in result], dtype=torch.int64),
        torch.tensor([r[2] for r in result], dtype=torch.int64),
    )


def random_candidates(n, height=36, width=40, num_objects=6, num_labels=3, seed=0):
    """Jittered copies (shifts of up to 3 pixels, some resized) of a few random rectangles and
    ellipses: masks bool [n, H, W] that really overlap, labels int64 [n], scores float [n]."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randint(num_objects, (n,), generator=g)
    center = torch.rand(num_objects, 2, generator=g) * torch.tensor([height, width])
    half = 2 + torch.rand(num_objects, 2, generator=g) * torch.tensor([height, width]) / 4
    cy, cx = (center[source] + torch.randint(-3, 4, (n, 2), generator=g)).unbind(1)
    hy, hx = (half[source] * (0.8 + 0.4 * torch.rand(n, 2, generator=g))).unbind(1)
    dy = (torch.arange(height)[None, :, None] - cy[:, None, None]) / hy[:, None, None]
    dx = (torch.arange(width)[None, None, :] - cx[:, None, None]) / hx[:, None, None]
    rectangle = (torch.arange(num_objects) % 2 == 0)[source][:, None, None]
    masks = torch.where(rectangle, (dy.abs() <= 1) & (dx.abs() <= 1), dy**2 + dx**2 <= 1)
    labels = torch.randint(num_labels, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    return masks, labels, scores


def assert_same(result, reference, atol=1e-5):
    scores, labels, keep = result
    ref_scores, ref_labels, ref_keep = reference
    assert scores.dtype == torch.float32 and labels.dtype == keep.dtype == torch.int64
    torch.testing.assert_close(scores.double(), ref_scores, rtol=0, atol=atol)
    assert torch.equal(labels, ref_labels)
    assert torch.equal(keep, ref_keep)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("width", [40, 37])
def test_matches_brute_force(kernel, width):
    masks, labels, scores = random_candidates(60, width=width, seed=width)
    reference = brute_force(masks, labels, scores, kernel)
    # The inputs must exercise the decay: many candidates lose much of their score.
    assert (reference[0] < 0.5 * scores[reference[2]]).sum() >= 10
    assert_same(matrix_nms(masks, labels, scores, kernel=kernel), reference)


def test_label_aware():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    scores = torch.tensor([0.9, 0.8])
    other, _, _ = matrix_nms(masks, torch.tensor([0, 1]), scores)
    torch.testing.assert_close(other, scores)
    same, _, _ = matrix_nms(masks, torch.tensor([3, 3]), scores)
    torch.testing.assert_close(same, torch.tensor([0.9, 0.8 * math.exp(-2.0)]))


def test_unsorted_input_is_sorted():
    masks, labels, scores = random_candidates(50, seed=2)
    scores_out, labels_out, keep = matrix_nms(masks, labels, scores, score_thresh=0.2)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    p_scores, p_labels, p_keep = matrix_nms(
        masks[perm], labels[perm], scores[perm], score_thresh=0.2
    )
    assert 5 < len(keep) < 50
    assert torch.equal(perm[p_keep], keep)
    assert torch.equal(p_labels, labels_out)
    torch.testing.assert_close(p_scores, scores_out, rtol=0, atol=0)
    assert torch.all(scores_out[:-1] >= scores_out[1:])


def test_identical_masks_leave_one_survivor():
    masks = torch.zeros(1000, 12, 16, dtype=torch.bool)
    masks[:, 3:9, 4:13] = True
    scores, labels, keep = matrix_nms(
        masks, torch.zeros(1000, dtype=torch.int64), torch.ones(1000), score_thresh=0.5
    )
    assert scores.tolist() == [1.0]
    assert keep.tolist() == [0]  # ties keep the input order


def test_linear_kernel_identical_masks_give_zero_not_nan():
    masks = torch.ones(4, 8, 8, dtype=torch.bool)
    scores, _, keep = matrix_nms(
        masks, torch.zeros(4, dtype=torch.int64), torch.tensor([0.9, 0.8, 0.7, 0.6]),
        kernel="linear",
    )
    assert not scores.isnan().any()
    assert scores.tolist() == pytest.approx([0.9, 0.0, 0.0, 0.0])
    assert keep.tolist() == [0, 1, 2, 3]


def test_empty_masks_do_not_interact():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[2, 1:4, 1:4] = True
    scores = torch.tensor([0.9, 0.8, 0.7])
    out, _, keep = matrix_nms(masks, torch.zeros(3, dtype=torch.int64), scores)
    torch.testing.assert_close(out, scores)
    assert keep.tolist() == [0, 1, 2]


def test_pre_nms_topk_and_max_per_image():
    masks, labels, scores = random_candidates(40, seed=4)
    top = torch.sort(scores, descending=True).indices[:10]
    ref_scores, ref_labels, ref_keep = brute_force(masks[top], labels[top], scores[top])
    assert_same(
        matrix_nms(masks, labels, scores, pre_nms_topk=10), (ref_scores, ref_labels, top[ref_keep])
    )
    full = brute_force(masks, labels, scores)
    assert_same(matrix_nms(masks, labels, scores, max_per_image=7), [x[:7] for x in full])
    above = full[0] >= 0.3
    assert 0 < above.sum() < 40
    assert_same(matrix_nms(masks, labels, scores, score_thresh=0.3), [x[above] for x in full])


def test_empty_input():
    masks = torch.zeros(0, 8, 8, dtype=torch.bool)
    scores, labels, keep = matrix_nms(
        masks, torch.zeros(0, dtype=torch.int64), torch.zeros(0), pre_nms_topk=5, max_per_image=3
    )
    assert scores.shape == labels.shape == keep.shape == (0,)
    assert scores.dtype == torch.float32 and labels.dtype == keep.dtype == torch.int64

    out = batched_matrix_nms(
        torch.ones(2, 4, 8, 8, dtype=torch.bool),
        torch.zeros(2, 4, dtype=torch.int64),
        torch.ones(2, 4),
        torch.zeros(2, 4, dtype=torch.bool),
        max_per_image=3,
    )
    assert out.valid.shape == (2, 3) and not out.valid.any()
    assert out.keep.min() >= 0 and out.keep.max() < 4  # gathers with padding entries work
    assert (out.labels == -1).all() and (out.scores == 0).all()


def test_single_input():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    scores, labels, keep = matrix_nms(masks, torch.tensor([7]), torch.tensor([0.6]))
    assert scores.tolist() == pytest.approx([0.6])
    assert labels.tolist() == [7] and keep.tolist() == [0]


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_batched_equals_per_image(kernel):
    num_valid = [30, 11, 0]
    masks, labels, scores = random_candidates(90, seed=6)
    masks, labels, scores = masks.view(3, 30, 36, 40), labels.view(3, 30), scores.view(3, 30)
    valid = torch.arange(30) < torch.tensor(num_valid)[:, None]
    # Padding that would decay (and outscore) the valid candidates if it took part.
    masks[1, 11:] = masks[1, :1]
    labels[1, 11:] = labels[1, 0]
    scores[1, 11:] = 1.0
    options = dict(kernel=kernel, score_thresh=0.1, pre_nms_topk=25, max_per_image=8)
    out = batched_matrix_nms(masks, labels, scores, valid, **options)
    assert out.scores.shape == (3, 8)
    assert out.valid.sum(dim=1).tolist()[2] == 0
    for i, n in enumerate(num_valid):
        ref_scores, ref_labels, ref_keep = matrix_nms(masks[i, :n], labels[i, :n], scores[i, :n],
                                                      **options)
        k = len(ref_keep)
        assert out.valid[i].tolist() == [True] * k + [False] * (8 - k)
        assert torch.equal(out.scores[i, :k], ref_scores)
        assert torch.equal(out.labels[i, :k], ref_labels)
        assert torch.equal(out.keep[i, :k], ref_keep)
    # The first image is fully valid: compare it with the brute force too.
    top = torch.sort(scores[0], descending=True).indices[:25]
    ref = brute_force(masks[0, top], labels[0, top], scores[0, top], kernel)
    assert torch.equal(out.keep[0, : out.valid[0].sum()], top[ref[2][ref[0] >= 0.1][:8]])


def test_unknown_kernel():
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1).long(), torch.ones(1),
                   kernel="hard")


@needs_cuda
def test_cuda_matches_cpu():
    masks, labels, scores = random_candidates(80, seed=7)
    cpu = matrix_nms(masks, labels, scores, score_thresh=0.05)
    cuda = matrix_nms(masks.cuda(), labels.cuda(), scores.cuda(), score_thresh=0.05)
    for a, b in zip(cpu, cuda):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.uint8])
def test_masks_of_any_dtype_and_above_half_precision_counts(dtype):
    """Intersections are counted in float32: two masks of 90,000 and 80,000 pixels (beyond
    float16's 65,504) overlapping in 70,000 give IoU 0.7 exactly, whatever the input dtype."""
    masks = torch.zeros(1, 2, 300, 300, dtype=dtype)
    masks[0, 0] = 1
    masks[0, 1, :, 33:] = 1  # 300 x 267 = 80,100 pixels, all inside mask 0
    decay = matrix_nms_decay(masks.flatten(2), torch.zeros(1, 2, dtype=torch.int64),
                             torch.ones(1, 2, dtype=torch.bool))
    iou = 80_100 / 90_000
    torch.testing.assert_close(decay, torch.tensor([[1.0, math.exp(-2.0 * iou**2)]]))
