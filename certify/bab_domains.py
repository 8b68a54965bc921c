"""Subdomains of branch and bound over ReLU splits, and the branching heuristics (BaBSR, FSB).

A subdomain of one example is the input set with some ReLUs fixed: a split neuron is active
(``sign = +1``: pre-activation z >= 0) or inactive (``sign = -1``: z <= 0). :class:`Domains` holds M of
them as rows of tensors: the split signs per ReLU node, the warm-start slopes (alpha) and split
multipliers (beta) of each of their S specification rows, their lower bounds, the classes j of their
margins ``logit_y - logit_j`` and the neuron each will be split on next. Children inherit their
parent's alpha and beta (beta-CROWN, Wang et al. 2021, arXiv 2103.06624); the new split's beta starts at 0.

Branching scores (from the coefficient ``lam`` of each ReLU's output in the lower bound, the
pre-activation bounds l < 0 < u, the chord slope s = u / (u - l) and intercept -s l, and the
pre-activation bias b):

- BaBSR (Bunel et al. 2020, JMLR 21(42)): ``| max(lam b (s - 1), lam b s) + min(lam, 0) (-s l) |``;
- intercept (the "backup" score of FSB): ``min(lam, 0) (-s l)``, the bound lost to the neuron's chord;
- FSB (De Palma et al. 2021, arXiv 2104.06718): the top-k neurons of each score are tried, each
  child's bound is computed with the parent's alpha and beta, and the neuron whose worse child has
  the best bound is split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import Graph
from .layers import ChannelAffineOp, ConvOp, LinearOp, Relaxation

Interval = tuple[Tensor, Tensor]


@dataclass
class Domains:
    """M subdomains of one example; every per-domain tensor has M rows (see the module docstring).

    ``splits`` {ReLU node: int8 (M, *shape)}; ``alphas``/``betas`` {ReLU node: (M, S, *shape)};
    ``lower`` (M, S) float32 bounds (open rows <= 0); ``spec`` (M, S) classes j; ``branch`` (M, 2) the
    next split as (position in ``relus``, flat neuron index), -1 where no unstable neuron is left;
    ``pre`` {ReLU node: (lower, upper) float32 (M, *shape)}: the domain's own proven bounds of the ReLU's
    input (the root's, the splits applied, re-tightened under them: :func:`certify.bab_bound.refine`),
    None for the root's bounds.
    """

    relus: list[int]
    splits: dict[int, Tensor]
    alphas: dict[int, Tensor]
    betas: dict[int, Tensor]
    lower: Tensor
    spec: Tensor
    branch: Tensor
    pre: dict[int, Interval] | None = None

    def __len__(self) -> int:
        return self.lower.shape[0]

    def select(self, index: Tensor) -> "Domains":
        pre = None if self.pre is None else {r: (lo[index], hi[index]) for r, (lo, hi) in self.pre.items()}
        return Domains(self.relus, {r: t[index] for r, t in self.splits.items()},
                       {r: t[index] for r, t in self.alphas.items()}, {r: t[index] for r, t in self.betas.items()},
                       self.lower[index], self.spec[index], self.branch[index], pre)

    @staticmethod
    def cat(parts: list["Domains"]) -> "Domains":
        first = parts[0]
        pre = None if first.pre is None else {
            r: (torch.cat([p.pre[r][0] for p in parts]), torch.cat([p.pre[r][1] for p in parts]))  # type: ignore[index]
            for r in first.pre}
        return Domains(first.relus, {r: torch.cat([p.splits[r] for p in parts]) for r in first.splits},
                       {r: torch.cat([p.alphas[r] for p in parts]) for r in first.alphas},
                       {r: torch.cat([p.betas[r] for p in parts]) for r in first.betas},
                       torch.cat([p.lower for p in parts]), torch.cat([p.spec for p in parts]),
                       torch.cat([p.branch for p in parts]), pre)

    def worst_first(self, k: int) -> tuple["Domains", "Domains"]:
        """(the k domains with the lowest bound, the others); ties broken by position (deterministic)."""
        key = self.lower.min(dim=1).values
        order = torch.argsort(key, stable=True)
        return self.select(order[:k]), self.select(order[k:])

    def children(self) -> "Domains":
        """Two children per domain (first all active, then all inactive) split on ``branch``."""
        m = len(self)
        twice = torch.cat([torch.arange(m), torch.arange(m)])
        kids = self.select(twice)
        sign = torch.cat([torch.ones(m, dtype=torch.int8), -torch.ones(m, dtype=torch.int8)])
        rows = torch.arange(2 * m)
        for pos, r in enumerate(self.relus):
            on = kids.branch[:, 0] == pos
            if not bool(on.any()):
                continue
            neuron = kids.branch[on, 1]
            flat = kids.splits[r].flatten(1).clone()
            flat[rows[on], neuron] = sign[on]
            kids.splits[r] = flat.reshape(kids.splits[r].shape)
            beta = kids.betas[r].flatten(2).clone()
            beta[rows[on], :, neuron] = 0.0
            kids.betas[r] = beta.reshape(kids.betas[r].shape)
            if kids.pre is not None:  # the split neuron's own bounds: z >= 0 (active) or z <= 0 (inactive)
                lo, hi = (t.flatten(1).clone() for t in kids.pre[r])
                act, ina = rows[on][sign[on] > 0], rows[on][sign[on] < 0]
                lo[act, neuron[sign[on] > 0]] = lo[act, neuron[sign[on] > 0]].clamp(min=0)
                hi[ina, neuron[sign[on] < 0]] = hi[ina, neuron[sign[on] < 0]].clamp(max=0)
                kids.pre[r] = (lo.reshape(kids.pre[r][0].shape), hi.reshape(kids.pre[r][1].shape))
        kids.branch = torch.full_like(kids.branch, -1)
        return kids


def domain_bytes(dom: Domains) -> int:
    """Bytes one stored domain takes (splits, alpha, beta, bounds)."""
    per = sum(t[0].numel() * t.element_size() for group in (dom.splits, dom.alphas, dom.betas) for t in group.values())
    per += sum(2 * lo[0].numel() * lo.element_size() for lo, _ in (dom.pre or {}).values())
    return max(1, per + 4 * dom.lower.shape[1] + 8 * dom.spec.shape[1] + 16)


def apply_splits(pre: dict[int, Interval], splits: dict[int, Tensor], relu_input: dict[int, int]) -> dict[int, Interval]:
    """Per-domain pre-activation bounds: the root's (1, *shape) with split-active neurons' lower bounds
    raised to 0 and split-inactive neurons' upper bounds lowered to 0; (M, *shape) for split layers."""
    out = dict(pre)
    for r, sign in splits.items():
        node = relu_input[r]
        lo, hi = pre[node]
        out[node] = (torch.where(sign > 0, lo.clamp(min=0), lo), torch.where(sign < 0, hi.clamp(max=0), hi))
    return out


def split_relaxation(root: Relaxation, sign: Tensor) -> Relaxation:
    """The (Leaky)ReLU relaxation of M domains from the root's (1 row) and their split signs (M, *shape): a
    split-active neuron is the identity (its lower bound is 0), a split-inactive one is its negative slope
    times z (0 for a ReLU; its upper bound is 0)."""
    one, zero = torch.ones_like(root.lower_slope), torch.zeros_like(root.lower_slope)
    leak = torch.full_like(root.lower_slope, root.negative_slope)
    active, inactive = sign > 0, sign < 0
    fixed = active | inactive

    def patch(t: Tensor) -> Tensor:
        return torch.where(active, one, torch.where(inactive, leak, t))

    return Relaxation("relu", patch(root.lower_slope), patch(root.upper_slope),
                      torch.where(fixed, zero, root.upper_intercept), unstable=root.unstable & ~fixed,
                      negative_slope=root.negative_slope)


def preactivation_bias(graph: Graph, relu: int) -> Tensor | float:
    """The bias of the affine layer that feeds a ReLU, broadcast to its shape (0 when there is none)."""
    node = graph.nodes[graph.nodes[relu].inputs[0]]
    if node.kind != "affine":
        return 0.0
    op = node.op
    bias = op.shift.flatten() if isinstance(op, ChannelAffineOp) else getattr(op, "bias", None)
    if bias is None or not isinstance(op, (LinearOp, ConvOp, ChannelAffineOp)):
        return 0.0
    shape = node.shape
    return bias.detach().reshape(-1, *([1] * (len(shape) - 1))).expand(shape).to(torch.float32)


def branching_scores(lam: Tensor, lo: Tensor, hi: Tensor, bias: Tensor | float, free: Tensor,
                     rows: Tensor) -> tuple[Tensor, Tensor]:
    """BaBSR and intercept scores (D, W) of one ReLU layer's neurons (higher is better for both).

    ``lam`` (D, S, *shape) the coefficient of the ReLU's output; ``lo``/``hi`` (D or 1, *shape) the
    domains' pre-activation bounds; ``free`` (D, *shape) unstable and not split; ``rows`` (D, S) the
    weight of each specification row (1 for open rows, 0 for rows already proven), averaged over.
    """
    unstable = free & (lo < 0) & (hi > 0)
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))
    slope = torch.where(unstable, hi / width, torch.zeros_like(hi)).unsqueeze(1)
    icpt = torch.where(unstable, -lo * hi / width, torch.zeros_like(hi)).unsqueeze(1)
    neg = lam.clamp(max=0)
    intercept = neg * icpt
    b = lam * (bias.unsqueeze(0).unsqueeze(0) if torch.is_tensor(bias) else bias)
    babsr = (torch.maximum(b * (slope - 1), b * slope) + intercept).abs()
    weight = rows.to(lam.dtype).reshape(*rows.shape, *([1] * (lam.dim() - 2)))
    count = rows.sum(1).clamp(min=1).to(lam.dtype).reshape(-1, *([1] * (lam.dim() - 2)))
    babsr = (babsr * weight).sum(1) / count
    intercept = -(intercept * weight).sum(1) / count  # the bound lost: >= 0, higher is better
    mask = unstable.flatten(1)
    return torch.where(mask, babsr.flatten(1), torch.full_like(mask, -1.0, dtype=lam.dtype)), \
        torch.where(mask, intercept.flatten(1), torch.full_like(mask, -1.0, dtype=lam.dtype))


def top_candidates(scores: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The k best (relu position, neuron) per domain over every layer's scores (D, W_r): (D, k, 2) and
    whether each is a real candidate (score >= 0; -1 marks stable or split neurons)."""
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + s.shape[1])
    flat = torch.cat(scores, dim=1)
    k = min(k, flat.shape[1])
    value, index = torch.topk(flat, k, dim=1, sorted=True)
    bounds = torch.tensor(offsets[1:], device=index.device)
    pos = torch.bucketize(index, bounds, right=True)
    neuron = index - torch.tensor(offsets, device=index.device)[pos]
    return torch.stack([pos, neuron], dim=-1), value >= 0
