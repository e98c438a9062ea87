"""Median milliseconds per training step of every surgery method, side by side in one
process, against a plain single backward, T sequential backward passes and torchjd.

Each column trains its own copy of the same model (same initial weights) with AdamW
(``foreach``, as mtl-run) on fixed random batches; the step is what mtl-run's trainer does around the engine:
zero_grad, ``GradientEngine.forward``, the task-loss vector, ``GradientEngine.backward``
(balancer uniform, the method's YAML from conf/surgery/), optimizer step. Columns:

- ``plain``: one backward of the summed loss, a hand-written loop (the floor);
- ``T x bwd``: ``T`` backward passes (one per task loss) through the whole model, the
  cost an exact params-space method should not exceed;
- every YAML in conf/surgery/ (``none`` is uniform, the engine's fast path), each in the
  params space, and row-weighting methods again with ``space=features`` (``/feat``);
- ``torchjd``: the same step through torchjd's ``mtl_backward`` + ``jac_to_grad`` with the aggregator of
  the same method (project options), where torchjd has it and it builds without extras.

Workloads (issue 3): ``cnn3`` (4-conv encoder 3->32->64->128->128, BN+ReLU, strides
1,2,2,1, on 3x64x64, batch 32; heads: 7-class segmentation and depth as 1x1 conv + 4x
bilinear upsampling, a 10-class global head), ``mlp3`` (MLP 256-512-512-256, batch 256,
3 regression heads) and ``mlp10`` (the same with 10 heads); many tasks (issue 23): ``mlp40``
(40 heads, as CelebA's attributes) and ``image40`` (ResNet-18 encoder on 3x64x64, batch
16, 40 binary heads of global pooling + one linear unit). ``--tasks 2 5 10 20 40`` runs
the MLP workload (``--family image``: the image one) at each T and ends with a growth
table: each column's ratio to ``plain`` per T. Columns take turns in rounds
(``--rounds`` x ``--steps``) after ``--warmup`` steps each (engine columns warm up
until ``trainer.jacobian=auto`` has settled, so they time the path it chose; the
``jacobian`` column says which), so machine noise hits all of them alike.

    python scripts/bench_steps.py                              # CPU (and CUDA when present)
    python scripts/bench_steps.py --quick                      # < 2 min on 2 CPU cores
    python scripts/bench_steps.py --workloads mlp10 --methods none pcgrad mgda upgrad
    python scripts/bench_steps.py --tasks 2 5 10 20 40 --methods pcgrad upgrad --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from mtl_runner.cli import CONF_DIR
from mtl_runner.models.backbones import MLP, Backbone, SmallCNN
from mtl_runner.models.resnets import ResNet
from mtl_runner.models.sharing.base import SharingModel
from mtl_runner.optim.balancers.uniform import Uniform
from mtl_runner.optim.jacobian import GradientEngine, Strategy
from mtl_runner.optim.jacobian.strategy import STRATEGIES
from mtl_runner.optim.surgery.base import Surgery
from mtl_runner.tasks import Task

SURGERY_NAMES = sorted(p.stem for p in (CONF_DIR / "surgery").glob("*.yaml"))
#: Targets of issue 3 that name methods.
TORCHJD_TARGET_METHODS = ("pcgrad", "mgda", "upgrad")
#: What mtl-run uses unless told otherwise.
DEFAULT_JACOBIAN: Strategy = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml").jacobian
#: Cap on warm-up steps spent waiting for ``trainer.jacobian=auto`` to settle.
MAX_SETTLE_STEPS = 20

Batch = tuple[Tensor, list[Tensor]]
LossFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------- workloads
class UpsampleHead(nn.Module):
    """1x1 conv to the task's channels, then 4x bilinear upsampling (cnn3's dense heads)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, features: Tensor) -> Tensor:
        return F.interpolate(self.conv(features), scale_factor=4, mode="bilinear", align_corners=False)


class BenchModel(SharingModel):
    """Hard sharing with the heads the workload prescribes (the project's own heads are
    larger): the engine only needs the SharingModel interface."""

    supports_features_space = True

    def __init__(self, encoder: Backbone, heads: dict[str, nn.Module], tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, features: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
        if isinstance(features, Mapping):
            return {name: head(features[name]) for name, head in self.heads.items()}
        return {name: head(features) for name, head in self.heads.items()}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.decode(self.encode(x))

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.heads[task].parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.stages[-1].parameters())


