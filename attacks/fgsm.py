"""Fast gradient sign method (Goodfellow et al. 2015, arXiv 1412.6572), Linf and L2, targeted too.

FGSM is one step of size eps of the PGD loop (:class:`attacks.pgd.PGD`), from the clean point; with
``random_start=True`` it is R+FGSM (Tramer et al. 2018). For Linf the step is ``eps * sign(grad)``,
for L2 ``eps * grad / ||grad||_2`` (the fast gradient method).
"""
from __future__ import annotations

from .pgd import PGD


class FGSM(PGD):
    """One ascent step of size ``eps`` (``rel_stepsize`` scales it) with the chosen loss.

    Shapes: x (N, C, H, W) in the box, y (N,) int64, target (N,) or None.

    >>> attack = FGSM()
    >>> # result = attack(model, x, y, ThreatModel("Linf", 0.1))
    """

    name = "fgsm"

    def __init__(self, *, rel_stepsize: float = 1.0, random_start: bool = False, loss: str = "ce",
                 eot_iter: int = 1, seed: int = 0) -> None:
        super().__init__(steps=1, rel_stepsize=rel_stepsize, random_start=random_start, restarts=1,
                         loss=loss, eot_iter=eot_iter, seed=seed)
