"""Adaprec inside other libraries' training loops: one module per library, imported only when used.

* :mod:`adaprec.integrations.lightning` — ``AdaprecCallback`` for PyTorch Lightning's ``Trainer``
  (``pip install "adaprec[lightning]"``).
* :mod:`adaprec.integrations.transformers` — ``AdaprecCallback`` for Hugging Face's ``Trainer``
  (``pip install "adaprec[hf]"``).
* :mod:`adaprec.integrations.dcp` — the controller's state inside a ``torch.distributed.checkpoint``
  checkpoint (FSDP2, torchrun).

Each callback only drives the controller's public lifecycle (:meth:`adaprec.Controller.start`,
:meth:`~adaprec.Controller.begin_epoch`, :meth:`~adaprec.Controller.end_epoch`,
:meth:`~adaprec.Controller.close`, ``state_dict``/``load_state_dict``): whatever they do, a loop of your
own can do too. Importing this package imports none of those libraries.

Example:
    >>> from adaprec.integrations import dcp          # needs torch only; .lightning needs Lightning
    >>> dcp.ControllerState.__name__
    'ControllerState'
"""
