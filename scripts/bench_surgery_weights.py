"""Per-step cost of the row-weighting surgery methods' T x T solvers, against torchjd.

Times ``weights(M)`` of each method (the part of a step that is not the Jacobian, its
Gramian or ``w @ J``) next to torchjd's weighting of the same Gramian, in one process,
alternating ours / theirs so that a shared machine's noise hits both alike, and prints
the medians and their ratio. torchjd's UPGrad calls the host QP solver quadprog and its
MGDA runs Frank-Wolfe with early stopping (a host check each iteration); ours are
fixed-shape torch code that never reads back to the host, which is what matters on a GPU.
On the CPU mgda, cagrad and upgrad start from the last step's support (see
``mtl_runner/optim/surgery/simplex.py``): ``warm`` times that (the previous call's
Gramian was the same, as it nearly is between training steps), ``cold`` forgets the
support before each call (the support enumeration, the GPU path).

    python scripts/bench_surgery_weights.py                 # CPU, and CUDA when present
    python scripts/bench_surgery_weights.py --tasks 2 10 --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from mtl_runner.optim.surgery.aligned_mtl import AlignedMTL
from mtl_runner.optim.surgery.base import GramianWeighting
from mtl_runner.optim.surgery.cagrad import CAGrad
from mtl_runner.optim.surgery.imtl_g import IMTLG
from mtl_runner.optim.surgery.mgda import MGDA
from mtl_runner.optim.surgery.pcgrad import PCGrad
from mtl_runner.optim.surgery.upgrad import UPGrad


def torchjd_weightings() -> dict[str, Callable[[Tensor], Tensor]]:
    from torchjd import aggregation

    return {
        "pcgrad": aggregation.PCGrad().gramian_weighting,
        "mgda": aggregation.MGDA().gramian_weighting,
        "imtl_g": aggregation.IMTLG().gramian_weighting,
        "upgrad": aggregation.UPGrad().gramian_weighting,
        "aligned_mtl": aggregation.AlignedMTL().gramian_weighting,
    }


def ours(device: torch.device) -> dict[str, GramianWeighting]:
    methods: dict[str, GramianWeighting] = {
        "pcgrad": PCGrad(), "mgda": MGDA(), "cagrad": CAGrad(), "imtl_g": IMTLG(), "upgrad": UPGrad(), "aligned_mtl": AlignedMTL()
    }
    for method in methods.values():
        method.setup(0, torch.Generator(device=device).manual_seed(0))
    return methods


def timed(call: Callable[[], Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 3, 5, 10])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference = torchjd_weightings()
    print("| device | T | method | ours warm ms | ours cold ms | torchjd ms | warm / torchjd | cold / torchjd |")
    print("|---|---|---|---|---|---|---|---|")
    for device_name in args.devices:
        device = torch.device(device_name)
        methods = ours(device)
        for num_tasks in args.tasks:
            jacobian = torch.randn(num_tasks, 512, generator=torch.Generator().manual_seed(num_tasks)).to(device)
            gramian = jacobian @ jacobian.T
            for name, method in methods.items():
                theirs = reference.get(name)

                def cold(method: GramianWeighting = method) -> Tensor:
                    method.support = None
                    return method.weights(gramian)

                warm_ms, cold_ms, theirs_ms = [], [], []
                for _ in range(2):  # warm-up
                    cold()
                    method.weights(gramian)
                    if theirs is not None:
                        theirs(gramian)
                for _ in range(args.repeats):
                    warm_ms.append(timed(lambda: method.weights(gramian), device))
                    cold_ms.append(timed(cold, device))
                    method.weights(gramian)  # the support again, for the next warm call
                    if theirs is not None:
                        theirs_ms.append(timed(lambda: theirs(gramian), device))
                warm, cold_median = statistics.median(warm_ms), statistics.median(cold_ms)
                if theirs_ms:
                    other = statistics.median(theirs_ms)
                    ratios = f"{other:.3f} | {warm / other:.2f} | {cold_median / other:.2f}"
                else:
                    ratios = "- | - | -"
                print(f"| {device_name} | {num_tasks} | {name} | {warm:.3f} | {cold_median:.3f} | {ratios} |")

if __name__ == "__main__":
    main()