@dataclass
class Workload:
    name: str
    model: BenchModel
    batch: Batch
    losses: list[LossFn]

    @property
    def num_tasks(self) -> int:
        return len(self.losses)


def depth_loss(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).abs().mean()


def cnn3(device: torch.device) -> Workload:
    tasks = [Task("seg", "segmentation", 7), Task("depth", "depth", 1), Task("class", "classification", 10)]
    encoder = SmallCNN((3, 64, 64), channels=(32, 64, 128, 128), strides=(1, 2, 2, 1))
    heads: dict[str, nn.Module] = {
        "seg": UpsampleHead(128, 7),
        "depth": UpsampleHead(128, 1),
        "class": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)),
    }
    x = torch.randn(32, 3, 64, 64)
    targets = [torch.randint(0, 7, (32, 64, 64)), torch.rand(32, 1, 64, 64) * 10, torch.randint(0, 10, (32,))]
    model = BenchModel(encoder, heads, tasks).to(device)
    return Workload("cnn3", model, (x.to(device), [t.to(device) for t in targets]), [F.cross_entropy, depth_loss, F.cross_entropy])


def mlp(num_heads: int, device: torch.device) -> Workload:
    tasks = [Task(f"r{t}", "regression", 1) for t in range(num_heads)]
    encoder = MLP((256,), hidden=(512, 512, 256))
    heads: dict[str, nn.Module] = {t.name: nn.Linear(256, 1) for t in tasks}
    x = torch.randn(256, 256)
    targets = [torch.randn(256, 1) for _ in tasks]
    model = BenchModel(encoder, heads, tasks).to(device)
    return Workload(f"mlp{num_heads}", model, (x.to(device), [t.to(device) for t in targets]), [F.mse_loss] * num_heads)


def image(num_heads: int, device: torch.device) -> Workload:
    """Many image-level tasks on a ResNet-18 encoder (CelebA's attributes at a CPU-friendly
    resolution): each head pools the last feature map and gives one logit."""
    tasks = [Task(f"a{t}", "classification", 2) for t in range(num_heads)]
    encoder = ResNet((3, 64, 64), arch="resnet18")
    heads: dict[str, nn.Module] = {
        t.name: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1)) for t in tasks
    }
    x = torch.randn(16, 3, 64, 64)
    targets = [torch.randint(0, 2, (16, 1)).float() for _ in tasks]
    model = BenchModel(encoder, heads, tasks).to(device)
    losses: list[LossFn] = [F.binary_cross_entropy_with_logits] * num_heads
    return Workload(f"image{num_heads}", model, (x.to(device), [t.to(device) for t in targets]), losses)


#: Workload families for ``--tasks``: the number of tasks to a workload.
FAMILIES: dict[str, Callable[[int, torch.device], Workload]] = {"mlp": mlp, "image": image}
WORKLOADS: dict[str, Callable[[torch.device], Workload]] = {
    "cnn3": cnn3,
    "mlp3": lambda device: mlp(3, device),
    "mlp10": lambda device: mlp(10, device),
    "mlp40": lambda device: mlp(40, device),
    "image40": lambda device: image(40, device),
}


