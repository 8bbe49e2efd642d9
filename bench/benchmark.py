"""Benchmark SOLOv2 on the machine it runs on: inference stage by stage, Matrix NMS, training.

    .venv/bin/python bench/benchmark.py                 # all of it; writes output/benchmark/
    .venv/bin/python bench/benchmark.py --quick         # small sizes, few repeats (CI runs this)
    .venv/bin/python bench/benchmark.py --device cuda

Writes benchmark.json and benchmark.md (also printed) to --out. Every time is a median over
--repeats runs after a warm-up run; batch times are divided by the batch size (per image).

- Inference of SOLOv2-R50 at 800x1333 and SOLOv2-Light-448-R50 at 448x768, batch 1 and 4, random
  weights, split by forward hooks and wrappers (:class:`StageTimer`) into preprocessing (normalise,
  pad), backbone + FPN, heads (both, and the network's return, which frees its intermediate
  features) and post-processing (the post-processor's call); with no candidate (random weights
  give every category score about 0.01, below the 0.1 threshold) and with two forced loads of K
  candidates (:class:`ForcedCandidates`): compact object-like masks, and the random network's own
  large, noisy masks.
- The arithmetic rate of backbone + FPN + heads: fvcore's FLOP count (it counts a multiply-add as
  one; doubled here) over their time, next to the float32 2048 x 2048 matmul rate measured here.
- Matrix NMS alone against the reference code's formulation (bench_matrix_nms.py).
- One training iteration (2 images of 800x1333, R50, random weights, forward + backward + SGD
  step) and target assignment alone for one image with 50 instances (bench_targets.py).
- Peak memory of inference under the forced loads, each in a fresh process: on the CPU the peak
  RSS (VmHWM) of the call over the RSS before it; on CUDA torch.cuda.max_memory_allocated. Also
  DefaultPredictor on a 6000 x 8000 photo under the heavy load (100 output masks of that size).

OMP_WAIT_POLICY: unless it is set, this sets PASSIVE before importing torch. GNU OpenMP's worker
threads otherwise spin after each parallel region; with other processes busy on the machine they
take CPU from the main thread, and even on an idle machine post-processing in the model (right
after the network) was slower under the default policy than under PASSIVE, although alone it was
faster (README, "Speed"). Code of many small ops (post-processing, NMS) depends on the policy far
more than large convolutions. The policy in effect is printed with the results.
"""
import os

# Before torch is imported (see the module docstring).
OMP_POLICY_DEFAULTED = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402

import solov2_d2  # noqa: E402,F401  # isort: split

from bench_matrix_nms import median_ms, run_case  # noqa: E402
from bench_targets import random_instances, time_target_assignment  # noqa: E402
from peak_memory import peak_memory_mb, run_in_fresh_process  # noqa: E402
from random_model import random_model_cfg  # noqa: E402

from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "SOLOv2-R50": "configs/SOLOv2_R50_3x.yaml",
    "SOLOv2-Light-448-R50": "configs/SOLOv2_Light_448_R50_3x.yaml",
}
STAGES = ["preprocess", "backbone", "heads", "postprocess", "total"]
LOADS = ["none", "compact", "heavy"]
# A photo of 48 megapixels through DefaultPredictor (peak memory only).
HUGE_IMAGE = (6000, 8000)


def build(config: str, device: str, train: bool = False):
    """A SOLOv2 model of `config` with random weights (seed 0)."""
    cfg = random_model_cfg(config, device)
    torch.manual_seed(0)
    return build_model(cfg).train(train)


