"""Parameter and compute efficiency of multi-task sharing: T separate ResNet-50 models
(``sharing=none``) against one shared ResNet-50 encoder with T heads (``sharing=hard``).

Two settings, T = 3 each: NYUv2's dense tasks on the dilated ResNet-50 with ASPP heads
(the ``experiment=nyuv2_resnet50`` model), and three image-level classification tasks
on the plain ResNet-50 with the generic MLP heads. Prints, per setting, the parameter
counts (total, encoder(s), heads), the encoder passes one input costs, and the measured
CPU forward time of one input (median of ``--repeats``, both models timed alternately
so that machine load affects them alike).

    python scripts/param_efficiency.py [--size 96 128] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from mtl_runner.models.resnets import ResNet, ResNetDilated
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.models.sharing.hard import HardSharing
from mtl_runner.models.sharing.none import Separate
from mtl_runner.tasks import Task

NYUV2_TASKS = (Task("seg", "segmentation", 13), Task("depth", "depth", 1), Task("normal", "normals", 3))
IMAGE_TASKS = tuple(Task(f"cls{i}", "classification", 31) for i in range(3))


def count(params: Sequence[nn.Parameter] | nn.Module) -> int:
    items = params.parameters() if isinstance(params, nn.Module) else params
    return sum(p.numel() for p in items)


def build(strategy: type[SharingModel], backbone: Callable[..., nn.Module], tasks: Sequence[Task], shape: tuple[int, int, int]) -> SharingModel:
    return strategy(partial(backbone, shape), tasks, shape).eval()


@torch.no_grad()
def median_forward_ms(models: dict[str, nn.Module], shape: tuple[int, int, int], repeats: int) -> dict[str, float]:
    x = torch.randn(1, *shape)
    for model in models.values():  # warm-up: allocator, kernels
        model(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def setting(title: str, backbone: Callable[..., nn.Module], tasks: Sequence[Task], shape: tuple[int, int, int], repeats: int) -> None:
    shared = build(HardSharing, backbone, tasks, shape)
    separate = build(Separate, backbone, tasks, shape)
    times = median_forward_ms({"separate": separate, "shared": shared}, shape, repeats)
    print(f"\n{title} (T = {len(tasks)}, input {shape[1]}x{shape[2]})")
    print("| model | parameters | encoder params | head params | encoder passes / input | CPU forward ms / input |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = {"T separate ResNet-50 (sharing=none)": separate, "shared encoder + T heads (sharing=hard)": shared}
    for label, model in rows.items():
        heads = sum(count(model.heads[t.name]) for t in tasks)
        key = "separate" if model is separate else "shared"
        print(f"| {label} | {count(model):,} | {count(model) - heads:,} | {heads:,} | {model.forward_passes_per_input} | {times[key]:.1f} |")
    ratio_params = count(separate) / count(shared)
    print(f"separate / shared: {ratio_params:.2f}x parameters, {times['separate'] / times['shared']:.2f}x forward time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), help="input height and width for the timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (3, args.size[0], args.size[1])
    setting("NYUv2: dilated ResNet-50 + ASPP heads", ResNetDilated, NYUV2_TASKS, shape, args.repeats)
    setting("Image-level: ResNet-50 + MLP heads", partial(ResNet, arch="resnet50"), IMAGE_TASKS, shape, args.repeats)


if __name__ == "__main__":
    main()