# ------------------------------------------------------------------------- columns
@dataclass
class Column:
    """One way of taking a training step on its own copy of the model."""

    name: str
    step: Callable[[], None]
    times_ms: list[float] = field(default_factory=list)
    engine: GradientEngine | None = None  # the project's engine columns
    torchjd: Column | None = None  # the same method through torchjd, where it has it


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """Every column's optimizer, alike so that the ratios compare the gradients' cost: the
    multi-tensor update that mtl-run's ``optimizer.foreach=null`` gives (torch's CPU
    default, a loop over the tensors, would add the same per-head cost to every column)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def loss_list(workload: Workload, outputs: dict[str, Tensor]) -> list[Tensor]:
    _, targets = workload.batch
    return [loss(outputs[name], y) for loss, name, y in zip(workload.losses, workload.model.task_names, targets)]


def task_losses(workload: Workload, outputs: dict[str, Tensor]) -> Tensor:
    return torch.stack(loss_list(workload, outputs))


def plain_column(workload: Workload) -> Column:
    model = copy.deepcopy(workload.model)
    optimizer = adamw(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        task_losses(workload, model(workload.batch[0])).sum().backward()
        optimizer.step()

    return Column("plain", step)


def sequential_column(workload: Workload) -> Column:
    """T backward passes through the whole model, one per task loss (gradients summed).
    Each starts at its own loss tensor: one started at an entry of the stacked loss
    vector would also run every other head's backward on zero gradients."""
    model = copy.deepcopy(workload.model)
    optimizer = adamw(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = loss_list(workload, model(workload.batch[0]))
        for t, loss in enumerate(losses):
            loss.backward(retain_graph=t < workload.num_tasks - 1)
        optimizer.step()

    return Column("T x bwd", step)


def load_surgery(name: str, space: str) -> Surgery:
    cfg = OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml")
    cfg.space = space
    return instantiate(cfg)


def engine_column(workload: Workload, surgery_name: str, space: str, strategy: Strategy, device: torch.device) -> Column:
    model = copy.deepcopy(workload.model)
    optimizer = adamw(model)
    surgery = load_surgery(surgery_name, space)
    surgery.setup(workload.num_tasks, torch.Generator(device=device).manual_seed(1))
    balancer = Uniform()
    balancer.setup(model.tasks, None)
    engine = GradientEngine(model, balancer, surgery, strategy)
    weights = torch.ones(workload.num_tasks, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses = task_losses(workload, engine.forward(workload.batch[0]))
        engine.backward(losses, balancer.weights(losses) * weights)
        optimizer.step()

    return Column(surgery_name + ("/feat" if space == "features" else ""), step, engine=engine)


def torchjd_aggregator(name: str, num_tasks: int) -> object | None:
    """torchjd's aggregator for the method with the project's options, or None."""
    try:
        import torchjd.aggregation as A
    except ImportError:
        return None
    options = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "surgery" / f"{name}.yaml"))
    assert isinstance(options, dict)
    builders: dict[str, Callable[[], object]] = {
        "none": A.Sum,
        "pcgrad": A.PCGrad,
        "mgda": A.MGDA,
        "upgrad": A.UPGrad,
        "imtl_g": A.IMTLG,
        "aligned_mtl": lambda: A.AlignedMTL(scale_mode=options.get("scale_mode", "min")),
        "cagrad": lambda: A.CAGrad(c=options.get("c", 0.4)),
        "graddrop": A.GradDrop,
        "gradvac": lambda: A.GradVac(beta=options.get("beta", 0.5)),
        "config": A.ConFIG,
        "dualproj": A.DualProj,
        "fairgrad": lambda: A.FairGrad(alpha=options.get("alpha", 2.0)),
        "excess_mtl": lambda: A.ExcessMTL(
            robust_step_size=options.get("robust_step_size", 1.0), n_warmup_steps=options.get("n_warmup_steps", 0),
        ),
        "modo": lambda: A.GramianWeightedAggregator(A.MoDoWeighting(gamma=options.get("gamma", 0.1), rho=options.get("rho", 0.1))),
        "sdmgrad": lambda: A.GramianWeightedAggregator(A.SDMGradWeighting(
            lr=options.get("lr", 10.0), momentum=options.get("momentum", 0.5), n_iter=options.get("niter", 20),
            lambda_=options.get("lamda", 0.3),
        )),
        "nash_mtl": lambda: A.NashMTL(
            n_tasks=num_tasks, max_norm=options.get("max_norm", 1.0),
            update_weights_every=options.get("update_weights_every", 1), optim_niter=options.get("optim_niter", 20),
        ),
    }
    if name not in builders:
        return None
    try:
        return builders[name]()
    except Exception:  # optional dependencies (cvxpy for cagrad and nash_mtl) missing
        return None


