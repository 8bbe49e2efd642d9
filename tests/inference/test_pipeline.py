"""SOLOv2PostProcessor against a straightforward per-image implementation of the references'
steps, on every candidate count, in chunks, with half-precision inputs and batch padding."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from devices import HostSyncCounter, needs_cuda

from solov2_d2.inference import masks as masks_module
from solov2_d2.inference.cpu import CPUCandidateMasks
from solov2_d2.inference.pipeline import SOLOv2PostProcessor, masks_to_boxes, point_nms

GRIDS = [40, 36, 24, 16, 12]
STRIDES = [8, 8, 16, 32, 32]


# The inference path of the processors that `_processor` builds ("auto", as the model's).
_PATH = {"inference_path": "auto"}


@pytest.fixture(params=["fast", "plain"])
def path(request, monkeypatch):
    """Run a test with the CPU's fast paths forced on whatever the work (block-bounded mask
    scoring, int8 intersections, cropped pasting) and with all of them off."""
    monkeypatch.setitem(_PATH, "inference_path", request.param)
    return request.param


def _processor(**kwargs):
    """A post-processor with the model's faster computation available (`fast_masks`)."""
    args = dict(strides=STRIDES, mask_stride=4, fast_masks=CPUCandidateMasks, **_PATH)
    args.update(kwargs)
    return SOLOv2PostProcessor(**args)


def _head_outputs(batch, mask_size=(32, 40), classes=5, dim=16, seed=0, cate_shift=-3.0):
    """Random head outputs with real candidates: category logits around `cate_shift`, and a mask
    feature made of blobs that the kernels combine into blob-like masks."""
    g = torch.Generator().manual_seed(seed)
    cate = [torch.randn(batch, classes, s, s, generator=g) * 2 + cate_shift for s in GRIDS]
    kernels = [torch.randn(batch, dim, s, s, generator=g) for s in GRIDS]
    hm, wm = mask_size
    ys = torch.arange(hm).view(-1, 1).float()
    xs = torch.arange(wm).view(1, -1).float()
    feats = []
    for _ in range(batch):
        blobs = []
        for _ in range(dim):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([hm, wm])
            r = 3 + torch.rand(1, generator=g) * 8
            blobs.append(r - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt())
        feats.append(torch.stack(blobs))
    return cate, kernels, torch.stack(feats)


