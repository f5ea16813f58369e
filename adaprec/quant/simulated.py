"""The simulated backend: fake quantization of quantizable layers in pure PyTorch.

For every selected layer the backend attaches a :class:`~adaprec.quant.site.LayerSite` with
:func:`~adaprec.quant.attach.attach` (hooks plus a cached dynamic subclass; see that module for the
mechanism and why): the input activations are fake-quantized (STE), the weights are quantized while
the layer's forward runs (STE), and in the backward the error arriving at the layer's output is
quantized (stochastic rounding for CPT/MuPPET gradients). Keys, parameters and buffers are untouched,
and :meth:`SimulatedBackend.detach` leaves the layers exactly as they were.

Which layer types, and what counts as their weights and inputs, comes from the layer table
(:mod:`adaprec.quant.layers`; :func:`~adaprec.quant.layers.register_layer` adds types). Out of the
box: ``Conv1d/2d/3d``, ``Linear``, ``LSTM``/``GRU``/``RNN`` (all weight matrices, every product
quantized inside the recurrence: :mod:`adaprec.quant.rnn`) and ``MultiheadAttention`` (in-projection
and out-projection weights; query/key/value inputs; the attention output's gradient — the attention
products themselves are not quantized, and the operands they produce are billed at 32 bits), and
Hugging Face's ``Conv1D`` once ``transformers`` is imported.

Example:
    >>> import torch
    >>> from adaprec.formats import Precision
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> be = SimulatedBackend()
    >>> names = be.attach(model, find_layers(model))
    >>> be.apply({"0": Precision.cpt(2, 8)})
    >>> y = model(torch.randn(3, 8)); be.detach(); names
    ['0']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..cost import KINDS
from ..formats import Precision
from .attach import Attachment, attach, is_attached
from .layers import QUANTIZABLE, LayerFilter, find_layers, layer_kind
from .site import LayerSite

__all__ = ["QUANTIZABLE", "find_layers", "SimulatedBackend", "LayerFilter"]


# --- the backend -----------------------------------------------------------------------------------

class SimulatedBackend:
    """Attach sites to layers, apply per-layer precisions, detach without a trace.

    ``macs`` is one float64 tensor with a row per layer over the product kinds
    (:data:`adaprec.cost.KINDS`); every training call adds the multiply-accumulates of its products to
    its row in place (shapes are known on the host, so this never syncs and
    never recompiles a compiled model). The cost meter reads and clears it once per step.

    Example:
        >>> import torch
        >>> be = SimulatedBackend()
        >>> m = torch.nn.Linear(3, 3)
        >>> be.attach(m, [("", m)])
        ['']
        >>> be.detach(); type(m) is torch.nn.Linear and "_adaprec_site" not in vars(m)
        True
    """

    name = "simulated"

    def __init__(self) -> None:
        self.sites: dict[str, LayerSite] = {}
        self.macs: Tensor | None = None
        self._attached: list[Attachment] = []
        self._holds_fastpath = False

    def _forward_for(self, module: nn.Module, site: LayerSite) -> Callable[..., Any] | None:
        """A class-level forward for this layer's dynamic subclass (``None``: the layer's own); a
        backend that computes some layers itself sets ``site.backend`` here.

        Here: the layer table's own quantizing forward (LSTM/GRU/RNN, :mod:`adaprec.quant.rnn`), whose
        calls quantize by themselves (``site.native``)."""
        fwd = site.kind.own_forward(module)
        if fwd is not None:
            site.native = [True, True]
        return fwd

    def attach(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
        taken = [n for n, m in layers if is_attached(m)]
        if taken:
            raise RuntimeError(f"layers {taken} are already quantized by another active adaprec "
                               "Controller; leave that one first")
        device = next(model.parameters()).device
        self.macs = torch.zeros(len(layers), len(KINDS), dtype=torch.float64, device=device)
        try:
            for i, (name, module) in enumerate(layers):
                kind = layer_kind(module)
                if kind is None:
                    raise TypeError(f"{type(module).__name__} ({name!r}) is not a quantizable layer type; "
                                    "adaprec.register_layer adds types")
                site = LayerSite(name, module, self.macs[i], kind=kind)
                self.sites[name] = site
                self._attached.append(attach(module, site, self._forward_for(module, site)))
            if any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()):
                _fastpath_off()
                self._holds_fastpath = True
        except BaseException:
            self.detach()
            raise
        return list(self.sites)

    def apply(self, train: dict[str, Precision], eval: dict[str, Precision] | None = None) -> None:
        for name, prec in train.items():
            self.sites[name].set(prec, None if eval is None else eval.get(name))

    def set_rng(self, key: int) -> None:
        """Point every site's stochastic rounding at the generator ``key`` (the controller's own)."""
        for site in self.sites.values():
            site.set_rng(key)

    def end_iteration(self) -> None:
        """An iteration completed (called after the cost meter read the counters): its forwards will not
        be recomputed any more."""
        for site in self.sites.values():
            site.end_iteration()

    def detach(self) -> None:
        for att in reversed(self._attached):
            att.remove()
        self._attached.clear()
        self.sites.clear()
        if self._holds_fastpath:
            self._holds_fastpath = False
            _fastpath_release()

    def state_dict(self) -> dict:
        return {n: s.state() for n, s in self.sites.items()}

    def load_state_dict(self, d: dict) -> None:
        for n, st in d.items():
            if n in self.sites:
                self.sites[n].load_state(st)


# In eval mode without autograd, nn.TransformerEncoderLayer runs a fused C++ "fast path" that reads its
# weights directly and never calls the Linear/MultiheadAttention forwards, so quantization would be
# skipped silently. The switch is global: keep it off while any backend on such a model is attached
# and put the user's setting back when the last one detaches.
_FASTPATH = {"holders": 0, "saved": True}


def _fastpath_off() -> None:
    if _FASTPATH["holders"] == 0:
        _FASTPATH["saved"] = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
    _FASTPATH["holders"] += 1


def _fastpath_release() -> None:
    _FASTPATH["holders"] -= 1
    if _FASTPATH["holders"] == 0:
        torch.backends.mha.set_fastpath_enabled(_FASTPATH["saved"])