def torchjd_column(workload: Workload, name: str, aggregator: object) -> Column:
    from torchjd.autojac import jac_to_grad, mtl_backward

    model = copy.deepcopy(workload.model)
    optimizer = adamw(model)
    shared = model.shared_parameters()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        features = model.encode(workload.batch[0])
        losses = loss_list(workload, model.decode(features))  # separate graphs: torchjd differentiates each
        mtl_backward(losses, features=features, shared_params=shared)
        jac_to_grad(shared, aggregator)  # type: ignore[arg-type]
        optimizer.step()

    return Column(f"torchjd {name}", step)


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(column: Column, device: torch.device, record: bool) -> None:
    synchronize(device)
    start = time.perf_counter()
    column.step()
    synchronize(device)
    if record:
        column.times_ms.append((time.perf_counter() - start) * 1e3)


def unsettled(column: Column) -> bool:
    """Whether the column's engine is still timing its Jacobian strategies (``auto``):
    warm-up goes on until it has settled, so that timed steps measure the chosen path."""
    engine = column.engine
    return engine is not None and uses_strategy(engine) and engine.strategy == "auto"


def uses_strategy(engine: GradientEngine) -> bool:
    """Whether the Jacobian strategy matters: params-space surgery (the features space
    takes one pass through the heads whatever it is)."""
    return engine.surgery.needs_jacobian and engine.surgery.space == "params"


def median(column: Column) -> float:
    return statistics.median(column.times_ms)


def run_workload(workload: Workload, methods: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Column]:
    columns: dict[str, Column] = {}
    for column in (plain_column(workload), sequential_column(workload)):
        columns[column.name] = column
    torchjd: dict[str, Column] = {}
    for name in methods:
        surgery = load_surgery(name, "params")
        columns[name] = engine_column(workload, name, "params", args.jacobian, device)
        if surgery.is_row_weighting and name != "none":
            column = engine_column(workload, name, "features", args.jacobian, device)
            columns[column.name] = column
        if args.torchjd:
            aggregator = torchjd_aggregator(name, workload.num_tasks)
            if aggregator is not None:
                torchjd[name] = torchjd_column(workload, name, aggregator)
    everything = {**columns, **{c.name: c for c in torchjd.values()}}
    for column in everything.values():
        warm = 0
        while warm < args.warmup or (unsettled(column) and warm < MAX_SETTLE_STEPS):
            timed(column, device, record=False)
            warm += 1
    for _ in range(args.rounds):
        for column in everything.values():
            for _ in range(args.steps):
                timed(column, device, record=True)
    for name, column in torchjd.items():
        columns[name].torchjd = column
    return columns


def ratio(a: float, b: float | None) -> str:
    return "" if b is None else f"{a / b:.2f}"


def report(console: Console, workload: Workload, device: torch.device, columns: dict[str, Column]) -> list[str]:
    plain, sequential = median(columns["plain"]), median(columns["T x bwd"])
    uniform = median(columns["none"]) if "none" in columns else None
    table = Table(title=f"{workload.name} on {device.type} (T = {workload.num_tasks}): median ms per step")
    for heading in ("column", "ms", "x plain", "x uniform", "x T bwd", "jacobian", "torchjd ms", "x torchjd"):
        table.add_column(heading, justify="left" if heading in ("column", "jacobian") else "right")
    for name, column in columns.items():
        ours = median(column)
        theirs = median(column.torchjd) if column.torchjd is not None else None
        engine = column.engine
        strategy = str(engine.strategy) if engine is not None and uses_strategy(engine) else ""
        table.add_row(
            name, f"{ours:.2f}", ratio(ours, plain), ratio(ours, uniform), ratio(ours, sequential), strategy,
            "" if theirs is None else f"{theirs:.2f}", ratio(ours, theirs),
        )
    console.print(table)
    return verdicts(workload, columns, plain, sequential, uniform)