def _run(proc, cate, kernels, feats, sizes, outputs=None):
    """Call `proc` with each image's extent derived from its size (stride 4, no divisibility)."""
    extents = [(-(-h // 4), -(-w // 4)) for h, w in sizes]
    return proc(cate, kernels, feats, extents, sizes, outputs or sizes)


def _reference(proc, cate, kernels, feats, sizes, outputs=None):
    """The references' inference (mmdetection's SOLOv2 head and `mask_matrix_nms`), one image
    at a time, on each image's own part of the mask features. Returns per image (masks, scores,
    labels)."""
    results = []
    for i, (h, w) in enumerate(sizes):
        out_size = (outputs or sizes)[i]
        hm, wm = -(-h // 4), -(-w // 4)
        scores = torch.cat([point_nms(c[i : i + 1].sigmoid())[0].flatten(1).T for c in cate])
        kern = torch.cat([k[i].flatten(1).T for k in kernels])
        strides = torch.cat([torch.full((s * s,), st) for s, st in zip(GRIDS, STRIDES)])
        inds = (scores > proc.score_thresh).nonzero()
        cate_scores, labels = scores[inds[:, 0], inds[:, 1]], inds[:, 1]
        if proc.max_candidates > 0:
            top = cate_scores.argsort(descending=True)[: proc.max_candidates]
            inds, cate_scores, labels = inds[top], cate_scores[top], labels[top]
        fmap = feats[i, :, :hm, :wm]
        soft = (kern[inds[:, 0]] @ fmap.flatten(1)).view(-1, hm, wm).sigmoid()
        binary = soft > proc.mask_thresh
        areas = binary.sum((1, 2)).float()
        keep = areas > strides[inds[:, 0]]
        soft, binary, areas = soft[keep], binary[keep], areas[keep]
        cate_scores, labels = cate_scores[keep], labels[keep]
        cate_scores = cate_scores * ((soft * binary).sum((1, 2)) / areas)
        # mask_matrix_nms
        order = cate_scores.argsort(descending=True, stable=True)[: proc.pre_nms_topk]
        soft, binary, areas = soft[order], binary[order], areas[order]
        cate_scores, labels = cate_scores[order], labels[order]
        n = len(labels)
        flat = binary.flatten(1).float()
        inter = flat @ flat.T
        union = areas.expand(n, n) + areas.expand(n, n).T - inter
        iou = (inter / union).triu(diagonal=1)
        same = (labels.expand(n, n) == labels.expand(n, n).T).triu(diagonal=1)
        decay_iou = iou * same
        comp = decay_iou.max(0)[0].expand(n, n).T if n else decay_iou
        if proc.nms_kernel == "gaussian":
            ratio = torch.exp(-proc.nms_sigma * decay_iou**2) / torch.exp(
                -proc.nms_sigma * comp**2
            )
        else:
            ratio = (1 - decay_iou) / (1 - comp)
        decayed = cate_scores * (ratio.min(0)[0] if n else cate_scores)
        keep = decayed >= proc.update_thresh
        soft, decayed, labels = soft[keep], decayed[keep], labels[keep]
        order = decayed.argsort(descending=True, stable=True)[: proc.max_per_image]
        soft, decayed, labels = soft[order], decayed[order], labels[order]
        if len(soft) == 0:
            results.append((torch.zeros(0, *out_size, dtype=torch.bool), decayed, labels))
            continue
        up = F.interpolate(soft[None], size=(hm * 4, wm * 4), mode="bilinear")[..., :h, :w]
        up = F.interpolate(up, size=out_size, mode="bilinear")[0]
        results.append((up > proc.mask_thresh, decayed, labels))
    return results


def _assert_equal_to_reference(ours, reference):
    for r, (masks, scores, labels) in zip(ours, reference):
        torch.testing.assert_close(r.scores, scores, rtol=0, atol=1e-6)
        assert torch.equal(r.pred_classes, labels)
        assert torch.equal(r.pred_masks, masks)
        assert torch.equal(r.pred_boxes.tensor, masks_to_boxes(masks))
        assert r.pred_masks.dtype == torch.bool and r.scores.dtype == torch.float32


def test_point_nms_keeps_exactly_the_local_maxima():
    scores = torch.rand(2, 3, 7, 7)
    kept = point_nms(scores)
    for b in range(2):
        for c in range(3):
            for i in range(7):
                for j in range(7):
                    # The window: this cell and its neighbours above and to the left.
                    window = scores[b, c, max(i - 1, 0) : i + 1, max(j - 1, 0) : j + 1]
                    expected = scores[b, c, i, j] if scores[b, c, i, j] == window.max() else 0
                    assert kept[b, c, i, j] == expected


@pytest.mark.parametrize("shape", [(2, 5, 9, 6), (1, 80, 40, 40), (3, 2, 1, 1), (1, 3, 1, 7)])
def test_point_nms_equals_the_references_max_pool(shape):
    """As the references' 2 x 2 max pooling (stride 1, padding 1, cropped), ties included."""
    g = torch.Generator().manual_seed(shape[2])
    scores = torch.randint(0, 4, shape, generator=g).float() / 4
    pooled = F.max_pool2d(scores, kernel_size=2, stride=1, padding=1)[..., :-1, :-1]
    assert torch.equal(point_nms(scores), scores * (pooled == scores))


def test_boxes_are_the_tight_bounds_of_the_masks():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 31, 47, generator=g) > 0.97
    masks[3] = False
    boxes = masks_to_boxes(masks)
    for m, box in zip(masks.numpy(), boxes.tolist()):
        ys, xs = np.nonzero(m)
        if len(xs) == 0:
            expected = [0, 0, 0, 0]
        else:
            expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert box == expected
    assert masks_to_boxes(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
def test_more_than_500_candidates_equal_the_references_steps(kernel, path):
    """Every candidate above the threshold is scored before the top 500 (no cap by category
    score), in a batch of images of different sizes and output sizes."""
    sizes = [(128, 160), (100, 130), (61, 75)]
    outputs = [(128, 160), (200, 260), (50, 61)]
    cate, kernels, feats = _head_outputs(3, seed=7, cate_shift=0.0)
    proc = _processor(nms_kernel=kernel, update_thresh=0.02)
    scores = torch.cat([point_nms(c.sigmoid()).flatten(1) for c in cate], dim=1)
    assert (scores > 0.1).sum(dim=1).min() > 500
    ours = _run(proc, cate, kernels, feats, sizes, outputs)
    assert all(len(r) == 100 for r in ours)
    _assert_equal_to_reference(ours, _reference(proc, cate, kernels, feats, sizes, outputs))


def test_the_candidate_cap_is_off_by_default_and_changes_results_when_set():
    cate, kernels, feats = _head_outputs(1, seed=7, cate_shift=0.0)
    sizes = [(128, 160)]
    uncapped = _run(_processor(), cate, kernels, feats, sizes)
    capped_proc = _processor(max_candidates=300)
    capped = _run(capped_proc, cate, kernels, feats, sizes)
    _assert_equal_to_reference(capped, _reference(capped_proc, cate, kernels, feats, sizes))
    assert not torch.equal(capped[0].scores, uncapped[0].scores)


@pytest.mark.parametrize("chunk_size", [1, 7, 100000])
def test_chunk_size_does_not_change_results(chunk_size, path):
    cate, kernels, feats = _head_outputs(2, seed=4, cate_shift=-4.0)
    sizes = [(128, 160), (90, 100)]
    expected = _run(_processor(), cate, kernels, feats, sizes)
    ours = _run(_processor(chunk_size=chunk_size), cate, kernels, feats, sizes)
    assert sum(len(r) for r in ours) > 10
    # Products of fewer than 16 rows are padded to 16 (a single row would take a matrix-vector
    # kernel, which rounds differently): the same results whatever the chunk size.
    for a, b in zip(ours, expected):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_masks, b.pred_masks)


def test_dynamic_kernels_of_3_x_3_take_the_plain_path():
    """Kernels of E x 3 x 3 weights (DYNAMIC_KERNEL_SIZE 3) have no block bounds: the fast
    setting computes them as the plain one does."""
    cate, kernels, feats = _head_outputs(2, seed=3, cate_shift=-2.0)
    g = torch.Generator().manual_seed(3)
    kernels = [torch.randn(k.shape[0], 9 * k.shape[1], *k.shape[2:], generator=g) for k in kernels]
    sizes = [(128, 160), (90, 100)]
    fast = _run(_processor(inference_path="fast"), cate, kernels, feats, sizes)
    plain = _run(_processor(inference_path="plain"), cate, kernels, feats, sizes)
    assert sum(len(r) for r in plain) > 10
    for a, b in zip(fast, plain):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


def test_an_image_gets_the_same_result_alone_and_in_a_padded_batch():
    """The batch pads a smaller image's mask features; its masks, areas, sums and pasting stay
    inside its own extent, so its detections are identical to those of the image alone."""
    cate, kernels, feats = _head_outputs(2, seed=5, cate_shift=-1.0)
    proc = _processor()
    small = (88, 100)  # mask extent 22 x 25 of the 32 x 40 batch
    feats[1, :, 22:] = 5.0  # strong activations in the batch padding
    feats[1, :, :, 25:] = 5.0
    sizes = [(128, 160), small]
    batched = proc(cate, kernels, feats, [(32, 40), (22, 25)], sizes, sizes)
    alone = proc(
        [c[1:] for c in cate], [k[1:] for k in kernels], feats[1:, :, :22, :25].contiguous(),
        [(22, 25)], [small], [small],
    )[0]
    assert len(alone) > 10
    assert torch.equal(batched[1].scores, alone.scores)
    assert torch.equal(batched[1].pred_masks, alone.pred_masks)
    assert torch.equal(batched[1].pred_classes, alone.pred_classes)


def _counts(results):
    return [len(r) for r in results]


def test_no_candidate_gives_empty_results_of_the_right_types(path):
    cate, kernels, feats = _head_outputs(2)
    cate = [torch.full_like(c, -20.0) for c in cate]
    sizes, outputs = [(128, 160), (90, 100)], [(64, 80), (90, 100)]
    results = _run(_processor(), cate, kernels, feats, sizes, outputs)
    for r, size in zip(results, [(64, 80), (90, 100)]):
        assert len(r) == 0 and r.image_size == size
        assert r.pred_masks.shape == (0, *size) and r.pred_masks.dtype == torch.bool
        assert r.scores.dtype == torch.float32 and r.scores.shape == (0,)
        assert r.pred_classes.dtype == torch.int64
        assert r.pred_boxes.tensor.shape == (0, 4)


def test_one_candidate(path):
    cate, kernels, feats = _head_outputs(2)
    cate = [torch.full_like(c, -20.0) for c in cate]
    cate[2][1, 3, 5, 7] = 5.0
    proc = _processor()
    results = _run(proc, cate, kernels, feats, [(128, 160)] * 2)
    assert _counts(results) == [0, 1] and results[1].pred_classes.tolist() == [3]
    _assert_equal_to_reference(results, _reference(proc, cate, kernels, feats, [(128, 160)] * 2))


def test_every_cell_of_every_class(path):
    """All 3872 cells x 5 classes pass the threshold and point NMS (equal scores)."""
    cate, kernels, feats = _head_outputs(1, mask_size=(16, 20), seed=2)
    cate = [torch.full_like(c, 3.0) for c in cate]
    proc = _processor(chunk_size=1000)
    results = _run(proc, cate, kernels, feats, [(64, 80)])
    assert len(results[0]) > 0
    _assert_equal_to_reference(results, _reference(proc, cate, kernels, feats, [(64, 80)]))


def test_candidates_that_all_fail_the_stride_filter(path):
    cate, kernels, feats = _head_outputs(1, seed=3, cate_shift=0.0)
    proc = _processor(strides=[10**6] * 5)  # no mask is larger than its level's stride
    assert _counts(_run(proc, cate, kernels, feats, [(128, 160)])) == [0]


def test_all_suppressed_and_update_threshold_above_every_score(path):
    cate, kernels, feats = _head_outputs(1, seed=3, cate_shift=-2.0)
    # Identical masks of one class: with the linear kernel all but the best decay to 0.
    kernels = [torch.zeros_like(k) for k in kernels]
    for k in kernels:
        k[:, 0] = 1.0
    cate = [torch.where(torch.arange(5)[None, :, None, None] == 2, c, -20.0) for c in cate]
    proc = _processor(nms_kernel="linear", update_thresh=0.05)
    results = _run(proc, cate, kernels, feats, [(128, 160)])
    assert _counts(results) == [1]
    _assert_equal_to_reference(results, _reference(proc, cate, kernels, feats, [(128, 160)]))
    assert _counts(_run(_processor(update_thresh=1.01), cate, kernels, feats, [(128, 160)])) == [0]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 0.01), (torch.bfloat16, 0.05)])
