"""Per-example attack losses and the (EOT-averaged) input gradient every gradient attack shares.

Every loss here returns shape (N,) and is to be *ascended*: larger means closer to the attack's goal
(misclassification, or the target class when targeted). All of them are exact for logits of any
sign (no hidden assumption that logits are positive).

- ``ce``: cross-entropy of the label (untargeted) or minus the cross-entropy of the target.
- ``margin``: Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (or ``z_t - max_{j != t} z_j``).
- ``dlr``: difference of logits ratio, Croce & Hein 2020 (arXiv 2003.01690), eq. (6) and the targeted
  form (7). It needs at least 3 (untargeted) or 4 (targeted) classes for its scale; with fewer classes
  the scale falls back to the largest available logit gap, so the sign and the argmax are unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_lite.errors import UserInputError

from .base import margin_loss

_TINY = 1e-12

#: (logits (N, K), labels (N,), target (N,) or None) -> loss (N,) to ascend
AttackLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def ce_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Cross-entropy of y (untargeted), or minus cross-entropy of ``target`` (targeted)."""
    if target is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, target, reduction="none")


def cw_margin_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Carlini-Wagner margin: ``max_{j!=y} z_j - z_y``; targeted ``z_t - max_{j!=t} z_j``."""
    if target is None:
        return margin_loss(logits, y)
    return -margin_loss(logits, target)


def _sorted_gap(sorted_logits: Tensor, targeted: bool) -> Tensor:
    """DLR denominator: ``z_pi1 - z_pi3`` (untargeted), ``z_pi1 - (z_pi3 + z_pi4) / 2`` (targeted)."""
    k = sorted_logits.shape[1]
    top = sorted_logits[:, -1]
    if targeted and k >= 4:
        return top - 0.5 * (sorted_logits[:, -3] + sorted_logits[:, -4])
    if k >= 3:
        return top - sorted_logits[:, -3]
    return top - sorted_logits[:, 0]  # 2 classes: the only gap there is


def dlr_loss(logits: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
    """Difference of logits ratio (Croce & Hein 2020), untargeted or targeted, shape (N,)."""
    sorted_logits = logits.sort(dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        numerator = margin_loss(logits, y)  # max_{j != y} z_j - z_y
        return numerator / (_sorted_gap(sorted_logits, False) + _TINY)
    numerator = logits.gather(1, target[:, None]).squeeze(1) - true
    return numerator / (_sorted_gap(sorted_logits, True) + _TINY)


LOSSES: dict[str, AttackLoss] = {"ce": ce_loss, "margin": cw_margin_loss, "dlr": dlr_loss}


def get_loss(name: str) -> AttackLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise UserInputError(f"unknown attack loss {name!r}: choose one of {', '.join(LOSSES)}") from None


def loss_and_grad(model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, loss: AttackLoss,
                  eot_iter: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (N, K), loss (N,) and input gradient (N, ...) averaged over ``eot_iter`` passes.

    Expectation over transformation (Athalye et al. 2018, arXiv 1802.00420): for a randomized model
    the gradient of the expected loss is estimated by averaging ``eot_iter`` sampled gradients; the
    returned logits and loss are averaged as well. NaN gradient entries are returned as they are so
    the caller can flag them.
    """
    x = x.detach().requires_grad_(True)
    if eot_iter == 1:
        logits = model(x)
        value = loss(logits, y, target)
        grad = input_gradient(value.sum(), x, model)
        return logits.detach(), value.detach(), grad
    grad_sum = torch.zeros_like(x)
    logits_sum = None
    loss_sum = None
    for _ in range(eot_iter):
        logits = model(x)
        value = loss(logits, y, target)
        grad = input_gradient(value.sum(), x, model)
        grad_sum += grad
        logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
        loss_sum = value.detach() if loss_sum is None else loss_sum + value.detach()
    return logits_sum / eot_iter, loss_sum / eot_iter, grad_sum / eot_iter


#: convolutions up to this many output channels take PyTorch's native CPU backward (see input_gradient)
NARROW_CONV_CHANNELS = 32


@contextlib.contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def native_backward_is_faster(model: nn.Module) -> bool:
    """True when every convolution of ``model`` is narrow (<= NARROW_CONV_CHANNELS output channels).

    On CPU, PyTorch's oneDNN convolution backward is slower than its native one for the few-channel
    convolutions of small image models (the zoo's MNIST CNN, 16 and 32 channels: forward + backward
    about 1.1x faster with the native backward at a batch of 288), while wider networks favour oneDNN
    (benchmarks/attacks.py's ResNet with 16-64 channels: 1.3x faster with oneDNN; its LeNet5 with 32
    and 64: even). The choice is a fixed rule on the architecture, not a timing, so a run's gradients
    never depend on how loaded the machine was.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return bool(convs) and all(m.out_channels <= NARROW_CONV_CHANNELS for m in convs)


def input_gradient(total: Tensor, x: Tensor, model: nn.Module) -> Tensor:
    """d total / d x; on CPU, with the native convolution backward for narrow convolutional models.

    The forward stays on oneDNN; only the backward kernel changes, and the gradient is the same up to
    float rounding. ``torch.backends.mkldnn.enabled`` is a process-wide switch: it is set for the
    duration of the backward and always restored (not safe if another thread runs convolutions
    meanwhile). Other devices, or oneDNN disabled by the user: the plain backward.
    """
    if (x.device.type != "cpu" or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled
            or not native_backward_is_faster(model)):
        return torch.autograd.grad(total, x)[0]
    with _onednn(False):
        return torch.autograd.grad(total, x)[0]


def gradient_health(grad: Tensor, zero_check: bool = True) -> tuple[Tensor, Tensor]:
    """Per-example masks (N,): gradient identically zero (if ``zero_check``), gradient with a NaN/inf.

    The common case costs one reduction: a finite total means every entry is finite.
    """
    flat = grad.flatten(1)
    if bool(torch.isfinite(flat.sum())):
        bad = torch.zeros(flat.shape[0], dtype=torch.bool, device=flat.device)
    else:
        bad = ~torch.isfinite(flat).all(dim=1)
    if not zero_check:
        return bad, bad
    zero = (flat.abs().amax(dim=1) == 0) & ~bad
    return zero, bad


def health_flags(zero: Tensor, bad: Tensor) -> dict[str, int]:
    """AttackResult.flags entries for examples whose gradient was zero or not finite."""
    flags = {}
    if bool(zero.any()):
        flags["zero_gradient"] = int(zero.sum())
    if bool(bad.any()):
        flags["nan_gradient"] = int(bad.sum())
    return flags


def top_other_classes(model: nn.Module, x: Tensor, y: Tensor, k: int, clean_logits: Tensor | None,
                      attack: str) -> Tensor:
    """(N, min(k, K - 1)) the highest-scoring classes other than y at the clean input: the targets
    of APGD-T and FMN-T. A cascade that already has ``clean_logits`` (N, K) passes them."""
    if clean_logits is None:
        with torch.no_grad():
            clean_logits = model(x)
    k = min(k, clean_logits.shape[1] - 1)
    if k < 1:
        raise UserInputError(f"{attack} needs a model with at least 2 classes")
    return clean_logits.detach().scatter(1, y[:, None], float("-inf")).topk(k, dim=1).indices
