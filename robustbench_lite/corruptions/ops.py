"""The ``corruptions`` threat model: common corruptions at five severities.

After Hendrycks & Dietterich 2019 (ImageNet-C / CIFAR-C, arXiv 1903.12261), scaled to 28x28 digits.
Each corruption is a function ``(x, severity, rng) -> x_corrupted`` of a batch x (N, C, H, W) in
[0, 1]; the deterministic ones come straight from ``torchvision.transforms.v2.functional``
(gaussian_blur, adjust_contrast, resize, jpeg, elastic), and every random draw goes through
:class:`robustbench_lite.seeding.ExampleRNG`, so example i is corrupted the same way whatever
batch it is in. Severity parameters are in :data:`SEVERITIES` and documented in docs/metrics.md.

>>> acc = corruption_accuracy(model, load_dataset("mnist5k", "test"), n_examples=500)  # doctest: +SKIP
>>> acc["mean_corruption_acc"]  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Any, Callable

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

from ..errors import UserInputError
from ..metrics import corruption_summary
from ..seeding import ExampleRNG, example_seeds, mix

log = logging.getLogger(__name__)

#: parameter of each corruption per severity 1..5 (CIFAR-C / ImageNet-C values, blur/pixelate/elastic scaled to 28 px)
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std of additive noise
    "shot_noise": (60.0, 25.0, 12.0, 5.0, 3.0),  # Poisson photons per unit intensity
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),  # fraction of salt-and-pepper pixels
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),  # blur sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor (1 = unchanged)
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),  # additive shift of intensity (ImageNet-C's V + c)
    "pixelate": (0.75, 0.65, 0.5, 0.45, 0.35),  # down-sampling factor (28 px: 21, 18, 14, 12, 9)
    "jpeg": (25.0, 18.0, 15.0, 10.0, 7.0),  # JPEG quality (ImageNet-C's; CIFAR-C's barely touch digits)
    "elastic": (1.0, 1.5, 2.0, 2.5, 3.0),  # peak displacement in pixels (smoothing sigma 3 px)
}

_ELASTIC_SIGMA = 3.0


def _noise_gaussian(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    return x + c * rng.normal(tuple(x.shape[1:]), stream)


def _noise_shot(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    # Poisson draws per example from a generator seeded like ExampleRNG's streams
    g = torch.Generator(device="cpu")
    out = torch.empty_like(x, device="cpu")
    for i, s in enumerate(rng.seeds):
        g.manual_seed(mix(s, stream, 3))
        out[i] = torch.poisson(x[i].cpu() * c, generator=g) / c
    return out.to(x.device)


def _noise_impulse(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    u = rng.uniform(tuple(x.shape[1:]), stream)
    out = torch.where(u < c / 2, torch.zeros_like(x), x)
    return torch.where((u >= c / 2) & (u < c), torch.ones_like(x), out)


def _blur(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    k = 2 * int(round(3 * c)) + 1
    return TF.gaussian_blur(x, [k, k], [c, c])


def _contrast(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    # blend with the image's mean intensity (torchvision: mean of the grayscale image)
    return TF.adjust_contrast(x, c)


def _brightness(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    # ImageNet-C raises V of HSV by c; on gray digits and for the max channel this is x + c, clipped.
    # torchvision's adjust_brightness is multiplicative and leaves a black background black.
    return x + c


def _pixelate(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    h, w = x.shape[-2:]
    # antialiased down-sampling averages blocks of pixels (ImageNet-C uses a box filter)
    small = TF.resize(x, [max(1, int(h * c)), max(1, int(w * c))], antialias=True)
    return TF.resize(small, [h, w], interpolation=TF.InterpolationMode.NEAREST)


def _jpeg(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    as_bytes = (x * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    with warnings.catch_warnings():  # torchvision 0.29 announces a move of its codecs to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return (TF.jpeg(as_bytes, int(c)).float() / 255).to(x.device)


def _elastic(x: Tensor, c: float, rng: ExampleRNG, stream: int) -> Tensor:
    """torchvision's elastic warp with a per-example smooth field, scaled to peak ``c`` pixels."""
    n, _, h, w = x.shape
    field = rng.uniform((2, h, w), stream) * 2 - 1
    k = 2 * int(round(3 * _ELASTIC_SIGMA)) + 1
    field = TF.gaussian_blur(field, [k, k], [_ELASTIC_SIGMA, _ELASTIC_SIGMA])
    field = field / field.flatten(1).abs().amax(1).clamp_min(1e-12).view(n, 1, 1, 1)
    # displacement in normalized coordinates: 2 / size per pixel
    scale = torch.tensor([2.0 / w, 2.0 / h], device=x.device) * c
    out = torch.empty_like(x)
    for i in range(n):
        disp = field[i].permute(1, 2, 0)[None] * scale
        out[i] = TF.elastic(x[i:i + 1], disp.to(x.device))[0]
    return out