def test_half_precision_head_outputs(dtype, tolerance):
    """Half-precision head outputs (autocast) give the float32 results of the same rounded
    values exactly, and the float32 results within the rounding of the inputs."""
    cate, kernels, feats = _head_outputs(2, seed=6, cate_shift=-1.0)
    sizes = [(128, 160), (100, 130)]
    proc = _processor()
    half = [[x.to(dtype) for x in cate], [x.to(dtype) for x in kernels], feats.to(dtype)]
    ours = _run(proc, *half, sizes)
    rounded = _run(proc, [x.float() for x in half[0]], [x.float() for x in half[1]],
                   half[2].float(), sizes)
    full = _run(proc, cate, kernels, feats, sizes)
    for a, b, c in zip(ours, rounded, full):
        assert a.scores.dtype == torch.float32
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)
        top = min(len(a), len(c), 10)
        torch.testing.assert_close(a.scores[:top], c.scores[:top], rtol=0, atol=tolerance)


def test_areas_above_half_precision_range():
    """A mask of 90,000 pixels (float16 stops at 65,504) keeps its exact area and maskness."""
    cate, kernels, feats = _head_outputs(1, mask_size=(300, 300), seed=1)
    cate = [torch.full_like(c, -20.0) for c in cate]
    cate[4][0, 1, 6, 6] = 2.0
    kernels = [torch.zeros_like(k) for k in kernels]
    kernels[4][0, 0, 6, 6] = 1.0
    feats = torch.full_like(feats, 3.0)  # every pixel at logit 3
    proc = _processor()
    found = proc.detect(
        [c.half() for c in cate], [k.half() for k in kernels], feats.half(), [(300, 300)]
    )
    expected = torch.sigmoid(torch.tensor(2.0)) * torch.sigmoid(torch.tensor(3.0))
    assert found.valid.tolist() == [[True]]
    torch.testing.assert_close(found.scores[0, 0], expected)
    assert (found.soft_masks[0, 0] > 0.5).sum() == 90_000


