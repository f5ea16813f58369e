"""Adaprec in a PyTorch Lightning ``Trainer``: one callback, no change to the ``LightningModule``.

``AdaprecCallback(policy, **controller_options)`` runs an :class:`adaprec.Controller` over the fit:

* **Counters.** The controller's iterations are the trainer's optimizer steps (``trainer.global_step``,
  skipped steps included, as Lightning counts them) and its epochs ``trainer.current_epoch``. An epoch
  ends after the step of its last batch (before checkpoints saved at that step or at the epoch's end),
  or at ``on_train_epoch_end`` if the loop stopped early.
* **Checkpoints.** The controller's state travels in Lightning's checkpoints (the callback's
  ``state_dict``); ``trainer.fit(model, ckpt_path=...)`` restores it. From a checkpoint saved at an
  epoch's end the run continues with the same decisions (on the CPU with fixed seeds, bitwise the same
  weights as a run that was never stopped).
* **Mixed precision.** ``precision="bf16-mixed"`` runs under autocast (adaprec quantizes in float32 and
  casts back); with ``"16-mixed"`` the precision plugin's ``GradScaler`` is given to the controller, so
  iterations whose update the scaler skips still count.
* **Logging.** Every ``log_every_n_steps`` steps (default: the trainer's) and at each epoch end, the mean
  weight, activation and gradient bits over the quantized layers, the GBitOPs so far and the savings
  against FP32 and the static reference go to ``trainer.loggers`` as ``adaprec/<name>``.
* **Loss.** The loss ``training_step`` returns is passed to ``ctl.observe(loss=...)`` (for loss-driven
  policies and the TensorBoard logger of ``logdir=``); ``observe_loss=False`` turns this off.

The controller starts in ``on_train_start`` (after Lightning restored the checkpoint, before the first
batch) and closes in ``on_train_end``, or in ``on_exception`` when the fit fails, restoring the model
exactly. The sanity-check validation before it runs in FP32, as does ``trainer.validate``/``test``
outside ``fit``. ``callback.controller`` is the controller of the last fit (``.report()``, ``.history``).
One optimizer per run: adaprec counts that optimizer's steps.

Example:
    >>> import torch, lightning.pytorch as pl
    >>> import torch.nn.functional as F
    >>> from adaprec.integrations.lightning import AdaprecCallback
    >>> from adaprec.policies import CPT
    >>> class Net(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
    ...                                        torch.nn.Linear(16, 3))
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return F.cross_entropy(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    >>> cb = AdaprecCallback(policy=CPT(bits=(3, 8), cycles=2))   # total_steps: the trainer's estimate
    >>> trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    >>> ctl = cb.controller
    >>> ctl.step_count == trainer.global_step == 8, ctl.epoch_index, ctl.layer_names
    (True, 2, ['net.0', 'net.2'])
"""

from __future__ import annotations

import math
from typing import Any

try:  # the unified package; the standalone ``pytorch_lightning`` has the same Callback API
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError:
        raise ImportError("adaprec.integrations.lightning needs PyTorch Lightning: "
                          'pip install "adaprec[lightning]"') from None

import torch

from ..controller import Controller
from ._common import check_options, follow_steps, scalars

__all__ = ["AdaprecCallback"]


