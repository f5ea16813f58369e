"""Training cost in bit-operations (METHODS.md §1.4), measured from the real shapes of the run.

Per quantized layer and training step there are three products with the same MAC count ``M``: the
forward ``W x A``, the error back-propagation ``E x W`` and the weight gradient ``E x A``. With weight,
activation and gradient widths ``w, a, g`` one step costs ``M * (w*a + g*w + g*a)`` BitOPs — for
``w = a = b_fw`` and ``g = b_bw`` this is the paper's ``M * (b_fw^2 + 2 b_fw b_bw)``. Layers a decision
keeps at FP32 count at 32 bits; layers outside the controller's layer filter are not counted.

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
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import Precision
from .formats.precision import FP32_BITOPS_PER_MAC

__all__ = ["CostMeter", "bitops_factor"]


def bitops_factor(p: Precision) -> float:
    """BitOPs per MAC of one training step at precision ``p`` (:meth:`Precision.bitops_per_mac`)."""
    return p.bitops_per_mac()


class CostMeter:
    """Accumulates BitOPs per layer from the backend's MAC counter.

    ``reference`` is the static precision the savings are also reported against (default 8/8);
    ``reference_layers`` the per-layer precisions a static run at ``reference`` really uses (constraints
    applied; default: ``reference`` everywhere). ``scale`` multiplies the counted MACs: the controller
    passes the world size under ``torch.distributed`` so that the cost is that of the global batch (equal
    local batches assumed).

    Example:
        >>> import torch
        >>> from adaprec.formats import Precision
        >>> macs = torch.zeros(1, dtype=torch.float64)
        >>> meter = CostMeter(["fc"], macs)
        >>> meter.set_precisions({"fc": Precision.cpt(8, 8)})
        >>> _ = macs.add_(1000); meter.step()
        >>> meter.summary()["gbitops"] * 1e9
        192000.0
    """

    def __init__(self, names: list[str], macs: Tensor, reference: Precision | None = None,
                 scale: int = 1, reference_layers: dict[str, Precision] | None = None) -> None:
        self.names = list(names)
        self.scale = scale  # world size under torch.distributed: count the global batch
        self.macs = macs
        dev = macs.device
        self.reference = reference or Precision.cpt(8, 8)
        ref = reference_layers or {}
        self.reference_factors = torch.tensor(
            [bitops_factor(ref.get(n, self.reference)) for n in self.names], dtype=torch.float64, device=dev)
        self.factors = torch.full((len(names),), FP32_BITOPS_PER_MAC, dtype=torch.float64, device=dev)
        self.layer_bitops = torch.zeros(len(names), dtype=torch.float64, device=dev)
        self.layer_macs = torch.zeros(len(names), dtype=torch.float64, device=dev)
        self.steps = 0

    def set_precisions(self, layers: dict[str, Precision]) -> None:
        f = [bitops_factor(layers[n]) if n in layers else None for n in self.names]
        cur = self.factors.tolist() if any(v is None for v in f) else None
        vals = [v if v is not None else cur[i] for i, v in enumerate(f)]
        self.factors.copy_(torch.tensor(vals, dtype=torch.float64))

    def step(self) -> None:
        """Fold the MACs counted since the last step into the totals at the current precisions."""
        macs = self.macs * self.scale if self.scale != 1 else self.macs
        self.layer_bitops.add_(macs * self.factors)
        self.layer_macs.add_(macs)
        self.macs.zero_()
        self.steps += 1

    def summary(self) -> dict[str, float | dict[str, float]]:
        bit = self.layer_bitops.sum().item()
        macs = self.layer_macs.sum().item()
        fp32 = macs * FP32_BITOPS_PER_MAC
        ref = (self.layer_macs * self.reference_factors).sum().item()
        ideal = macs * bitops_factor(self.reference)
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

    def state_dict(self) -> dict:
        return {"layer_bitops": self.layer_bitops.clone(), "layer_macs": self.layer_macs.clone(),
                "steps": self.steps, "names": list(self.names)}

    def load_state_dict(self, d: dict) -> None:
        if list(d["names"]) != self.names:
            raise ValueError(f"cost state is for layers {d['names']}, this controller has {self.names}")
        self.layer_bitops.copy_(d["layer_bitops"])
        self.layer_macs.copy_(d["layer_macs"])
        self.steps = int(d["steps"])