def test_paste_in_chunks_equals_paste_at_once(monkeypatch):
    cate, kernels, feats = _head_outputs(1, seed=8, cate_shift=-1.0)
    sizes, outputs = [(128, 160)], [(300, 410)]
    expected = _run(_processor(), cate, kernels, feats, sizes, outputs)[0]
    monkeypatch.setattr(masks_module, "_PASTE_CHUNK_BYTES", 4 * 300 * 410)  # a mask at a time
    ours = _run(_processor(), cate, kernels, feats, sizes, outputs)[0]
    assert len(ours) > 5
    assert torch.equal(ours.pred_masks, expected.pred_masks)
    assert torch.equal(ours.pred_boxes.tensor, expected.pred_boxes.tensor)


def test_limits_and_thresholds():
    cate, kernels, feats = _head_outputs(2, seed=3)
    sizes = [(128, 160)] * 2
    assert _counts(_run(_processor(max_per_image=4), cate, kernels, feats, sizes)) == [4, 4]
    loose = _run(_processor(update_thresh=0.3), cate, kernels, feats, sizes)
    assert all((r.scores >= 0.3).all() for r in loose)
    assert all((r.scores[:-1] >= r.scores[1:]).all() for r in loose)


def test_channels_last_mask_features_give_the_same_results():
    cate, kernels, feats = _head_outputs(2, seed=2)
    proc = _processor(score_thresh=0.2)
    sizes = [(128, 160), (97, 150)]
    a = _run(proc, cate, kernels, feats, sizes)
    b = _run(proc, cate, kernels, feats.contiguous(memory_format=torch.channels_last), sizes)
    assert sum(len(r) for r in a) > 10
    for x, y in zip(a, b):
        assert torch.equal(x.scores, y.scores) and torch.equal(x.pred_masks, y.pred_masks)