class AdaprecCallback(Callback):
    """Run an :class:`adaprec.Controller` over a Lightning fit (see the module docstring).

    Args:
        policy: as for :class:`adaprec.Controller` (a name, a policy object or a recipe).
        total_steps: the planned iterations (CPT needs them); default ``trainer.estimated_stepping_batches``.
        log_every_n_steps: how often to write the controller's scalars to ``trainer.loggers``; default the
            trainer's ``log_every_n_steps``. Reading the cost syncs with the device once per write.
        observe_loss: pass the loss returned by ``training_step`` to ``ctl.observe``.
        **controller_options: any other :class:`adaprec.Controller` keyword (``layers=``,
            ``constraints=``, ``logdir=``, ``guard=``, ``backend=``, …) except ``optimizer=`` and ``scaler=``,
            which come from the trainer.

    Example:
        >>> AdaprecCallback(policy="fixed", layers=["net.*"]).controller is None   # until a fit starts
        True
    """

    def __init__(self, policy: Any = "fp32", *, total_steps: int | None = None,
                 log_every_n_steps: int | None = None, observe_loss: bool = True,
                 **controller_options: Any) -> None:
        check_options("AdaprecCallback", policy, {**controller_options, "total_steps": total_steps})
        n = log_every_n_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"log_every_n_steps must be a positive integer or None, got {n!r}")
        if not isinstance(observe_loss, bool):
            raise TypeError(f"observe_loss must be True or False, got {observe_loss!r}")
        self.policy = policy
        self.total_steps = total_steps
        self.log_every_n_steps = log_every_n_steps
        self.observe_loss = observe_loss
        self.options = controller_options
        #: The controller of the current (or last) fit; ``None`` before the first one starts.
        self.controller: Controller | None = None
        self._restored: dict[str, Any] | None = None  # from a checkpoint, until the fit starts
        self._epoch_open = False
        self._batches = 0
        self._logged_step = -1
        self._warned = False

    # --- checkpoints: Lightning restores callbacks before the fit starts -------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:  # restored for a fit that has not started yet
            return {"controller": self._restored}
        return {} if self.controller is None else {"controller": self.controller.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("controller")
        if state is not None and not isinstance(state, dict):
            raise TypeError(f"AdaprecCallback.load_state_dict: the checkpoint's controller state is a "
                            f"{type(state).__name__}, expected the dict of Controller.state_dict()")
        self._restored = state

    # --- the fit ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if len(optimizers) != 1:
            raise ValueError(f"AdaprecCallback needs exactly one optimizer (adaprec counts its steps as the "
                             f"iterations); configure_optimizers gave {len(optimizers)}")
        total = self.total_steps
        if total is None:
            est = trainer.estimated_stepping_batches
            total = int(est) if isinstance(est, int | float) and math.isfinite(est) and est >= 1 else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # "16-mixed": its GradScaler
        ctl = Controller(pl_module, self.policy, optimizer=optimizers[0], total_steps=total, scaler=scaler,
                         **self.options)
        if self._restored is not None:
            ctl.load_state_dict(self._restored)  # checked now, applied by start()
            self._restored = None
        self.controller = ctl
        self._epoch_open = False
        self._logged_step = -1
        self._warned = False
        ctl.start(step=trainer.global_step, epoch=trainer.current_epoch)
        # The trainer's counters are the truth; a state from its checkpoint agrees with them.
        ctl.epoch_index = trainer.current_epoch
        if ctl.step_count != trainer.global_step:
            ctl.step_count = trainer.global_step

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._begin_epoch(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._epoch_open:  # resumed inside an epoch: Lightning does not start it again
            self._begin_epoch(trainer)

    def _begin_epoch(self, trainer: Any) -> None:
        self.controller.begin_epoch(epoch=trainer.current_epoch)
        self._epoch_open = True
        self._batches = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ctl = self.controller
        self._batches = batch_idx + 1  # the epoch's batches so far, as ctl.epoch(loader) counts them
        if self.observe_loss:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                ctl.observe(loss=loss.detach())
        self._warned = follow_steps("AdaprecCallback", ctl, trainer.global_step, self._warned)
        step = trainer.global_step
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50
        if step > 0 and step % every == 0:
            self._log(trainer)
        # End the epoch after its last batch's step, so that a checkpoint saved at the epoch's end
        # (ModelCheckpoint(every_n_train_steps=...) saves in this hook, after us) holds the ended epoch.
        n = trainer.num_training_batches
        if isinstance(n, int) and self._batches >= n:
            self._end_epoch(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._epoch_open:  # stopped early, or a loader without a length
            self._end_epoch(trainer)

    def _end_epoch(self, trainer: Any) -> None:
        self._epoch_open = False
        self.controller.end_epoch(batches=self._batches)
        self._log(trainer)

    def _log(self, trainer: Any) -> None:
        step = trainer.global_step
        loggers = getattr(trainer, "loggers", None)
        if not loggers or step == self._logged_step:
            return
        self._logged_step = step
        metrics = scalars(self.controller)
        for logger in loggers:
            logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.controller is not None:
            self._log(trainer)
            self.controller.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.controller is not None:
            self.controller.close(exception)  # restores the model; a closed controller ignores this

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.controller is not None:  # never left attached to the model (closing twice does nothing)
            self.controller.close()
