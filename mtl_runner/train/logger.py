"""TensorBoard logging without per-step host synchronisation.

Scalars are handed over as device tensors and buffered; ``flush()`` moves them to the
host in one transfer (at the logging interval and at epoch ends) and writes each with
its own step, so per-step curves (task weights, losses) cost one sync per interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    def __init__(self, log_dir: Path | None, purge_step: int | None = None) -> None:
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=30) if log_dir else None
        self._pending: list[tuple[Sequence[str], int, Tensor]] = []

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def scalar(self, tag: str, value: Tensor | float, step: int) -> None:
        self.scalars([tag], value, step)

    def scalars(self, tags: Sequence[str], values: Tensor | float | Sequence[float], step: int) -> None:
        """Log ``values[i]`` under ``tags[i]`` at ``step``; values may live on any device."""
        if self.writer is None:
            return
        tensor = values.detach().reshape(-1) if isinstance(values, Tensor) else torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        self._pending.append((tuple(tags), step, tensor))

    def flush(self) -> None:
        if self.writer is None or not self._pending:
            return
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, t) in enumerate(self._pending):
            by_device.setdefault(t.device, []).append(i)
        values: dict[int, list[float]] = {}
        for indices in by_device.values():
            flat = torch.cat([self._pending[i][2].double() for i in indices]).tolist()
            offset = 0
            for i in indices:
                n = self._pending[i][2].numel()
                values[i] = flat[offset : offset + n]
                offset += n
        for i, (tags, step, _) in enumerate(self._pending):
            for tag, value in zip(tags, values[i]):
                self.writer.add_scalar(tag, value, step)
        self._pending.clear()

    def sync(self) -> None:
        """Flush buffered scalars and the event file itself to disk."""
        self.flush()
        if self.writer is not None:
            self.writer.flush()

    def histogram(self, tag: str, values: Tensor, step: int) -> None:
        if self.writer is not None and values.numel():
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def figure(self, tag: str, figure: Any, step: int = 0) -> None:
        """A matplotlib figure as an image (IMAGES tab); the figure is left open."""
        if self.writer is not None:
            self.writer.add_figure(tag, figure, step, close=False)

    def custom_scalars(self, layout: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add_custom_scalars(layout)

    def hparams(self, values: dict[str, Any], metrics: dict[str, float], step: int,
                swept: dict[str, list[Any]] | None = None) -> None:
        """The HPARAMS tab, declared through the hparams plugin's own protos, into this
        run's own event file (not a sub-run), so a sweep shows one row per job under the
        job's own run name. ``swept``: the hparams a sweep varies and the values it
        tries; they come first, flagged as differing, so TensorBoard shows them as its
        default columns (it sorts by that flag and fills its column list from the top).
        The metrics are written as scalars at ``step``, the run's last, where the curves
        of the same run end."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.plugins.hparams import summary_v2 as hp

        swept = swept or {}
        experiment = api_pb2.Experiment(metric_infos=[hp.Metric(tag).as_proto() for tag in metrics])
        for name in [*swept, *(name for name in values if name not in swept)]:
            info = experiment.hparam_infos.add(name=name, differs=name in swept)
            if swept.get(name):
                hp.Discrete(swept[name]).update_hparam_info(info)
            else:  # a kept value: no domain, which would hide other runs' values from the table
                info.type = api_pb2.DATA_TYPE_STRING if isinstance(values[name], str) else (
                    api_pb2.DATA_TYPE_BOOL if isinstance(values[name], bool) else api_pb2.DATA_TYPE_FLOAT64)
        plugin_data = [
            (metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment)),
            (metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
                session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS))),
        ]
        file_writer = self.writer._get_file_writer()
        file_writer.add_summary(hp.hparams_pb(values))
        for tag, data in plugin_data:
            summary = Summary()
            summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
            file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