def test_post_processing_waits_for_the_device_three_times_per_batch():
    """On the plain path (that of GPUs): the candidate count (to size the padding), the largest
    detection count (no output mask for padding) and the detection counts (the sizes of the
    Instances): the host waits for a GPU three times per batch, whatever the candidates."""
    cate, kernels, feats = _head_outputs(3, seed=4, cate_shift=-1.0)
    sizes = [(128, 160), (100, 130), (61, 75)]
    with HostSyncCounter() as counter:
        results = _run(_processor(inference_path="plain"), cate, kernels, feats, sizes)
    assert sum(len(r) for r in results) > 10
    assert counter.syncs == ["_local_scalar_dense", "_local_scalar_dense", "tolist"]


def test_masks_are_computed_only_for_candidates_above_the_threshold(monkeypatch):
    seen = []
    real = masks_module.dynamic_mask_logits

    def spy(features, kernels):
        seen.append(int(kernels.ne(0).any(dim=2).sum(dim=1).max()))  # without the zero rows
        return real(features, kernels)

    monkeypatch.setattr(masks_module, "dynamic_mask_logits", spy)
    cate, kernels, feats = _head_outputs(2)
    cate = [torch.full_like(c, -5.0) for c in cate]
    cate[2][1, 3, 5, 7] = 5.0
    plain = _processor(inference_path="plain")
    _run(plain, cate, kernels, feats, [(128, 160)] * 2)
    assert seen == [1, 1]  # scores (binary masks kept for the NMS), output masks
    seen.clear()
    cate[2][1, 3, 5, 7] = -5.0
    assert _counts(_run(plain, cate, kernels, feats, [(128, 160)] * 2)) == [0, 0]
    assert sum(seen) == 0


