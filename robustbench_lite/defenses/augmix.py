"""AugMix (Hendrycks et al. 2020, arXiv 1912.02781): augmentation chains mixed with Dirichlet / Beta
weights, plus the Jensen-Shannon consistency loss over the clean image and two AugMix views.

The chains and the mixing are torchvision's ``transforms.AugMix`` (width 3, depth 1-3, alpha 1),
applied per image so that every example draws its own chains, from torch's generator re-seeded per
example with (seed, epoch, dataset index, view) so training does not depend on how batches are
formed. ``all_ops=False`` leaves out the operations that overlap the test corruptions (brightness,
contrast, color, sharpness), as the paper does.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import AugMix as TorchvisionAugMix

from robustbench_lite.errors import UserInputError
from robustbench_lite.seeding import mix

from .base import Defense, add_option


def jensen_shannon(*logits: Tensor) -> Tensor:
    """Mean over the batch of JS(p_1, ..., p_m) = mean_i KL(p_i || M), M = mean_i p_i (the paper's eq. 1).

    The mixture is clamped at 1e-7 before the log, as in the authors' code.
    """
    probs = [F.softmax(z, dim=1) for z in logits]
    log_mixture = torch.clamp(torch.stack(probs).mean(0), 1e-7, 1.0).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / len(probs)


class AugMix(Defense):
    """CE on the clean view + ``lam`` * JS(clean, augmix_1, augmix_2).

    Args:
        lam: weight of the Jensen-Shannon consistency term (12, the paper's lambda).
        severity, width, depth, alpha: torchvision ``AugMix`` settings (3, 3, -1 = random 1..3, 1.0).
        all_ops: also use brightness / contrast / color / sharpness (False, as in the paper).
        chain_group: consecutive images of a batch that share one draw of the chains' operations
            (their mixing weights stay per image); 1 = every image its own chains (the paper).
            torchvision applies an op to a whole tensor at once, so 8 is about 8x faster on CPU.

    ``loss(model, x, y)``: scalar, x (N, C, H, W) in [0, 1], y (N,). ``augment(x)`` gives one view.
    """

    name = "augmix"

    def __init__(self, *, lam: float = 12.0, severity: int = 3, width: int = 3, depth: int = -1, alpha: float = 1.0,
                 all_ops: bool = False, chain_group: int = 1, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if not lam >= 0:
            raise UserInputError(f"lam must be >= 0, got {lam!r}")
        if not 1 <= int(severity) <= 10:
            raise UserInputError(f"severity must be 1..10, got {severity!r}")
        if int(width) < 1:
            raise UserInputError(f"width must be >= 1, got {width!r}")
        if not alpha > 0:
            raise UserInputError(f"alpha must be > 0, got {alpha!r}")
        if int(chain_group) < 1:
            raise UserInputError(f"chain_group must be >= 1, got {chain_group!r}")
        self.lam = float(lam)
        self.severity = int(severity)
        self.width = int(width)
        self.depth = int(depth)
        self.alpha = float(alpha)
        self.all_ops = bool(all_ops)
        self.chain_group = int(chain_group)
        self._augmix = TorchvisionAugMix(severity=self.severity, mixture_width=self.width, chain_depth=self.depth,
                                         alpha=self.alpha, all_ops=self.all_ops)

    def augment(self, x: Tensor, indices: Tensor | None = None, view: int = 0) -> Tensor:
        """One AugMix view per image: x (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1].

        With ``chain_group`` 1, image i's chains depend only on (seed, epoch, ``indices[i]``, ``view``);
        a group's draw is seeded by its first image's index. Indices default to positions. torchvision's ops (posterize, solarize, ...) work on 8-bit images, so x is
        quantised to 256 levels first (lossless for MNIST and other 8-bit data).
        """
        as_bytes = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        index_list = list(range(x.shape[0])) if indices is None else torch.as_tensor(indices).tolist()
        views = []
        with torch.random.fork_rng(devices=[]):
            for start in range(0, x.shape[0], self.chain_group):
                torch.manual_seed(mix(self.seed, self.epoch, int(index_list[start]), view))
                group = as_bytes[start:start + self.chain_group]
                views.append(self._augmix(group[0]) if self.chain_group == 1 else self._augmix(group))
        return (torch.cat(views) if self.chain_group > 1 else torch.stack(views)).float().div(255).to(x.device)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, **batch) -> Tensor:
        n = x.shape[0]
        indices = batch.get("indices")
        logits = model(torch.cat([x, self.augment(x, indices, 1), self.augment(x, indices, 2)]))
        clean, aug1, aug2 = logits[:n], logits[n:2 * n], logits[2 * n:]
        return F.cross_entropy(clean, y) + self.lam * jensen_shannon(clean, aug1, aug2)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        add_option(parser, "--jsd-lambda", type=float, default=12.0, help="AugMix weight of the Jensen-Shannon term (12)")
        add_option(parser, "--augmix-severity", type=int, default=3, help="AugMix operation severity 1..10 (3)")
        add_option(parser, "--augmix-chain-group", type=int, default=1,
                   help="AugMix: images sharing one draw of chain operations (1 = per image, the paper)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AugMix":
        return cls(lam=args.jsd_lambda, severity=args.augmix_severity, chain_group=args.augmix_chain_group,
                   seed=args.seed)