CORRUPTIONS: dict[str, Callable[[Tensor, float, ExampleRNG, int], Tensor]] = {
    "gaussian_noise": _noise_gaussian,
    "shot_noise": _noise_shot,
    "impulse_noise": _noise_impulse,
    "gaussian_blur": _blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "pixelate": _pixelate,
    "jpeg": _jpeg,
    "elastic": _elastic,
}
_STREAM = {name: 1000 + 10 * i for i, name in enumerate(CORRUPTIONS)}


def corrupt(x: Tensor, name: str, severity: int, seeds: Tensor) -> Tensor:
    """Corruption ``name`` at ``severity`` (1..5) of x (N, C, H, W) in [0, 1]; ``seeds`` (N,) int64.

    The result is in [0, 1] and depends on example i only through ``x[i]`` and ``seeds[i]``.
    """
    if name not in CORRUPTIONS:
        raise UserInputError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    if not 1 <= int(severity) <= 5:
        raise UserInputError(f"severity must be 1..5, got {severity!r}")
    if not torch.is_tensor(x) or x.dim() != 4 or not torch.is_floating_point(x):
        raise UserInputError(f"x must be a float batch (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if len(seeds) != x.shape[0]:
        raise UserInputError(f"need one seed per example: {len(seeds)} seeds for {x.shape[0]} examples")
    rng = ExampleRNG(seeds, device=x.device)
    c = SEVERITIES[name][int(severity) - 1]
    try:
        out = CORRUPTIONS[name](x, c, rng, _STREAM[name] + int(severity))
    except RuntimeError as exc:  # e.g. elastic's smoothing kernel is larger than an 8x8 image
        size = "x".join(str(d) for d in x.shape[-2:])
        raise UserInputError(f"corruption {name!r} cannot be applied to {size} images "
                             f"({' '.join(str(exc).split())}); choose others") from None
    return out.clamp(0.0, 1.0)


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).argmax(dim=1)


def corruption_accuracy(model: nn.Module, dataset: Any, n_examples: int | None = None, batch_size: int = 250,
                        seed: int = 0, corruptions: list[str] | None = None) -> dict[str, Any]:
    """Accuracy of ``model`` on the first ``n_examples`` of ``dataset`` under every corruption and severity.

    ``dataset`` has ``.x`` (N, C, H, W) in [0, 1], ``.y`` (N,) and optionally ``.indices`` (the
    examples' dataset indices, which seed the noise). Returns ``clean_acc``, ``accuracy``
    ({corruption: [acc at severity 1..5]}), ``corruption_mean`` ({corruption: mean over severities}),
    ``mean_corruption_acc`` (the mean over all corruptions and severities, docs/metrics.md), the
    per-example flags ``clean_correct`` (n,) and ``correct`` ({corruption: [[bool] * n] * 5}), and
    ``seconds`` ({corruption: time spent corrupting and predicting}).
    The model's mode is restored afterwards.
    """
    names = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    for name in names:
        if name not in CORRUPTIONS:
            raise UserInputError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    n_total = int(dataset.x.shape[0])
    n = n_total if n_examples is None else int(n_examples)
    if not 1 <= n <= n_total:
        raise UserInputError(f"n_examples must be in 1..{n_total}, got {n_examples!r}")
    if int(batch_size) < 1:
        raise UserInputError(f"batch_size must be >= 1, got {batch_size!r}")
    indices = getattr(dataset, "indices", None)
    indices = torch.arange(n_total) if indices is None else torch.as_tensor(indices)
    device = next(iter(model.parameters()), torch.empty(0)).device
    seeds_all = example_seeds(seed, indices[:n])
    clean = torch.zeros(n, dtype=torch.bool)
    correct = {name: torch.zeros(5, n, dtype=torch.bool) for name in names}
    seconds = dict.fromkeys(names, 0.0)
    from attacks.base import frozen  # eval mode, the caller's mode restored afterwards

    with frozen(model):
        for start in range(0, n, int(batch_size)):
            sl = slice(start, min(n, start + int(batch_size)))
            x = dataset.x[sl].to(device).float()
            y = torch.as_tensor(dataset.y[sl]).to(device).long()
            clean[sl] = (_predict(model, x) == y).cpu()
            for name in names:
                started = time.perf_counter()
                for sev in range(1, 6):
                    xc = corrupt(x, name, sev, seeds_all[sl])
                    correct[name][sev - 1, sl] = (_predict(model, xc) == y).cpu()
                seconds[name] += time.perf_counter() - started
    flags = {name: f.int().tolist() for name, f in correct.items()}
    result = {
        "metric": "mean_corruption_acc",
        "n_examples": n,
        "seed": int(seed),
        "severities": [1, 2, 3, 4, 5],
        "clean_acc": float(clean.float().mean()),
        **corruption_summary(flags),
        "clean_correct": clean.tolist(),
        "correct": {name: f.tolist() for name, f in correct.items()},
        "seconds": seconds,
    }
    log.info("mean corruption accuracy %.4f over %d examples", result["mean_corruption_acc"], n)
    return result