def verdicts(workload: Workload, columns: dict[str, Column], plain: float, sequential: float, uniform: float | None) -> list[str]:
    """The issue's targets, read off this workload's medians."""
    lines = []
    tag = f"{workload.name}:"
    if uniform is not None:
        lines.append(f"{tag} none within 5% of plain: {uniform / plain:.3f}x -> {'met' if uniform <= 1.05 * plain else 'NOT met'}")
    for name, column in columns.items():
        engine = column.engine
        if engine is None or name == "none":
            continue
        ms = median(column)
        if engine.surgery.space == "params":
            ok = ms <= sequential
            lines.append(f"{tag} {name} (params) vs T x bwd: {ms / sequential:.2f}x -> {'met' if ok else 'NOT met'}")
        elif uniform is not None:
            ok = ms <= 1.3 * uniform
            lines.append(f"{tag} {name} vs uniform: {ms / uniform:.2f}x (target 1.3) -> {'met' if ok else 'NOT met'}")
        if workload.name == "mlp10" and name in TORCHJD_TARGET_METHODS and column.torchjd is not None:
            r = ms / median(column.torchjd)
            lines.append(f"{tag} {name} vs torchjd: {r:.2f}x (target 0.6) -> {'met' if r <= 0.6 else 'NOT met'}")
        elif workload.num_tasks >= 40 and column.torchjd is not None:  # issue 23: ahead of torchjd
            r = ms / median(column.torchjd)
            lines.append(f"{tag} {name} vs torchjd: {r:.2f}x (target < 1) -> {'met' if r < 1 else 'NOT met'}")
    return lines


def growth(console: Console, family: str, device: torch.device, runs: list[tuple[int, dict[str, Column]]]) -> None:
    """How each column's cost grows with T: its median over ``plain``'s, per T (the
    torchjd columns as ``torchjd <method>``)."""
    names: list[str] = []
    for _, columns in runs:
        for name, column in columns.items():
            for label in (name, *([f"torchjd {name}"] if column.torchjd is not None else [])):
                if label != "plain" and label not in names:
                    names.append(label)
    table = Table(title=f"{family} on {device.type}: x plain per T (plain in ms)")
    for heading in ("T", "plain ms", *names):
        table.add_column(heading, justify="right")
    for num_tasks, columns in runs:
        plain = median(columns["plain"])
        medians = {name: median(column) for name, column in columns.items()}
        medians |= {f"torchjd {name}": median(c.torchjd) for name, c in columns.items() if c.torchjd is not None}
        table.add_row(str(num_tasks), f"{plain:.2f}", *(ratio(medians[n], plain) if n in medians else "" for n in names))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["cnn3", "mlp3", "mlp10"])
    parser.add_argument("--methods", nargs="+", choices=SURGERY_NAMES, default=SURGERY_NAMES, help="surgery YAMLs (default: all)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--warmup", type=int, default=6,
                        help="untimed steps per column; engine columns under auto go on until it has settled")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per column per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over all columns")
    parser.add_argument("--jacobian", choices=list(STRATEGIES), default=DEFAULT_JACOBIAN,
                        help=f"trainer.jacobian (default {DEFAULT_JACOBIAN}, conf/trainer/default.yaml's)")
    parser.add_argument("--no-torchjd", dest="torchjd", action="store_false", help="skip the torchjd columns")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tasks", nargs="+", type=int, default=None,
                        help="numbers of tasks: run --family at each (instead of --workloads) and print the growth table")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="mlp", help="the workload --tasks grows (default mlp)")
    parser.add_argument("--quick", action="store_true", help="warmup 2 (auto still settles), steps 1, rounds 3: noisy")
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.steps, args.rounds = 2, 1, 3
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "none" not in args.methods:
        args.methods = ["none", *args.methods]
    console = Console(width=None if sys.stdout.isatty() else 132)  # piped: wide enough for every column
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; warmup {args.warmup}, "
                  f"{args.rounds} rounds x {args.steps} timed steps per column")
    lines: list[str] = []
    for device_name in devices:
        device = torch.device(device_name)
        runs: list[tuple[int, dict[str, Column]]] = []
        builders = (
            [(lambda d, t=t: FAMILIES[args.family](t, d)) for t in args.tasks]
            if args.tasks
            else [WORKLOADS[name] for name in args.workloads]
        )
        for build in builders:
            torch.manual_seed(0)
            workload = build(device)
            columns = run_workload(workload, args.methods, args, device)
            lines += report(console, workload, device, columns)
            runs.append((workload.num_tasks, columns))
        if args.tasks:
            growth(console, args.family, device, runs)
    console.print("\n[bold]Targets[/bold]")
    for line in lines:
        console.print(line)


if __name__ == "__main__":
    main()
