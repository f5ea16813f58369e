"""Adaprec in a Hugging Face ``Trainer``: one ``TrainerCallback``, the model and the Trainer unchanged.

``AdaprecCallback(policy, **controller_options)`` runs an :class:`adaprec.Controller` over
``trainer.train()``:

* **Layers.** Every quantizable layer of the model: ``nn.Linear`` (``lm_head`` included) and the
  ``Conv1D`` layers of GPT-2-style models (registered with adaprec once ``transformers`` is imported).
* **Counters.** The controller's iterations are the Trainer's optimizer steps (``state.global_step``),
  its epochs the Trainer's epochs. The Trainer's optimizer (wrapped by Accelerate) and, with fp16 AMP,
  its ``GradScaler`` go to the controller, so steps the scaler skips still count.
* **Checkpoints.** At every checkpoint the controller's state is saved beside the Trainer's files, as
  ``<output_dir>/checkpoint-<step>/adaprec_state.pt`` (``adaprec_state_<rank>.pt`` per process when
  several train). ``trainer.train(resume_from_checkpoint=...)`` restores it: the run continues with the
  same decisions (on the CPU with fixed seeds, bitwise the same weights as a run that never stopped).
  The checkpoint is found by the step the Trainer resumed at; for a checkpoint elsewhere (copied,
  renamed) give its folder as ``resume_from=``.
* The controller starts in ``on_train_begin`` and closes in ``on_train_end``, restoring the model
  exactly. The Trainer has no hook for a failed run: ``with callback: trainer.train()`` closes the
  controller (and restores the model) when ``train()`` raises; otherwise the next ``train()`` or
  ``callback.close()`` does. ``callback.controller`` is the controller of the last run.

Example:
    >>> import tempfile, torch, transformers
    >>> from adaprec.integrations.transformers import AdaprecCallback
    >>> from adaprec.policies import CPT
    >>> cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    >>> model = transformers.GPT2LMHeadModel(cfg)
    >>> data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (16, 16))]
    >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4,
    ...                                       num_train_epochs=2, save_strategy="no", report_to=[],
    ...                                       use_cpu=True, logging_strategy="no")
    >>> cb = AdaprecCallback(policy=CPT(bits=(4, 8), cycles=1))
    >>> _ = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    ... # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> ctl = cb.controller
    >>> ctl.step_count, ctl.epoch_index
    (8, 2)
    >>> ctl.layer_names  # doctest: +NORMALIZE_WHITESPACE
    ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj', 'transformer.h.0.mlp.c_fc',
     'transformer.h.0.mlp.c_proj', 'lm_head']
"""

from __future__ import annotations

import math
import os
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on what is installed
    raise ImportError('adaprec.integrations.transformers needs Hugging Face transformers: '
                      'pip install "adaprec[hf]"') from None

import torch

from ..controller import Controller
from ._common import check_options, follow_steps

__all__ = ["AdaprecCallback", "STATE_FILE"]

#: The controller's state in a checkpoint folder (one process); ``adaprec_state_<rank>.pt`` for several.
STATE_FILE = "adaprec_state.pt"


def state_file(folder: str | os.PathLike[str], args: Any) -> str:
    """Where the controller's state of this process lives in a checkpoint ``folder`` (the Trainer names
    its RNG files the same way: one file alone, one per process when several train)."""
    world = getattr(args, "world_size", 1) or 1
    name = STATE_FILE if world <= 1 else f"adaprec_state_{args.process_index}.pt"
    return os.path.join(os.fspath(folder), name)


