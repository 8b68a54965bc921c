"""The evaluator (``core.evaluate``) and what runs beside it: per-batch outcomes and their merge (``outcome``),
resumable and distributed batch runners (``resume``, ``distributed``), counterexample re-checks (``claims``)
and the gradient-masking checks (``checks``)."""
