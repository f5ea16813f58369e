"""Training cost in bit-operations (docs/methods.md#bitops), measured from the products that ran.

Per quantized layer and training step there are three products: the forward ``W x A``, the error
back-propagation ``E x W`` (the *input gradient*) and the weight gradient ``E x A``, each with the
layer's MAC count ``M`` when all three run. With weight, activation and gradient widths ``w, a, g`` a
step with all three costs ``M * (w*a + g*w + g*a)`` BitOPs — for ``w = a = b_fw`` and ``g = b_bw`` the
paper's ``M * (b_fw^2 + 2 b_fw b_bw)``. Layers a decision keeps at FP32 count at 32 bits; layers outside
the controller's layer filter are not counted.

Only products that run are billed, each at the widths its operands really have. Every call of a layer
reports its MACs per *product kind* (:data:`KINDS`): which of the three products, and whether each of
its two operands is in the role's format or stays FP32 (an operand the layer cannot quantize, such as
the attention output that feeds ``MultiheadAttention``'s out-projection, counts at 32 bits). A backward
product is billed when its gradient is needed: the input gradient only if the layer's input requires
grad (not for a first layer fed with data), the weight gradient only for weights that require grad.

Savings are reported against two runs a user can actually do: FP32, and the static ``reference``
precision (default CPT's 8/8) *with the same constraints* — the controller passes the reference as its
constraints resolve it per layer (the classifier floor, for example, keeps a 96-way decoder at 10 bits in
the reference run too). The formula's idealised figure, every layer at the reference precision, is kept
under the ``_ideal`` keys.

All counters are device tensors updated in place once per step (no host sync); :meth:`CostMeter.summary`
reads them.

Example:
    >>> from adaprec.formats import Precision
    >>> bitops_factor(Precision.cpt(8, 8)), bitops_factor(Precision.fp32())
    (192.0, 3072.0)
    >>> kind_factors(Precision.cpt(4, 8))[:4]   # forward: w x a, w x fp32, fp32 x a, fp32 x fp32
    [16.0, 128.0, 128.0, 1024.0]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .formats import Precision

__all__ = ["CostMeter", "bitops_factor", "kind_factors", "kind_index", "KINDS", "PRODUCTS", "OPERANDS"]

#: The three products of a training step, and the roles of their two operands.
PRODUCTS = ("forward", "input_grad", "weight_grad")
OPERANDS = {"forward": ("weight", "activation"), "input_grad": ("gradient", "weight"),
            "weight_grad": ("gradient", "activation")}
#: Product kinds ``(product, left operand quantized, right operand quantized)``, in the order of a
#: layer's MAC counter (a row of 12).
KINDS: tuple[tuple[str, bool, bool], ...] = tuple(
    (p, lq, rq) for p in PRODUCTS for lq, rq in ((True, True), (True, False), (False, True), (False, False)))
_INDEX = {k: i for i, k in enumerate(KINDS)}
_FP32_BITS = 32.0


def kind_index(kind: str | tuple[str, bool, bool]) -> int:
    """The slot of a product kind in a layer's MAC counter; a product name alone means both operands
    in their roles' formats.

    Example:
        >>> kind_index("forward"), kind_index(("input_grad", False, True))
        (0, 6)
    """
    key = (kind, True, True) if isinstance(kind, str) else tuple(kind)
    try:
        return _INDEX[key]
    except KeyError:
        raise ValueError(f"unknown product kind {kind!r}; a product is one of {PRODUCTS}, optionally as "
                         "(product, left_quantized, right_quantized)") from None


def bitops_factor(p: Precision) -> float:
    """BitOPs per MAC of one training step at precision ``p`` (:meth:`Precision.bitops_per_mac`)."""
    return p.bitops_per_mac()


def kind_factors(p: Precision) -> list[float]:
    """BitOPs per MAC of each product kind (:data:`KINDS`) at precision ``p``; an operand that is not
    quantized counts 32 bits."""
    bits = {r: getattr(p, r).cost_bits for r in ("weight", "activation", "gradient")}
    out = []
    for product, lq, rq in KINDS:
        left, right = OPERANDS[product]
        out.append(float((bits[left] if lq else _FP32_BITS) * (bits[right] if rq else _FP32_BITS)))
    return out


def macs_vector(macs: int | float | Mapping) -> list[float]:
    """A layer call's MACs as a row over :data:`KINDS`: an int is the forward MACs of a layer whose three
    products have equal size (the input and weight gradients are added by the site when they will run);
    a mapping gives ``{kind: macs}`` (keys as :func:`kind_index` reads them)."""
    row = [0.0] * len(KINDS)
    if isinstance(macs, Mapping):
        for k, v in macs.items():
            row[kind_index(k)] += float(v)
    else:
        row[0] = float(macs)
    return row


class CostMeter:
    """Accumulates BitOPs per layer from the backend's MAC counter.

    ``macs`` holds one row per layer over the product kinds (:data:`KINDS`; the backend's sites add to
    it). ``reference`` is the static precision the savings are also reported against (default 8/8);
    ``reference_layers`` the per-layer precisions a static run at ``reference`` really uses (constraints
    applied; default: ``reference`` everywhere). ``scale`` multiplies the counted MACs: the controller
    passes the world size under ``torch.distributed`` so that the cost is that of the global batch (equal
    local batches assumed).

    Example:
        >>> import torch
        >>> from adaprec.formats import Precision
        >>> macs = torch.zeros(1, len(KINDS), dtype=torch.float64)
        >>> meter = CostMeter(["fc"], macs)
        >>> meter.set_precisions({"fc": Precision.cpt(8, 8)})
        >>> _ = macs[0, kind_index("forward")].add_(1000); _ = macs[0, kind_index("weight_grad")].add_(1000)
        >>> meter.step(); meter.summary()["gbitops"] * 1e9   # two products of 1000 MACs at 8 x 8 bits
        128000.0
    """

    def __init__(self, names: list[str], macs: Tensor, reference: Precision | None = None,
                 scale: int = 1, reference_layers: dict[str, Precision] | None = None) -> None:
        if macs.dim() != 2 or macs.shape != (len(names), len(KINDS)):
            raise ValueError(f"CostMeter: macs must have shape ({len(names)}, {len(KINDS)}) (layers x "
                             f"product kinds), got {tuple(macs.shape)}")
        self.names = list(names)
        self.scale = scale  # world size under torch.distributed: count the global batch
        self.macs = macs
        dev = macs.device
        self.reference = reference or Precision.cpt(8, 8)
        ref = reference_layers or {}
        self.reference_factors = torch.tensor(
            [kind_factors(ref.get(n, self.reference)) for n in self.names], dtype=torch.float64,
            device=dev).reshape(len(names), len(KINDS))
        self.ideal_factors = torch.tensor(kind_factors(self.reference), dtype=torch.float64, device=dev)
        self.factors = torch.tensor(kind_factors(Precision.fp32()), dtype=torch.float64,
                                    device=dev).repeat(len(names), 1)
        self.layer_bitops = torch.zeros(len(names), dtype=torch.float64, device=dev)
        #: forward MACs per layer (``gmacs``; the time model reads them)
        self.layer_macs = torch.zeros(len(names), dtype=torch.float64, device=dev)
        #: MACs per layer and product kind, all products
        self.product_macs = torch.zeros(len(names), len(KINDS), dtype=torch.float64, device=dev)
        self.steps = 0

    def set_precisions(self, layers: dict[str, Precision]) -> None:
        rows = [(i, kind_factors(layers[n])) for i, n in enumerate(self.names) if n in layers]
        if rows:
            idx = torch.tensor([i for i, _ in rows], device=self.factors.device)
            vals = torch.tensor([r for _, r in rows], dtype=torch.float64)
            self.factors[idx] = vals.to(self.factors.device)

    def step(self) -> None:
        """Fold the MACs counted since the last step into the totals at the current precisions."""
        macs = self.macs * self.scale if self.scale != 1 else self.macs
        self.layer_bitops.add_((macs * self.factors).sum(1))
        self.product_macs.add_(macs)
        self.layer_macs.add_(macs[:, :4].sum(1))  # the forward kinds come first
        self.macs.zero_()
        self.steps += 1

    def summary(self) -> dict[str, float | dict[str, float]]:
        bit = self.layer_bitops.sum().item()
        macs = self.layer_macs.sum().item()
        fp32 = self.product_macs.sum().item() * _FP32_BITS * _FP32_BITS
        ref = (self.product_macs * self.reference_factors).sum().item()
        ideal = (self.product_macs * self.ideal_factors).sum().item()
        return {
            "gbitops": bit / 1e9,
            "gbitops_fp32": fp32 / 1e9,
            "reference": self.reference.short(),
            "gbitops_reference": ref / 1e9,
            "savings_vs_fp32": 1 - bit / fp32 if fp32 else 0.0,
            "savings_vs_reference": 1 - bit / ref if ref else 0.0,
            "gbitops_reference_ideal": ideal / 1e9,
            "savings_vs_reference_ideal": 1 - bit / ideal if ideal else 0.0,
            "gmacs": macs / 1e9,
            "per_layer_gbitops": dict(zip(self.names, (v / 1e9 for v in self.layer_bitops.tolist()))),
        }

    def product_summary(self) -> dict[str, dict[str, float]]:
        """MACs counted so far per layer and product kind (``"forward"``, ``"input_grad/fp32,q"``...; only
        kinds that occurred): what :meth:`summary` bills."""
        out: dict[str, dict[str, float]] = {}
        for name, row in zip(self.names, self.product_macs.tolist()):
            out[name] = {_kind_name(k): v for k, v in zip(KINDS, row) if v}
        return out

    def state_dict(self) -> dict:
        return {"layer_bitops": self.layer_bitops.clone(), "layer_macs": self.layer_macs.clone(),
                "product_macs": self.product_macs.clone(), "steps": self.steps, "names": list(self.names)}

    def load_state_dict(self, d: dict) -> None:
        if list(d["names"]) != self.names:
            raise ValueError(f"cost state is for layers {d['names']}, this controller has {self.names}")
        self.layer_bitops.copy_(d["layer_bitops"])
        self.layer_macs.copy_(d["layer_macs"])
        if "product_macs" in d:
            self.product_macs.copy_(d["product_macs"])
        else:  # a state saved before products were counted: three equal products per forward MAC
            self.product_macs.zero_()
            for p in PRODUCTS:
                self.product_macs[:, kind_index(p)] = self.layer_macs
        self.steps = int(d["steps"])


def _kind_name(kind: tuple[str, bool, bool]) -> str:
    product, lq, rq = kind
    return product if lq and rq else f"{product}/{'q' if lq else 'fp32'},{'q' if rq else 'fp32'}"