def random_images(count, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g) for _ in range(count)]


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock times of the stages of one `SOLOv2.forward`, from forward hooks on the backbone
    and the mask head (the last head to run) and from wrappers around `model.network` (which may
    run once per image) and `model.postprocessor`; on CUDA each reading synchronises first.

    Post-processing is the post-processor's call. The time between the mask head's end and that
    call (the network returning, which frees its intermediate features, and the network policy
    assembling its outputs) counts in "heads"; the time after it (the model releasing the head
    outputs and the normalised images) counts only in the total.
    """

    def __init__(self, model, device: torch.device):
        self.device = device
        self.marks = []
        model.backbone.register_forward_pre_hook(lambda *_: self._mark("backbone_start"))
        model.backbone.register_forward_hook(lambda *_: self._mark("backbone_end"))
        model.mask_head.register_forward_hook(lambda *_: self._mark("heads_end"))
        network, postprocessor = model.network, model.postprocessor

        def timed_network(*args):
            outputs = network(*args)
            self._mark("network_end")
            return outputs

        def timed_postprocessor(*args):
            self._mark("postprocess_start")
            results = postprocessor(*args)
            self._mark("postprocess_end")
            return results

        model.network, model.postprocessor = timed_network, timed_postprocessor

    def _mark(self, name):
        synchronize(self.device)
        self.marks.append((name, time.perf_counter()))

    def __call__(self, fn) -> dict:
        """ms per stage of running fn()."""
        self.marks = []
        self._mark("start")
        fn()
        self._mark("end")
        times = dict.fromkeys(STAGES, 0.0)
        # The stage of the interval that ends at each mark.
        stage = {
            "backbone_start": "preprocess",
            "backbone_end": "backbone",
            "heads_end": "heads",
            "network_end": "heads",
            "postprocess_start": "heads",
            "postprocess_end": "postprocess",
            "end": None,
        }
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            if stage[name] is not None:
                times[stage[name]] += end - start
        times["total"] = self.marks[-1][1] - self.marks[0][1]
        return {k: v * 1000 for k, v in times.items()}


class ForcedCandidates:
    """A forced candidate load for a model with random weights: exactly `num` (cell, class) pairs
    pass the score threshold. With `heavy` False (the compact load) their masks look like
    objects; with `heavy` True they are the random network's own masks, image-wide noise (its
    kernels times `kernel_scale`): large, noisy masks that cover much of the image.

    Forward hooks replace the outputs of the heads after they ran (so the heads are still timed):

    - category logits: -4.6 (score 0.01) everywhere but at `num` (cell, class) pairs, whose scores
      are uniform in [0.2, 0.9]. The cells are drawn from those with even row and column on every
      level (968 of the 3872), which lie in no other's 2 x 2 point-NMS window, so exactly `num`
      pairs survive point NMS; a cell takes a second class only when `num` exceeds their count.
    - mask features: channel j < `objects` is an elliptical object (logit 4 (1 - d) at normalised
      elliptical distance d, at least -8; sqrt(area) log-uniform in `sizes`, by default 16..600
      input pixels; aspect ratio 0.5..2, centres anywhere in the image), the last channel is
      constant 1, others 0.
    - kernels of the chosen cells: a * (object channel) + b * (constant channel), a in [0.8, 1.25],
      b in [-1, 1]: each cell predicts one of the objects, eroded or dilated (areas x0.56..1.56),
      so the candidates are near-duplicates of a few dozen objects, as Matrix NMS sees them in a
      trained model; a cell's first class is its object's class.

    In the heavy load only the category logits are replaced. The load depends only on the shapes of
    the heads' outputs: where the network runs one image at a time (CPU), every image of a batch
    gets the same load.
    """

    def __init__(
        self,
        num: int,
        objects: int = 40,
        seed: int = 0,
        heavy: bool = False,
        kernel_scale=10.0,
        sizes=(16, 600),
    ):
        self.num, self.objects, self.seed, self.sizes = num, objects, seed, sizes
        self.heavy, self.kernel_scale = heavy, kernel_scale
        self.cache = {}

    def attach(self, model):
        """Install the hooks; returns their handles (call .remove() on each to detach)."""
        stride = model.mask_stride

        def heads(module, inputs, outputs):
            cate, kernels = outputs
            key = ("heads", tuple(c.shape for c in cate), tuple(k.shape for k in kernels))
            if key not in self.cache:
                self.cache[key] = self._heads(cate, kernels)
            if self.heavy:
                return self.cache[key][0], [k * self.kernel_scale for k in kernels]
            return self.cache[key]

        def mask_features(module, inputs, output):
            key = ("features", tuple(output.shape))
            if key not in self.cache:
                self.cache[key] = self._features(output, stride)
            return self.cache[key]

        handles = [model.ins_head.register_forward_hook(heads)]
        if not self.heavy:
            handles.append(model.mask_head.register_forward_hook(mask_features))
        return handles

    def _features(self, like, stride):
        b, e, h, w = like.shape
        g = torch.Generator().manual_seed(self.seed)
        rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
        n = self.objects
        if n >= e:
            raise ValueError(f"{n} objects need more than {e} mask feature channels.")
        low, high = self.sizes
        size = torch.exp(math.log(low) + rand(b, n) * math.log(high / low)) / stride
        aspect = 0.5 + 1.5 * rand(b, n)
        ry, rx = size * aspect.sqrt() / 2, size / aspect.sqrt() / 2
        cy, cx = rand(b, n) * h, rand(b, n) * w
        angle = rand(b, n) * math.pi
        ys = torch.arange(h, dtype=torch.float32)[:, None] - cy[..., None, None]
        xs = torch.arange(w, dtype=torch.float32)[None, :] - cx[..., None, None]
        cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
        u, v = xs * cos + ys * sin, -xs * sin + ys * cos
        dist = ((u / rx[..., None, None]) ** 2 + (v / ry[..., None, None]) ** 2).sqrt()
        features = torch.zeros(b, e, h, w)
        features[:, :n] = (4 * (1 - dist)).clamp(min=-8)
        features[:, -1] = 1
        # The layout of the real mask features.
        cl = like.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if cl else torch.contiguous_format
        return features.to(like.device, like.dtype).contiguous(memory_format=layout)

    def _heads(self, cate, kernels):
        g = torch.Generator().manual_seed(self.seed + 1)
        batch, num_classes = cate[0].shape[:2]
        dim = kernels[0].shape[1]
        grids = [c.shape[-1] for c in cate]
        offsets = [0] + list(torch.tensor([s * s for s in grids]).cumsum(0).tolist())
        # Flat cell indices with even row and column on every level.
        even = torch.cat(
            [
                (o + torch.arange(0, s, 2)[:, None] * s + torch.arange(0, s, 2)[None, :]).flatten()
                for o, s in zip(offsets, grids)
            ]
        )
        total = offsets[-1]
        flat_cate = torch.full((batch, total, num_classes), -4.6)
        flat_kernels = torch.zeros(batch, total, dim)
        object_class = torch.randint(num_classes, (batch, self.objects), generator=g)
        for i in range(batch):
            rounds = -(-self.num // len(even))
            cells = torch.cat([even[torch.randperm(len(even), generator=g)] for _ in range(rounds)])
            cells = cells[: self.num]
            rank = torch.arange(self.num) // len(even)  # 0 for a cell's first class, 1, ...
            obj = torch.randint(self.objects, (len(even),), generator=g)[
                torch.arange(self.num) % len(even)
            ]
            labels = (object_class[i, obj] + 7 * rank) % num_classes
            score = 0.2 + 0.7 * torch.rand(self.num, generator=g)
            flat_cate[i, cells, labels] = torch.log(score / (1 - score))
            a = 0.8 + 0.45 * torch.rand(self.num, generator=g)
            b = 2 * torch.rand(self.num, generator=g) - 1
            flat_kernels[i, cells, obj] = a
            flat_kernels[i, cells, dim - 1] = b
        device, dtype = cate[0].device, cate[0].dtype
        cate_out, kernel_out = [], []
        for o, s in zip(offsets, grids):
            level = slice(o, o + s * s)
            cate_out.append(flat_cate[:, level].transpose(1, 2).reshape(batch, -1, s, s))
            kernel_out.append(flat_kernels[:, level].transpose(1, 2).reshape(batch, -1, s, s))
        return (
            [x.to(device, dtype) for x in cate_out],
            [x.to(device, dtype) for x in kernel_out],
        )


def network_flops(model, size, device) -> float:
    """FLOPs (2 per multiply-add) of backbone + FPN + both heads for one image of `size`."""

    class Network(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            cate, kernels, mask_features = self.model.network(x)
            return tuple(cate), tuple(kernels), mask_features

    d = model.backbone.size_divisibility
    padded = [-(-s // d) * d for s in size]
    counter = FlopCountAnalysis(Network(model), (torch.zeros(1, 3, *padded, device=device),))
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    return 2.0 * counter.total()


def bench_inference(name, size, batch, candidates, repeats, device) -> dict:
    """Per-image stage times with no candidate and under the compact and heavy loads of
    `candidates` forced ones."""
    model = build(MODELS[name], str(device))
    inputs = [{"image": image} for image in random_images(batch, size)]
    timer = StageTimer(model, device)
    result = {"model": name, "size": list(size), "batch": batch}
    with torch.no_grad():
        for load in LOADS:
            forced = ForcedCandidates(candidates, heavy=load == "heavy")
            handles = forced.attach(model) if load != "none" else []
            outputs = model(inputs)  # warm-up
            runs = [timer(lambda: model(inputs)) for _ in range(repeats)]
            for h in handles:
                h.remove()
            result[load] = {s: statistics.median(r[s] for r in runs) / batch for s in STAGES}
            result[load]["candidates"] = candidates if load != "none" else 0
            result[load]["detections"] = sum(len(o["instances"]) for o in outputs) / batch
    return result


def bench_postprocess(name, size, candidates, repeats, device) -> list:
    """Post-processing alone on captured head outputs of one image, per forced load: the chosen
    path (on the CPU: block-bounded mask scoring, cropped pasting, int8 mask intersections) next
    to the plain one (every pixel, float32 intersection products)."""
    model = build(MODELS[name], str(device))
    inputs = [{"image": image} for image in random_images(1, size)]
    post = model.postprocessor
    results = []
    for load in ("compact", "heavy"):
        captured = []
        model.postprocessor = lambda *args: captured.append(args) or post(*args)
        handles = ForcedCandidates(candidates, heavy=load == "heavy").attach(model)
        with torch.no_grad():
            model(inputs)
        for h in handles:
            h.remove()
        model.postprocessor = post
        args = captured[0]
        chosen = lambda: post(*args)  # noqa: E731

        def plain():
            path = post.inference_path
            post.inference_path = "plain"
            try:
                return post(*args)
            finally:
                post.inference_path = path

        ms = median_ms([plain, chosen], device, warmup=1, repeats=repeats)
        a, b = plain(), chosen()
        same = all(
            torch.equal(x.pred_masks, y.pred_masks) and torch.equal(x.scores, y.scores)
            and torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
            for x, y in zip(a, b)
        )
        results.append(
            {"model": name, "size": list(size), "load": load, "candidates": candidates,
             "plain_ms": ms[0], "chosen_ms": ms[1], "detections": len(b[0]), "same": same}
        )
    return results


def matmul_rate(device, repeats) -> float:
    """GFLOP/s of a float32 2048 x 2048 matrix product."""
    a, b = torch.randn(2, 2048, 2048, device=device)
    out = torch.empty(2048, 2048, device=device)
    ms = median_ms([lambda: torch.mm(a, b, out=out)], device, warmup=2, repeats=repeats)[0]
    return 2 * 2048**3 / (ms / 1000) / 1e9


def bench_training(name, size, images, repeats, device) -> float:
    """Median ms of one SGD iteration of model `name` on `images` random images."""
    model = build(MODELS[name], str(device), train=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4)
    inputs = [
        {"image": image, "instances": random_instances(*size, 10, False, "cpu", seed=i)}
        for i, image in enumerate(random_images(images, size))
    ]

    def step():
        loss = sum(model(inputs).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return median_ms([step], device, warmup=1, repeats=repeats)[0]


def peak_memory_child(spec: dict) -> dict:
    """In this (fresh) process: peak memory of one inference under a forced load; with
    "image" in `spec`, of DefaultPredictor on a random BGR image of that size."""
    device = torch.device(spec["device"])
    cfg = random_model_cfg(MODELS[spec["model"]], spec["device"])
    torch.manual_seed(0)
    if "image" in spec:
        predictor = DefaultPredictor(cfg)
        model = predictor.model
        image = np.random.default_rng(0).integers(0, 256, (*spec["image"], 3), dtype=np.uint8)
        run = lambda: predictor(image)  # noqa: E731
        warm_up = lambda: predictor(image[:64, :64])  # noqa: E731
    else:
        model = build_model(cfg).eval()
        inputs = [{"image": x} for x in random_images(spec["batch"], spec["size"])]
        run = warm_up = lambda: model(inputs)  # noqa: E731
    ForcedCandidates(spec["candidates"], heavy=spec["load"] == "heavy").attach(model)
    with torch.no_grad():
        warm_up()  # lazily created state is not the inference's
        outputs, peak, increase = peak_memory_mb(run, device)
    result = {"peak_mb": peak, "increase_mb": increase}
    instances = outputs["instances"] if isinstance(outputs, dict) else outputs[0]["instances"]
    result["detections"] = len(instances)
    result["output_masks_mb"] = instances.pred_masks.numel() / 2**20
    return result


def peak_memory(model, size, batch, candidates, device, load, image=None) -> dict:
    spec = dict(model=model, size=list(size), batch=batch, candidates=candidates, device=device)
    spec["load"] = load
    if image is not None:
        spec["image"] = list(image)
    return run_in_fresh_process(__file__, "--peak-memory-child", spec)


def machine(device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]
        + (" (set by this script)" if OMP_POLICY_DEFAULTED else ""),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = _cpu_model() or platform.processor() or platform.machine()
    return info


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux); '' where there is none."""
    if not os.path.exists("/proc/cpuinfo"):
        return ""
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else ""


