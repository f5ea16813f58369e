"""Precision policies: one module per family, all registered by name.

Example:
    >>> import adaprec.policies as P
    >>> {"fixed", "fp32"} <= set(P.list_policies())
    True
"""

from .base import Fixed, FP32Policy, Policy
from .cpt import CPT
from .guarded import GuardedCPT
from .muppet import MuPPET
from .registry import (
    ENTRY_POINT_GROUP,
    find_recipe,
    list_policies,
    list_recipes,
    load_recipe,
    make_policy,
    recipe_text,
    register_policy,
    write_recipe,
)

__all__ = ["Policy", "FP32Policy", "Fixed", "register_policy", "list_policies", "make_policy",
           "load_recipe", "recipe_text", "write_recipe", "list_recipes", "find_recipe", "ENTRY_POINT_GROUP",
           "CPT", "MuPPET", "GuardedCPT"]

register_policy("fp32", FP32Policy, "no quantization; the controller only observes and measures cost")
register_policy("fixed", Fixed, "static precision for the whole run, e.g. Fixed(bits=8, grad_bits=8)")
register_policy("cpt", CPT, "cyclic precision training (Fu et al. 2021): forward bits cycle 3-8 on a "
                "cosine ramp, 32 cycles, backward 8; CPT(bits='auto') finds B_min by a range test")
register_policy("guarded_cpt", GuardedCPT, "CPT on a triangular 4-8 bit cycle whose lower bound rises while "
                "the training loss shows the low end costs quality; backward 6-7 bits per layer from each "
                "error's measured spread")
register_policy("muppet", MuPPET, "MuPPET (Rajagopal et al. 2020): fixed point 8->12->14->16->FP32, "
                "switching on inter-epoch gradient diversity; per_layer=True: one ladder per layer")