@needs_cuda
def test_cuda_matches_cpu_also_under_autocast():
    """Same detections on CUDA (TF32 off: float32 products) as on the CPU; float16 head outputs
    under autocast within the half-precision tolerance of the CPU test above."""
    cate, kernels, feats = _head_outputs(2, seed=6, cate_shift=-1.0)
    sizes = [(128, 160), (100, 130)]
    proc = _processor()
    cpu = _run(proc, cate, kernels, feats, sizes)
    on_cuda = ([c.cuda() for c in cate], [k.cuda() for k in kernels], feats.cuda())
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cuda = _run(proc, *on_cuda, sizes)
        with torch.autocast("cuda", dtype=torch.float16):
            half = _run(proc, [c.half() for c in on_cuda[0]], [k.half() for k in on_cuda[1]],
                        on_cuda[2].half(), sizes)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    for a, b, h in zip(cpu, cuda, half):
        assert b.pred_masks.is_cuda and h.scores.dtype == torch.float32
        torch.testing.assert_close(b.scores.cpu(), a.scores, rtol=0, atol=1e-5)
        assert torch.equal(b.pred_classes.cpu(), a.pred_classes)
        assert (b.pred_masks.cpu() != a.pred_masks).float().mean() < 1e-4
        top = min(len(a), len(h), 10)
        torch.testing.assert_close(h.scores[:top].cpu(), a.scores[:top], rtol=0, atol=0.01)


def test_the_paths_taken_are_recorded_and_plain_turns_every_fast_path_off(caplog):
    """`last_paths` (and a debug log line) say which computation each step took; "plain" takes
    the plain one in every step, int8 intersections included."""
    cate, kernels, feats = _head_outputs(2, mask_size=(96, 120), seed=4, cate_shift=-1.0)
    # Each kernel picks one blob: compact masks, where every fast path applies.
    kernels = [F.one_hot(k.argmax(dim=1), k.shape[1]).permute(0, 3, 1, 2).float() for k in kernels]
    sizes = [(384, 480)] * 2
    plain = _processor(inference_path="plain")
    with caplog.at_level("DEBUG", logger="solov2_d2.inference.pipeline"):
        expected = _run(plain, cate, kernels, feats, sizes)
    steps = ["scoring", "intersections", "kept masks", "pasting"]
    assert plain.last_paths == dict.fromkeys(steps, "plain")
    assert str(plain.last_paths) in caplog.text
    fast = _processor(inference_path="fast")
    ours = _run(fast, cate, kernels, feats, sizes)
    assert sorted(fast.last_paths) == sorted(steps)
    assert "plain" not in fast.last_paths.values()
    assert fast.last_paths["pasting"] == "cropped"
    assert sum(len(r) for r in ours) > 10
    for a, b in zip(ours, expected):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


def test_without_a_faster_computation_every_path_is_plain():
    cate, kernels, feats = _head_outputs(1, seed=4, cate_shift=-1.0)
    proc = _processor(inference_path="fast", fast_masks=None)
    _run(proc, cate, kernels, feats, [(128, 160)])
    assert set(proc.last_paths.values()) == {"plain"}
