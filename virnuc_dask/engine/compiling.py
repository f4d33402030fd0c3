"""Whether an engine compiles: the one policy, decided in two steps.

``compile`` is a run's setting: True or False is obeyed; None (the default) decides as
follows.

1. On the driver, before any worker is asked (:func:`run_setting`): a run on CPUs, or one of
   fewer than :data:`COMPILE_MIN_TOKENS` tokens per worker, never compiles (it becomes False).
   A larger GPU run stays None: the driver does not import torch to know what the workers
   have.
2. On each worker, with its engine built (:func:`compiles_now`): None compiles a packed GPU
   engine that lacks the fused kernels (``PackedEngine.compiles_by_default``); the fused
   kernels match the compiled layer's speed and start in a second (see
   :mod:`virnuc_dask.engine.kernels`). An engine compiled once stays compiled; the reference
   (fp32) engine never compiles.

No torch is imported here.
"""

from __future__ import annotations

#: Tokens per worker from which a GPU run may compile its engine (``compile=None``), where the
#: worker lacks Triton for the fused kernels. Compiling ESM-2 3B costs about 10 s (a few with
#: torch's cache warm) and makes a plain torch engine about 25% faster: it pays back from
#: about 1-3 million tokens per worker; smaller jobs run eager.
COMPILE_MIN_TOKENS = 2_000_000


def run_setting(wanted: bool | None, *, on_gpu: bool, tokens: int, workers: int) -> bool | None:
    """The driver's step: the run's ``compile`` once its size is known.

    ``tokens``: the tokens still to embed; ``workers``: the lanes they are dealt to.
    """
    if wanted is not None:
        return wanted
    return None if on_gpu and tokens >= COMPILE_MIN_TOKENS * max(1, workers) else False


def compiles_now(wanted: bool | None, engine) -> bool:
    """The worker's step: whether a run asking ``wanted`` compiles this built engine now."""
    if getattr(engine, "compiled", True):
        return False  # compiled already, or an engine that never compiles
    return engine.compiles_by_default if wanted is None else wanted
