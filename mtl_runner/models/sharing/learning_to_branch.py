"""``sharing=learning_to_branch``: Learning to Branch (Guo, Lee, Ulbricht, ICML 2020,
"Learning to Branch for Multi-Task Learning").

The network is a tree over the backbone's stages. Layer ``l`` (stage ``l``) has several
nodes, each its own copy of stage ``l``: layer 0 has one node (the root, read by every
task), the middle layers ``width`` nodes each (default: one per task), the last layer one
node per task, whose output task ``t``'s head reads. Every node of layer ``l >= 1``
chooses its parent among the nodes of layer ``l - 1`` from a categorical distribution
with learnable logits ``theta``; a tree is one parent choice per node, so the design
space holds every branching structure from one shared encoder to separate columns.

Schedule implemented here (state it when reporting results):

- *search* (``tree: null``): in training, each node reads the Gumbel-softmax sample
  ``softmax((theta + g) / temperature)`` (fresh Gumbel noise ``g`` per node and step, from
  torch's global generator, which the trainer seeds and every checkpoint restores) as
  weights over its parents' outputs (``hard: true``: the one-hot sample, with the soft
  sample's gradient), so weights and logits train together on the task losses.
  Evaluation, validation and test run the current argmax tree (each node reads its most
  likely parent; nodes off the tree are not computed), so the reported metrics are those
  of the tree the search has found. ``results.json`` records that tree under
  ``parameters.tree`` and its size under ``parameters.tree_parameters``.
- *fixed* (``tree: [[...], ...]``, one list of parent indices per layer after the first,
  e.g. the ``parameters.tree`` of a search run): only the nodes that lead to a task head
  are built, there are no logits, and training and evaluation run that tree. The
  paper's second phase (train the found tree) is a second run with the found tree,
  optionally ``init_from`` the search run (node and head names are the same in both
  modes). :meth:`LearningToBranch.fix_tree` does the same in place.

Parent probabilities ``softmax(theta)`` are logged as
``learning_to_branch/layer<l>/node<c>/parent<p>`` during the search.

Shared parameters: every node, and every node's logits, more than one task's loss
reaches. During the search that is every node but the last layer's (each child mixes all
its parents); in a fixed tree, the nodes with more than one task below them. Task
parameters: the task's last-layer node, its logits and its head (in a fixed tree, also
every node that only this task's branch passes through). ``last_shared_parameters``
(GradNorm's ``W``): the shared nodes of the deepest layer that has any.
``forward_passes_per_input``: the number of last-layer nodes (``T``; 1 for a one-stage
backbone, where the root is the only layer).

Deviations: a node is one stage of the runner's backbone (the paper's nodes are layers of
its own networks), and the tree's widths follow from the task count (``width``) rather
than being set per experiment. The logits train with the weights' optimiser and learning
rate, the temperature is constant over the run (no annealing schedule), and the second
phase is a separate run (the search does not switch to its tree by itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_runner.models.sharing.base import BackboneFactory, SharingModel
from mtl_runner.tasks import Task

Tree = list[list[int]]


class LearningToBranch(SharingModel):
    def __init__(
        self,
        backbone: BackboneFactory,
        tasks: Sequence[Task],
        input_shape: Sequence[int],
        width: int | None = None,
        temperature: float = 1.0,
        hard: bool = False,
        tree: Tree | None = None,
    ) -> None:
        super().__init__(tasks)
        if width is not None and width < 1:
            raise ValueError(f"sharing.width must be >= 1 or null (one node per task), got {width}")
        if temperature <= 0:
            raise ValueError(f"sharing.temperature must be > 0, got {temperature}")
        template = backbone()
        num_stages = len(template.stages)
        middle = len(self.task_names) if width is None else int(width)
        self.widths = [1] + [middle] * (num_stages - 2) + ([len(self.task_names)] if num_stages > 1 else [])
        self.temperature, self.hard = float(temperature), bool(hard)
        self.nodes = nn.ModuleList(
            [nn.ModuleDict({str(c): backbone().stages[layer] for c in range(count)}) for layer, count in enumerate(self.widths)]
        )
        self.parents: nn.ModuleList | None = nn.ModuleList(
            [nn.ParameterList([nn.Parameter(torch.zeros(self.widths[layer - 1])) for _ in range(count)])
             for layer, count in enumerate(self.widths) if layer > 0]
        )
        self.heads = nn.ModuleDict({t.name: template.make_head(t, input_shape) for t in tasks})
        self.tree: Tree | None = None
        if tree is not None:
            self._fix([[int(p) for p in layer] for layer in tree])

    def _leaf(self, task: str) -> int:
        return self.task_names.index(task) if len(self.widths) > 1 else 0

    def argmax_tree(self) -> Tree:
        """Each node's most likely parent (layers 1..), or the fixed tree."""
        if self.parents is None:
            assert self.tree is not None
            return [list(layer) for layer in self.tree]
        return [[int(logits.argmax()) for logits in layer] for layer in self.parents]

    def _used(self, tree: Tree) -> list[set[int]]:
        """The nodes of each layer that lead to a task head through ``tree``."""
        used = [set() for _ in self.widths]
        used[-1] = {self._leaf(name) for name in self.task_names}
        for layer in range(len(self.widths) - 1, 0, -1):
            used[layer - 1] = {tree[layer - 1][c] for c in used[layer]}
        return used

    def _fix(self, tree: Tree) -> None:
        expected = self.widths[1:]
        if [len(layer) for layer in tree] != expected or any(
            not 0 <= p < self.widths[layer] for layer, parents in enumerate(tree) for p in parents
        ):
            raise ValueError(
                f"sharing.tree={tree}: needs one list per layer after the first, of lengths {expected}, "
                f"each entry a parent index below {self.widths[:-1]} (that layer's previous width)"
            )
        for layer, keep in enumerate(self._used(tree)):
            for c in range(self.widths[layer]):
                if c not in keep:
                    del self.nodes[layer][str(c)]
        self.tree, self.parents = tree, None

    def fix_tree(self) -> Tree:
        """End the search: keep the argmax tree's nodes only, drop the logits (build the
        optimizer after this). Returns the tree."""
        tree = self.argmax_tree()
        self._fix(tree)
        return tree

    def _task_features(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        if self.training and self.parents is not None:
            return self._sampled(x)
        tree, memo = self.argmax_tree(), {}

        def node(layer: int, c: int) -> Tensor:
            if (layer, c) not in memo:
                memo[layer, c] = self.nodes[layer][str(c)](x if layer == 0 else node(layer - 1, tree[layer - 1][c]))
            return memo[layer, c]

        return {name: node(len(self.widths) - 1, self._leaf(name)) for name in tasks}

    def _sampled(self, x: Tensor) -> dict[str, Tensor]:
        """The search's training forward: every node mixes its parents by a Gumbel-softmax sample."""
        assert self.parents is not None
        outs = [self.nodes[0]["0"](x)]
        for layer in range(1, len(self.widths)):
            stacked = torch.stack(outs)
            outs = []
            for c, logits in enumerate(self.parents[layer - 1]):
                weights = F.gumbel_softmax(logits.float(), tau=self.temperature, hard=self.hard).to(stacked.dtype)
                outs.append(self.nodes[layer][str(c)](torch.einsum("p,p...->...", weights, stacked)))
        return {name: outs[self._leaf(name)] for name in self.task_names}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self._task_features(x, self.task_names)
        return {name: self.heads[name](features[name]) for name in self.task_names}

    def forward_task(self, x: Tensor, task: str) -> Tensor:
        return self.heads[task](self._task_features(x, (task,))[task])

    @property
    def forward_passes_per_input(self) -> int:
        return self.widths[-1]

    def _owners(self) -> dict[tuple[int, int], frozenset[str]]:
        """The tasks whose loss reaches each node (and its logits)."""
        everyone = frozenset(self.task_names)
        last = len(self.widths) - 1
        if self.parents is not None:  # the search: soft mixing reaches every node but the leaves from every task
            return {
                (layer, c): (frozenset(n for n in self.task_names if self._leaf(n) == c) if layer == last else everyone)
                for layer, count in enumerate(self.widths) for c in range(count)
            }
        assert self.tree is not None
        owners: dict[tuple[int, int], frozenset[str]] = {}
        for name in self.task_names:
            c = self._leaf(name)
            for layer in range(last, -1, -1):
                owners[layer, c] = owners.get((layer, c), frozenset()) | {name}
                if layer:
                    c = self.tree[layer - 1][c]
        return owners

    def _node_parameters(self, layer: int, c: int) -> list[nn.Parameter]:
        params = list(self.nodes[layer][str(c)].parameters())
        if self.parents is not None and layer > 0:
            params.append(self.parents[layer - 1][c])
        return params

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for (layer, c), who in self._owners().items() if len(who) > 1 for p in self._node_parameters(layer, c)]

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        own = [p for (layer, c), who in self._owners().items() if who == {task} for p in self._node_parameters(layer, c)]
        return own + list(self.heads[task].parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        shared = [key for key, who in self._owners().items() if len(who) > 1]
        if not shared:
            return []
        deepest = max(layer for layer, _ in shared)
        return [p for layer, c in shared if layer == deepest for p in self._node_parameters(layer, c)]

    def parameter_counts(self) -> dict[str, object]:
        """Adds the argmax tree and the number of parameters a model fixed to it has."""
        used = self._used(self.argmax_tree())
        nodes = sum(p.numel() for layer, keep in enumerate(used) for c in keep for p in self.nodes[layer][str(c)].parameters())
        heads = sum(p.numel() for p in self.heads.parameters())
        return {**super().parameter_counts(), "tree": self.argmax_tree(), "tree_parameters": nodes + heads}

    def diagnostics(self) -> dict[str, Tensor]:
        if self.parents is None:
            return {}
        out: dict[str, Tensor] = {}
        for layer, nodes in enumerate(self.parents, start=1):
            for c, logits in enumerate(nodes):
                for p, prob in enumerate(torch.softmax(logits.detach().float(), dim=0)):
                    out[f"learning_to_branch/layer{layer}/node{c}/parent{p}"] = prob
        return out