def markdown(results) -> str:
    m, load = results["machine"], results["load_average"]
    lines = [
        f"SOLOv2 benchmark on {m['name']} ({m['device']}, {m['threads']} threads of "
        f"{m['cpus']} CPUs), torch {m['torch']}, OMP_WAIT_POLICY {m['omp_wait_policy']}; "
        f"load average (1 min) {load['start']:.2f} at the start, {load['end']:.2f} at the end; "
        f"median of {results['repeats']} runs.",
        "",
        f"float32 matmul 2048x2048: {results['matmul_gflops']:.0f} GFLOP/s.",
        "",
        "Inference, ms per image (batch time / batch size):",
        "",
        "| model | input | batch | load | candidates | preprocess | backbone+FPN | heads | "
        "post-processing | total | post % | detections | backbone+heads GFLOP/s (% of matmul) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["inference"]:
        for load in LOADS:
            t = r[load]
            rate = r["flops"] / ((t["backbone"] + t["heads"]) / 1000) / 1e9
            lines.append(
                f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {r['batch']} | {load} | "
                f"{t['candidates']} | {t['preprocess']:.1f} | {t['backbone']:.0f} | "
                f"{t['heads']:.0f} | {t['postprocess']:.1f} | {t['total']:.0f} | "
                f"{100 * t['postprocess'] / t['total']:.1f} | {t['detections']:.0f} | "
                f"{rate:.0f} ({100 * rate / results['matmul_gflops']:.0f}%) |"
            )
    lines += [
        "",
        "Post-processing alone, one image, ms (plain: every pixel of every mask, float32 mask "
        "intersections; chosen: the default paths of this device):",
        "",
        "| model | input | load | candidates | plain ms | chosen ms | detections | same results |",
        "|---|---|---|---:|---:|---:|---:|:---:|",
    ]
    for r in results["postprocess"]:
        lines.append(
            f"| {r['model']} | {r['size'][0]}x{r['size'][1]} | {r['load']} | {r['candidates']} | "
            f"{r['plain_ms']:.0f} | {r['chosen_ms']:.0f} | {r['detections']} | "
            f"{'yes' if r['same'] else 'NO'} |"
        )
    lines += [
        "",
        "Backbone+FPN+heads FLOPs per image (fvcore, 2 per multiply-add): "
        + ", ".join(
            f"{r['model']} {r['size'][0]}x{r['size'][1]}: {r['flops'] / 1e9:.0f} G"
            for r in results["inference"]
            if r["batch"] == results["inference"][0]["batch"]
        )
        + ".",
        "",
        f"Matrix NMS alone (gaussian, masks {results['nms_mask_size']}, 40 objects):",
        "",
        "| candidates | reference ms | ours ms | speed-up | same keep & labels | max abs diff |",
        "|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in results["matrix_nms"]:
        lines.append(
            f"| {r['N']} | {r['dense_ms']:.1f} | {r['ours_ms']:.1f} | {r['speedup']:.1f}x | "
            f"{'yes' if r['same_keep_and_labels'] else 'NO'} | {r['max_abs_diff']:.1e} |"
        )
    t = results["training"]
    lines += [
        "",
        f"Training iteration ({t['model']}, {t['images']} images of {t['size'][0]}x{t['size'][1]}, "
        f"forward + backward + SGD step): {t['ms']:.0f} ms. Target assignment alone (one image "
        f"of {t['size'][0]}x{t['size'][1]}, {t['target_instances']} instances): "
        f"{t['targets_ms']:.1f} ms.",
        "",
        "Peak memory of inference under a forced load (a fresh process each; "
        + ("VmHWM during the call" if m["device"] == "cpu" else "max_memory_allocated")
        + "); the huge photo goes through DefaultPredictor, which resizes it for the network "
        "and returns masks of the photo's size:",
        "",
        "| model | input | batch | load | candidates | detections | output masks per image MB | "
        "peak MB | over the loaded model MB |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["peak_memory"]:
        size = r.get("image", r["size"])
        lines.append(
            f"| {r['model']} | {size[0]}x{size[1]} | {r['batch']} | {r['load']} | "
            f"{r['candidates']} | {r['detections']} | {r['output_masks_mb']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['increase_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def check(results):
    """Raise SystemExit unless every measurement is sane."""
    times = [results["matmul_gflops"], results["training"]["ms"], results["training"]["targets_ms"]]
    for r in results["inference"]:
        times += [r["flops"]] + [r[load][s] for load in LOADS for s in STAGES]
        if r["compact"]["detections"] <= 0 or r["heavy"]["detections"] <= 0:
            raise SystemExit(f"No detection under a forced load: {r}")
    times += [r[k] for r in results["matrix_nms"] for k in ("dense_ms", "ours_ms")]
    times += [r["peak_mb"] for r in results["peak_memory"]]
    if not all(math.isfinite(t) and t > 0 for t in times):
        raise SystemExit("A measurement is not a positive number; see the JSON.")
    times += [r[k] for r in results["postprocess"] for k in ("plain_ms", "chosen_ms")]
    if not all(r["same"] for r in results["postprocess"]):
        raise SystemExit("The chosen post-processing path differs from the plain one.")
    if not all(r["same_keep_and_labels"] for r in results["matrix_nms"]):
        raise SystemExit("Matrix NMS results differ from the dense formulation.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "output" / "benchmark"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=1000, help="forced candidate load")
    parser.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    parser.add_argument("--peak-memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory_child:
        print(json.dumps(peak_memory_child(json.loads(args.peak_memory_child))))
        return
    device = torch.device(args.device)
    if args.quick:
        sizes = {"SOLOv2-R50": (192, 288), "SOLOv2-Light-448-R50": (160, 256)}
        batches, args.repeats, args.candidates = (1, 2), 1, 100
        nms_sizes, nms_mask = [100], (80, 120)
        train = ("SOLOv2-Light-448-R50", (160, 256), 1)
        memory = [("SOLOv2-Light-448-R50", 1, load, None) for load in ("compact", "heavy")]
    else:
        sizes = {"SOLOv2-R50": (800, 1333), "SOLOv2-Light-448-R50": (448, 768)}
        batches, nms_sizes, nms_mask = (1, 4), [100, 500, 1000], (200, 336)
        train = ("SOLOv2-R50", (800, 1333), 3)
        memory = [
            (name, batch, load, None) for name in sizes for batch in batches
            for load in ("compact", "heavy")
        ]
        memory.append(("SOLOv2-R50", 1, "heavy", HUGE_IMAGE))

    results = {"machine": machine(device), "repeats": args.repeats, "quick": args.quick}
    results["load_average"] = {"start": os.getloadavg()[0]}
    print(json.dumps(results["machine"]), f"load average {os.getloadavg()}", flush=True)
    results["matmul_gflops"] = matmul_rate(device, max(args.repeats, 5))
    results["inference"] = []
    for name, size in sizes.items():
        flops = network_flops(build(MODELS[name], str(device)), size, device)
        for batch in batches:
            r = bench_inference(name, size, batch, args.candidates, args.repeats, device)
            r["flops"] = flops
            results["inference"].append(r)
            print(json.dumps(r), flush=True)
    results["postprocess"] = [
        r for name, size in sizes.items()
        for r in bench_postprocess(name, size, args.candidates, args.repeats, device)
    ]
    print(json.dumps(results["postprocess"]), flush=True)
    nms_args = SimpleNamespace(
        objects=40, height=nms_mask[0], width=nms_mask[1], seed=0, repeats=args.repeats
    )
    results["nms_mask_size"] = f"{nms_mask[0]}x{nms_mask[1]}"
    results["matrix_nms"] = [run_case(n, nms_args, device) for n in nms_sizes]
    name, size, repeats = train
    results["training"] = {
        "model": name,
        "images": 2,
        "size": list(size),
        "ms": bench_training(name, size, 2, repeats, device),
        "target_instances": 50,
        "targets_ms": time_target_assignment(*size, 50, False, args.repeats, device),
    }
    results["peak_memory"] = [
        peak_memory(name, sizes[name], batch, args.candidates, str(device), load, image)
        for name, batch, load, image in memory
    ]
    results["load_average"]["end"] = os.getloadavg()[0]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "benchmark.md").write_text(table)
    print(table)
    check(results)


if __name__ == "__main__":
    main()
