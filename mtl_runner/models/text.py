"""Text encoders over ``(B, L)`` token ids: ``backbone=transformer`` (from scratch) and
``backbone=hf`` (a HuggingFace encoder as the shared trunk).

Both return ``(B, L, D)`` token representations. Token-level tasks get a per-token head;
sentence-level tasks a head on position 0 (the ``[CLS]`` token of both tokenizers).

The from-scratch encoder's stages are its embedding and each
``torch.nn.TransformerEncoderLayer``, so strategies that cut or mix between stages,
stage freezing and layer-wise rates act on layers. Stages pass one tensor, so padding
travels inside it: padded positions are exactly zero vectors, each layer masks them as
attention keys and zeroes them again in its output. Sharing strategies that scale or mix
stage outputs (cross-stitch, MTAN's masks, hard sharing) keep padding zero; one that
adds an offset (FiLM's beta) lets later layers attend to padded positions, which
changes the representation of the real ones only slightly and never reaches a loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_runner.data.roots import root_check
from mtl_runner.data.text import load_pretrained
from mtl_runner.models.backbones import Backbone
from mtl_runner.models.heads import make_head
from mtl_runner.tasks import Task

#: The word vocabulary's padding id (mtl_runner.data.text.WordVocabulary.pad_id).
PAD_ID = 0


def padding_of(hidden: Tensor) -> Tensor:
    """``(B, L)``: True at padded positions (all-zero vectors)."""
    return hidden.detach().abs().amax(-1) == 0


class TokenEmbedding(nn.Module):
    """Word embedding plus the sinusoidal position code of Vaswani et al. (2017), computed
    for each batch's length (no length limit), zero at padded positions."""

    def __init__(self, vocab_size: int, width: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.width = width
        self.dropout = nn.Dropout(dropout)

    def positions(self, length: int, device: torch.device) -> Tensor:
        position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, self.width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / self.width))
        code = torch.zeros(length, self.width, device=device)
        code[:, 0::2] = torch.sin(position * frequency)
        code[:, 1::2] = torch.cos(position * frequency[: self.width // 2])
        return code

    def forward(self, ids: Tensor) -> Tensor:
        real = (ids != PAD_ID).unsqueeze(-1)
        hidden = self.embed(ids) * math.sqrt(self.width) + self.positions(ids.shape[1], ids.device)
        return self.dropout(hidden) * real


class EncoderStage(nn.Module):
    """One post-norm Transformer layer that ignores padded keys and keeps padding zero."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout, batch_first=True)

    def forward(self, hidden: Tensor) -> Tensor:
        padded = padding_of(hidden)
        return self.layer(hidden, src_key_padding_mask=padded).masked_fill(padded.unsqueeze(-1), 0.0)


class FirstToken(nn.Module):
    def forward(self, hidden: Tensor) -> Tensor:
        return hidden[:, 0]


def text_head(task: Task, width: int, input_shape: Sequence[int]) -> nn.Module:
    """A per-token MLP for token-level tasks, the same MLP on position 0 for the others."""
    if task.is_dense:
        raise ValueError(f"task {task.name!r} is dense ({task.kind}); a text backbone predicts per token or per sentence")
    head = make_head(task, width, False, input_shape)
    return head if task.is_token_level else nn.Sequential(FirstToken(), head)


class TransformerEncoder(Backbone):
    """a from-scratch Transformer encoder whose stages are its embedding and each layer."""

    def __init__(
        self,
        input_shape: Sequence[int],
        vocab_size: int,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        ffn: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"backbone=transformer reads (L,) token ids, got input shape {tuple(input_shape)}")
        if layers < 1:
            raise ValueError(f"backbone.layers must be >= 1, got {layers}")
        if width % heads or width % 2:
            raise ValueError(f"backbone.width ({width}) must be even and a multiple of backbone.heads ({heads})")
        stages: list[nn.Module] = [TokenEmbedding(vocab_size, width, dropout)]
        stages += [EncoderStage(width, heads, ffn, dropout) for _ in range(layers)]
        self.stages = nn.ModuleList(stages)
        self.stage_channels = (width,) * (layers + 1)
        self.output_stride = None

    def make_head(self, task: Task, input_shape: Sequence[int]) -> nn.Module:
        return text_head(task, self.out_channels, input_shape)


def _check_cached(name: str, **_: object) -> None:
    """Preflight: the model's tokenizer and configuration are in the local cache (or the
    machine may download them); otherwise one line before anything is written."""
    load_pretrained("AutoTokenizer", name)
    load_pretrained("AutoConfig", name)


class PretrainedStage(nn.Module):
    """The whole HuggingFace encoder as one stage: ids -> last hidden states, padding zeroed."""

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_id = pad_id

    def forward(self, ids: Tensor) -> Tensor:
        real = ids != self.pad_id
        hidden = self.model(input_ids=ids, attention_mask=real.long()).last_hidden_state
        return hidden * real.unsqueeze(-1)


@root_check(_check_cached)
class PretrainedEncoder(Backbone):
    """a HuggingFace encoder (``backbone.name``: a model in the local cache or a local
    directory) as the shared trunk; one stage, so ``finetune.freeze_stages=1`` freezes it."""

    def __init__(self, input_shape: Sequence[int], vocab_size: int, name: str) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"backbone=hf reads (L,) token ids, got input shape {tuple(input_shape)}")
        model = load_pretrained("AutoModel", name)
        assert isinstance(model, nn.Module)
        embeddings = model.get_input_embeddings().num_embeddings
        if vocab_size > embeddings:
            raise ValueError(f"backbone.name={name}: the data's tokenizer has {vocab_size} ids, the model embeds {embeddings}; tokenize with the model's own tokenizer (dataset.tokenizer)")
        tokenizer = load_pretrained("AutoTokenizer", name)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        self.stages = nn.ModuleList([PretrainedStage(model, 0 if pad_id is None else int(pad_id))])
        self.stage_channels = (int(model.config.hidden_size),)
        self.output_stride = None

    def make_head(self, task: Task, input_shape: Sequence[int]) -> nn.Module:
        return text_head(task, self.out_channels, input_shape)
