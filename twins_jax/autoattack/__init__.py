"""AutoAttack in JAX (Croce & Hein, ICML 2020), after the reference ``fra31/auto-attack``.

Attacks (all jit-compiled, ``lax`` loops, batched, explicit keys):

* :func:`apgd` - APGD-CE / APGD-DLR; :func:`apgd_t` - APGD-T (targeted DLR loss);
* :func:`fab_t` - targeted FAB;
* :func:`square` - Square attack (margin loss);
* :func:`autoattack` - the 'standard' / 'fast' ensemble with per-attack robust accuracy.

Every attack takes ``logits_fn(x) -> logits`` (x: NHWC float32 in [0, 1]), ``x``, ``y``,
a PRNG ``key``, ``norm`` ('Linf' or 'L2') and ``eps`` and returns adversarial inputs
inside the eps-ball and [0, 1] (the clean input where it failed).
"""

from .autopgd import apgd, apgd_t, apgd_with_robust, ce_loss, dlr_loss, dlr_targeted_loss
from .fab_attack import fab_t, fab_t_with_robust, projection_l2, projection_linf
from .square_attack import square, square_with_robust
from .suite import autoattack

__all__ = [
    'apgd',
    'apgd_t',
    'apgd_with_robust',
    'fab_t',
    'fab_t_with_robust',
    'square',
    'square_with_robust',
    'autoattack',
    'ce_loss',
    'dlr_loss',
    'dlr_targeted_loss',
    'projection_linf',
    'projection_l2',
]
