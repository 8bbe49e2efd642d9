"""Reusable buffers of the CPU's fast paths: reuse, growth, one per thread, and results that
never depend on what a buffer held before."""
import threading

import torch
from test_block_masks import _compact_load, _fast_and_plain

from solov2_d2.inference import pipeline as pp
from solov2_d2.inference.cpu.buffers import Scratch, thread_scratch
from solov2_d2.inference.pipeline import SOLOv2PostProcessor


def test_take_reuses_a_buffer_until_it_is_too_small():
    scratch = Scratch()
    first = scratch.take("a", (4, 6), torch.device("cpu"), torch.float32)
    assert first.shape == (4, 6) and first.dtype == torch.float32 and first.is_contiguous()
    smaller = scratch.take("a", (3, 2, 2), "cpu", torch.float32)
    assert smaller.shape == (3, 2, 2) and smaller.data_ptr() == first.data_ptr()
    other = scratch.take("b", (4, 6), "cpu")
    assert other.data_ptr() != first.data_ptr()  # names never share memory
    larger = scratch.take("a", (5, 6), "cpu")
    assert larger.shape == (5, 6) and larger.data_ptr() != first.data_ptr()
    wide = scratch.take("a", (2, 3), "cpu", torch.float64)
    assert wide.dtype == torch.float64
    assert scratch.nbytes() == 6 * 8 + 24 * 4  # "a" now holds 6 float64, "b" 24 float32
    assert scratch.take("c", (0, 5), "cpu").shape == (0, 5)


def test_each_thread_has_its_own_scratch():
    mine = thread_scratch()
    assert thread_scratch() is mine
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(thread_scratch()))
    thread.start()
    thread.join()
    assert theirs[0] is not mine and isinstance(theirs[0], Scratch)


class _Garbage(Scratch):
    """A scratch whose buffers hold NaN (or True) wherever they are taken."""

    def take(self, name, shape, device, dtype=torch.float32):
        x = super().take(name, shape, device, dtype)
        return x.fill_(True if dtype == torch.bool else float("nan"))


def test_results_do_not_depend_on_what_the_scratch_held(monkeypatch, one_thread):
    """Every buffer taken full of NaN: the fast path still gives the plain path's detections,
    so it reads nothing of a buffer that it has not written."""
    garbage = _Garbage()
    monkeypatch.setattr(pp, "thread_scratch", lambda: garbage)
    cate, kernels, features = _compact_load(2, 600, (64, 80), seed=5)
    sizes = [(256, 320), (230, 270)]
    found = _fast_and_plain(cate, kernels, features, sizes, sizes)
    assert garbage.nbytes() > 0 and all(len(r) > 20 for r in found)


def test_threads_at_the_same_time_get_their_own_results(one_thread):
    """Two threads post-processing different loads at once on one post-processor give the
    results each gets alone (their buffers are their own)."""
    proc = SOLOv2PostProcessor(strides=[8, 8, 16, 32, 32], mask_stride=4, inference_path="fast")
    sizes = [(256, 320)]
    loads = [_compact_load(1, 400, (64, 80), seed=s) for s in (6, 7)]
    run = lambda load: proc(*load, [(64, 80)], sizes, sizes)[0]  # noqa: E731
    alone = [run(load) for load in loads]
    together = [[], []]
    start = threading.Barrier(2)

    def worker(i):
        start.wait()
        for _ in range(3):
            together[i].append(run(loads[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for expected, found in zip(alone, together):
        assert len(found) == 3 and len(expected) > 20
        for r in found:
            assert torch.equal(r.pred_masks, expected.pred_masks)
            assert torch.equal(r.scores, expected.scores)
