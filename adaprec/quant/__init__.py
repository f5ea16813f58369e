"""Quantization backends: the simulated one (fake quantization in PyTorch) and its building blocks."""

from .layers import (
    QUANTIZABLE,
    LayerKind,
    find_layers,
    layer_kind,
    quantizable_types,
    register_layer,
    unregister_layer,
)
from .simulated import SimulatedBackend

__all__ = ["QUANTIZABLE", "SimulatedBackend", "find_layers", "make_backend", "register_layer",
           "unregister_layer", "layer_kind", "quantizable_types", "LayerKind"]


def make_backend(spec: object) -> SimulatedBackend:
    """A backend from a name (``"simulated"``, ``"hardware"``)
    or an object with ``attach``/``apply``/``detach``."""
    if isinstance(spec, str):
        if spec == "simulated":
            return SimulatedBackend()
        if spec == "hardware":
            from .hardware import HardwareBackend  # real low-precision kernels where they exist

            return HardwareBackend()
        raise ValueError(f"unknown backend {spec!r}; known: ['hardware', 'simulated']")
    if all(hasattr(spec, a) for a in ("attach", "apply", "detach")):
        return spec  # type: ignore[return-value]
    raise TypeError(f"backend must be a name or a backend object, got {type(spec).__name__}")