class AdaprecCallback(TrainerCallback):
    """Run an :class:`adaprec.Controller` over ``Trainer.train()`` (see the module docstring).

    Args:
        policy: as for :class:`adaprec.Controller` (a name, a policy object or a recipe).
        total_steps: the planned iterations (CPT needs them); default the Trainer's ``max_steps``.
        resume_from: the checkpoint folder to take the controller's state from when the Trainer resumes;
            default ``<output_dir>/checkpoint-<global_step>``, the one the Trainer itself wrote.
        **controller_options: any other :class:`adaprec.Controller` keyword (``layers=``,
            ``constraints=``, ``logdir=``, ``guard=``, …) except ``optimizer=`` and ``scaler=``, which come
            from the Trainer.

    Example:
        >>> AdaprecCallback(policy="fixed", layers=["!lm_head"]).controller is None   # until train() starts
        True
    """

    def __init__(self, policy: Any = "fp32", *, total_steps: int | None = None,
                 resume_from: str | os.PathLike[str] | None = None, **controller_options: Any) -> None:
        check_options("AdaprecCallback", policy, {**controller_options, "total_steps": total_steps})
        if resume_from is not None and not isinstance(resume_from, str | os.PathLike):
            raise TypeError(f"resume_from must be a checkpoint folder (str or os.PathLike) or None, got "
                            f"{type(resume_from).__name__}")
        self.policy = policy
        self.total_steps = total_steps
        self.resume_from = resume_from
        self.options = controller_options
        #: The controller of the current (or last) run; ``None`` before the first one starts.
        self.controller: Controller | None = None
        self._epoch_open = False
        self._warned = False

    # --- the run ---------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        self.close()  # a previous run that raised left its controller attached
        if model is None or optimizer is None:
            raise RuntimeError("AdaprecCallback: the Trainer passed no model or optimizer to on_train_begin")
        saved = None
        if state.global_step > 0:  # resuming: the Trainer restored its state from a checkpoint
            folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = state_file(folder, args)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"AdaprecCallback: the Trainer resumes at step {state.global_step}, but {path} (the "
                    "controller's state saved with that checkpoint) does not exist; pass the checkpoint "
                    "folder as AdaprecCallback(resume_from=...)")
            saved = torch.load(path, weights_only=True)  # adaprec's state types are allow-listed
        total = self.total_steps or (state.max_steps if state.max_steps and state.max_steps > 0 else None)
        ctl = Controller(model, self.policy, optimizer=optimizer, total_steps=total,
                         scaler=getattr(optimizer, "scaler", None),  # Accelerate's GradScaler (fp16 AMP)
                         **self.options)
        if saved is not None:
            ctl.load_state_dict(saved)  # checked now, applied by start()
        self.controller = ctl
        self._epoch_open = False
        self._warned = False
        ctl.start(step=state.global_step, epoch=_epoch(state))
        if ctl.step_count != state.global_step:  # the Trainer's count is the truth
            ctl.step_count = state.global_step

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.controller.begin_epoch(epoch=_epoch(state))
        self._epoch_open = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        ctl = self.controller
        self._warned = follow_steps("AdaprecCallback", ctl, state.global_step, self._warned)
        # The epoch's last step: end it now, so that a checkpoint saved at this step holds the ended epoch.
        if self._epoch_open and state.epoch is not None and state.epoch == math.floor(state.epoch) \
                and int(state.epoch) > ctl.epoch_index:
            self._end_epoch()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._epoch_open:  # stopped early (max_steps inside an epoch)
            self._end_epoch()

    def _end_epoch(self) -> None:
        self._epoch_open = False
        self.controller.end_epoch()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.controller is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.controller.state_dict(), state_file(folder, args))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    # --- failures ----------------------------------------------------------------------------------
    def close(self, exc: BaseException | None = None) -> None:
        """Close the controller (restoring the model exactly); closing twice does nothing."""
        if self.controller is not None:
            self.controller.close(exc)

    def __enter__(self) -> AdaprecCallback:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)


def _epoch(state: Any) -> int:
    """The index of the epoch in progress: the Trainer's ``state.epoch`` is fractional (1.5 = half of
    the second epoch done; 1.0 = the first one done)."""
    return int(math.floor(state.epoch or 0))
