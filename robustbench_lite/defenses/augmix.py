"""AugMix (Hendrycks et al. 2020, arXiv 1912.02781): augmentation chains mixed with Dirichlet / Beta
weights, plus the Jensen-Shannon consistency loss over the clean image and two AugMix views.

Every image draws its own chains, exactly as ``torchvision.transforms.AugMix`` does for one image
(width 3, depth 1-3 at random, Dirichlet(alpha) chain weights, Beta(alpha, alpha) skip weight, each
op and its magnitude bin and sign at random), from a generator seeded per image with
(seed, epoch, dataset index, view), so training does not depend on how batches are formed. The ops
are torchvision's own (its AugMix op table and ``_apply_op``); for speed each op is applied once
per depth step to the sub-batch of all (image, view, chain) triples that drew it with the same
magnitude, which gives the same pixels as one torchvision call per image (the ops are per-image).
``all_ops=False`` leaves out the ops that overlap the test corruptions (brightness, contrast, color,
sharpness), the paper's rule.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import AugMix as TorchvisionAugMix
from torchvision.transforms.autoaugment import _apply_op

from robustbench_lite.errors import UserInputError, checked_int, checked_number
from robustbench_lite.seeding import mix

from .base import Defense, add_option


def jensen_shannon(*logits: Tensor) -> Tensor:
    """Mean over the batch of JS(p_1, ..., p_m) = mean_i KL(p_i || M), M = mean_i p_i (the paper's eq. 1).

    The mixture is clamped at 1e-7 before the log, as in the authors' code.
    """
    probs = [F.softmax(z, dim=1) for z in logits]
    log_mixture = torch.clamp(torch.stack(probs).mean(0), 1e-7, 1.0).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / len(probs)


@dataclass(frozen=True)
class AugMixPlan:
    """The random draws of M AugMix views (one per (image, view)) with W chains of at most D ops.

    ``skip`` (M,): weight of the original image (Beta(alpha, alpha)); ``chain_weights`` (M, W):
    Dirichlet(alpha) * (1 - skip); ``depth`` (M, W) in 1..D; ``ops`` (M, W, D) indices into
    ``op_names``; ``magnitudes`` (M, W, D) the signed magnitude each op is called with.
    """

    op_names: tuple[str, ...]
    skip: Tensor
    chain_weights: Tensor
    depth: Tensor
    ops: Tensor
    magnitudes: Tensor


class AugMix(Defense):
    """CE on the clean view + ``lam`` * JS(clean, augmix_1, augmix_2).

    Args:
        lam: weight of the Jensen-Shannon consistency term (12, the paper's lambda).
        severity, width, depth, alpha: torchvision ``AugMix`` settings (3, 3, -1 = random 1..3, 1.0).
        all_ops: also use brightness / contrast / color / sharpness (False, as in the paper).

    ``loss(model, x, y, indices=)``: scalar, x (N, C, H, W) in [0, 1], y (N,).
    ``augment(x, indices, view)``: one view per image, (N, C, H, W) in [0, 1].
    """

    name = "augmix"

    def __init__(self, *, lam: float = 12.0, severity: int = 3, width: int = 3, depth: int = -1, alpha: float = 1.0,
                 all_ops: bool = False, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.lam = checked_number("lam", lam, minimum=0)
        self.severity = checked_int("severity", severity, minimum=1, maximum=10)
        self.width = checked_int("width", width, minimum=1)
        self.depth = checked_int("depth", depth, minimum=-1)
        if self.depth == 0:
            raise UserInputError(f"depth must be >= 1, or -1 for random 1..3, got {depth!r}")
        self.alpha = checked_number("alpha", alpha, above=0)
        self.all_ops = bool(all_ops)
        self._augmix = TorchvisionAugMix(severity=self.severity, mixture_width=self.width, chain_depth=self.depth,
                                         alpha=self.alpha, all_ops=self.all_ops)

    # --- the draws ------------------------------------------------------------------------------
    def _space(self, height: int, width: int) -> dict[str, tuple[Tensor, bool]]:
        return self._augmix._augmentation_space(self._augmix._PARAMETER_MAX, (height, width))

    def plan(self, seeds: Sequence[int], height: int, width: int) -> AugMixPlan:
        """Draw the chains of one view per seed with torchvision AugMix's distributions.

        ``torchvision.transforms.AugMix.forward`` draws, per image: Dirichlet([alpha, alpha]) for
        the skip mix, Dirichlet([alpha] * width) for the chains, then per chain a depth (randint
        1..3 unless fixed) and per op an index, a magnitude bin ``randint(severity)`` and a sign.
        """
        space = self._space(height, width)
        names = tuple(space)
        max_depth = self.depth if self.depth > 0 else 3
        m, shape = len(seeds), (self.width, max_depth)
        g = torch.Generator()
        pair, chains = torch.full((2,), self.alpha), torch.full((self.width,), self.alpha)
        betas, dirichlets, depths, draws = [], [], [], []
        for s in seeds:  # in torchvision's order: Beta, Dirichlet, depths, then (op, bin, sign) arrays
            g.manual_seed(int(s))
            betas.append(torch._sample_dirichlet(pair, generator=g))
            dirichlets.append(torch._sample_dirichlet(chains, generator=g))
            if self.depth <= 0:
                depths.append(torch.randint(1, 4, (self.width,), generator=g))
            draws.append(torch.stack([torch.randint(high, shape, generator=g) for high in (len(names), self.severity, 2)]))
        beta, draws = torch.stack(betas).view(m, 2), torch.stack(draws).view(m, 3, *shape)
        skip, chain_weights = beta[:, 0], torch.stack(dirichlets).view(m, self.width) * beta[:, 1:]
        depth = torch.stack(depths).view(m, self.width) if self.depth <= 0 else torch.full((m, self.width), max_depth)
        ops, bins, negative = draws[:, 0], draws[:, 1], draws[:, 2].bool()
        magnitudes = torch.zeros(m, self.width, max_depth)
        for k, (values, signed) in enumerate(space.values()):
            if values.ndim == 0:
                continue  # AutoContrast, Equalize: no magnitude
            chosen = ops == k
            value = values.float()[bins[chosen]]
            magnitudes[chosen] = torch.where(negative[chosen], -value, value) if signed else value
        return AugMixPlan(names, skip, chain_weights, depth, ops, magnitudes)

    def mix_views(self, images: Tensor, plan: AugMixPlan) -> Tensor:
        """Apply ``plan`` to uint8 images (M, C, H, W): the chains op by op, then the weighted mix.

        Returns float (M, C, H, W) in [0, 255]; the mixing is done in float, as in the authors' code
        (torchvision rounds the mix down to uint8).
        """
        m, w, d = plan.ops.shape
        chains = images.repeat_interleave(w, dim=0)  # row m * W + j: chain j of view m
        depth, ops, magnitudes = plan.depth.reshape(-1), plan.ops.reshape(-1, d), plan.magnitudes.reshape(-1, d)
        for step in range(d):
            active = (depth > step).nonzero().flatten()
            keys = torch.stack([ops[active, step].double(), magnitudes[active, step].double()], 1)
            unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
            for k, (op, magnitude) in enumerate(unique.tolist()):
                rows = active[inverse == k]
                chains[rows] = _apply_op(chains[rows], plan.op_names[int(op)], magnitude,
                                         interpolation=self._augmix.interpolation, fill=self._augmix.fill)
        chains = chains.view(m, w, *images.shape[1:]).float()
        ones = (1,) * (images.dim() - 1)
        return plan.skip.view(m, *ones) * images.float() + (plan.chain_weights.view(m, w, *ones) * chains).sum(1)

    # --- views and the loss ---------------------------------------------------------------------
    def augment_views(self, x: Tensor, indices: Tensor | None = None, views: Sequence[int] = (1, 2)) -> list[Tensor]:
        """One AugMix view of every image per entry of ``views``: x (N, C, H, W) in [0, 1] -> [(N, C, H, W)].

        Image i's view v depends only on (seed, epoch, ``indices[i]``, v); indices default to positions.
        torchvision's ops (posterize, solarize, ...) work on 8-bit images, so x is quantised to 256
        levels first (lossless for MNIST and other 8-bit data).
        """
        n = x.shape[0]
        if n == 0:
            return [x.clone() for _ in views]
        index_list = list(range(n)) if indices is None else torch.as_tensor(indices).tolist()
        if len(index_list) != n:
            raise UserInputError(f"need one index per image: {len(index_list)} indices for {n} images")
        as_bytes = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        seeds = [mix(self.seed, self.epoch, i, v) for v in views for i in index_list]
        plan = self.plan(seeds, *x.shape[-2:])
        mixed = self.mix_views(as_bytes.repeat(len(views), *([1] * (x.dim() - 1))), plan)
        return list(mixed.div(255).clamp(0, 1).to(x.device, x.dtype).split(n))

    def augment(self, x: Tensor, indices: Tensor | None = None, view: int = 0) -> Tensor:
        """One AugMix view per image (see :meth:`augment_views`): (N, C, H, W) -> (N, C, H, W)."""
        return self.augment_views(x, indices, (view,))[0]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch) -> Tensor:
        n = x.shape[0]
        aug1, aug2 = self.augment_views(x, batch.get("indices"), (1, 2))
        logits = model(torch.cat([x, aug1, aug2]))
        clean, logits1, logits2 = logits[:n], logits[n:2 * n], logits[2 * n:]
        return F.cross_entropy(clean, y) + self.lam * jensen_shannon(clean, logits1, logits2)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_option(parser, "--jsd-lambda", type=float, default=12.0, help="AugMix weight of the Jensen-Shannon term (12)")
        add_option(parser, "--augmix-severity", type=int, default=3, help="AugMix operation severity 1..10 (3)")
        add_option(parser, "--augmix-width", type=int, default=3, help="AugMix chains mixed per view (3)")
        add_option(parser, "--augmix-depth", type=int, default=-1, help="AugMix ops per chain, -1 = random 1..3 (-1)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AugMix":
        return cls(lam=args.jsd_lambda, severity=args.augmix_severity, width=args.augmix_width,
                   depth=args.augmix_depth, seed=args.seed)
