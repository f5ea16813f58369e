"""Precision policies: one module per family, all registered by name.

Example:
    >>> import adaprec.policies as P
    >>> sorted(P.list_policies())[:2]
    ['fixed', 'fp32']
"""

from .base import Fixed, FP32Policy, Policy
from .registry import (
    ENTRY_POINT_GROUP,
    list_policies,
    load_recipe,
    make_policy,
    recipe_text,
    register_policy,
    write_recipe,
)

__all__ = ["Policy", "FP32Policy", "Fixed", "register_policy", "list_policies", "make_policy",
           "load_recipe", "recipe_text", "write_recipe", "ENTRY_POINT_GROUP"]

register_policy("fp32", FP32Policy, "no quantization; the controller only observes and measures cost")
register_policy("fixed", Fixed, "static precision for the whole run, e.g. Fixed(bits=8, grad_bits=8)")
