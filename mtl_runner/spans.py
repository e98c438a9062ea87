"""Chunks (entities, phrases) in tag sequences, counted as the CoNLL evaluation script does.

A span task's tags are ``O`` or ``<prefix>-<type>`` with the prefixes of its scheme
(:data:`SCHEMES`). A chunk is a maximal run of tokens that the boundary rules keep
together; a predicted chunk is correct only when a gold chunk has the same type and both
the same first and the same last token. The boundary rules are the CoNLL script's, so
its conventions carry over: ``I-`` after ``O`` or after another type opens a chunk (IOB1
and ill-formed BIO predictions are scored, not rejected), a type change closes one, ``B-``
always opens one. For BIOES, which the original script predates, ``S-`` opens and closes a
chunk and ``E-`` closes one (docs/text.md).

Counting is vectorised over a batch of ``(B, L)`` tag ids and never leaves the device:
positions the caller marks as not valid (padding, non-first sub-words) are skipped, so a
word split into sub-words is scored once and a chunk runs across them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Tag schemes and the prefixes their tags may carry (``iob1`` is CoNLL-2003's original
#: encoding, ``bio`` = IOB2, ``bioes`` = IOBES).
SCHEMES: dict[str, frozenset[str]] = {
    "iob1": frozenset("BI"),
    "bio": frozenset("BI"),
    "bioes": frozenset("BIES"),
}
OUTSIDE = "O"
_PREFIXES = "OBIES"  # a tag's prefix code is its index here
_O, _B, _E, _S = (_PREFIXES.index(c) for c in "OBES")


def parse_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, sep, kind = tag.partition("-")
    if not sep or not kind or prefix not in _PREFIXES:
        raise ValueError(f"tag {tag!r} is neither O nor <B|I|E|S>-<type>")
    return prefix, kind


def check_scheme(scheme: str, tags: Sequence[str], where: str) -> None:
    """Raise a one-line ``ValueError`` when ``scheme`` is unknown or a tag does not fit it."""
    if scheme not in SCHEMES:
        raise ValueError(f"{where}: unknown tag scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    for tag in tags:
        try:
            prefix, _ = parse_tag(tag)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc} (scheme {scheme})") from None
        if prefix != OUTSIDE and prefix not in SCHEMES[scheme]:
            raise ValueError(f"{where}: tag {tag!r} is not a {scheme} tag (prefixes {'/'.join(sorted(SCHEMES[scheme]))} and O)")


class ChunkCounter:
    """Additive chunk counts of one task: ``[correct, predicted, gold]`` (the statistics
    the distributed evaluation sums over ranks)."""

    def __init__(self, tags: Sequence[str], device: torch.device) -> None:
        parsed = [parse_tag(t) for t in tags]
        types = sorted({kind for _, kind in parsed if kind})
        # Tables indexed by tag id, plus one trailing entry: the outside of the sentence.
        self.prefix = torch.tensor([_PREFIXES.index(p) for p, _ in parsed] + [0], device=device)
        self.type = torch.tensor([types.index(k) if k else -1 for _, k in parsed] + [-1], device=device)
        self.boundary = len(tags)
        self.counts = torch.zeros(3, dtype=torch.long, device=device)

    def update(self, pred: Tensor, target: Tensor, valid: Tensor) -> None:
        """``pred`` and ``target``: ``(B, L)`` tag ids; ``valid``: the positions scored."""
        gold_start, gold_end, gold_type = self._chunks(target, valid)
        pred_start, pred_end, pred_type = self._chunks(pred, valid)
        positions = torch.arange(target.shape[-1], device=target.device).expand_as(target)
        # A chunk ending here is correct when the other sequence ends one here too, of the
        # same type, opened at the same token (the last opening at or before this one).
        gold_opened = _last_at_or_before(gold_start, positions)
        pred_opened = _last_at_or_before(pred_start, positions)
        correct = gold_end & pred_end & (gold_type == pred_type) & (gold_opened == pred_opened)
        self.counts += torch.stack([correct.sum(), pred_start.sum(), gold_start.sum()])

    def _chunks(self, tags: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Where chunks open and close, and each position's chunk type."""
        ids = torch.where(valid, tags, self.boundary)
        previous = _neighbour(ids, valid, self.boundary, forward=False)
        following = _neighbour(ids, valid, self.boundary, forward=True)
        p, t = self.prefix[ids], self.type[ids]
        p_prev, t_prev = self.prefix[previous], self.type[previous]
        p_next, t_next = self.prefix[following], self.type[following]
        inside = valid & (p != _O)
        opens = inside & ((p == _B) | (p == _S) | (p_prev == _O) | (p_prev == _E) | (p_prev == _S) | (t_prev != t))
        closes = inside & ((p == _E) | (p == _S) | (p_next == _O) | (p_next == _B) | (p_next == _S) | (t_next != t))
        return opens, closes, t

    def compute(self) -> dict[str, float]:
        correct, predicted, gold = self.counts.tolist()
        precision = correct / predicted if predicted else 0.0
        recall = correct / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": f1, "precision": precision, "recall": recall}


def _neighbour(ids: Tensor, valid: Tensor, boundary: int, *, forward: bool) -> Tensor:
    """Each position's nearest valid neighbour's tag id (before it, or after it with
    ``forward``), or ``boundary`` at a sentence edge."""
    length = ids.shape[-1]
    if forward:
        ids, valid = ids.flip(-1), valid.flip(-1)
    marked = torch.where(valid, torch.arange(length, device=ids.device).expand_as(ids), -1)
    last_seen = marked.cummax(-1).values
    before = torch.cat([torch.full_like(last_seen[..., :1], -1), last_seen[..., :-1]], dim=-1)
    found = torch.where(before >= 0, ids.gather(-1, before.clamp_min(0)), boundary)
    return found.flip(-1) if forward else found


def _last_at_or_before(flags: Tensor, positions: Tensor) -> Tensor:
    return torch.where(flags, positions, -1).cummax(-1).values
