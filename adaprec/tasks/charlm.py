"""Character-level language modelling with an LSTM on the English text bundled with CPython.

The data (``pydoc_data.topics``), vocabulary, windows and metrics are shared with the transformer task
(:mod:`adaprec.tasks.gptlm`) through :class:`adaprec.tasks.text.CharTextTask`; this module adds the
model. Training draws random ``(B, T)`` windows; evaluation scores every character of a contiguous
held-out tail, reporting loss in nats, bits per character, perplexity and next-character accuracy.

Example:
    >>> from adaprec.tasks.charlm import CharLMTask
    >>> task = CharLMTask(max_chars=20_000, seq_len=32, batches_per_epoch=5)
    >>> x, y = next(iter(task.train_batches(batch_size=4, seed=0)))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 32]), True)
    >>> sorted(task.evaluate(task.build_model(seed=0)))
    ['accuracy', 'bpc', 'perplexity', 'val_loss']
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from .base import _check_positive_int, seeded
from .text import CharTextTask, RandomWindows, Vocab, load_text

__all__ = ["CharLSTM", "CharLMTask", "RandomWindows", "Vocab", "load_text"]


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> Linear over the vocabulary; ``forward(ids (B, T)) -> logits (B, T, V)``.

    Example:
        >>> import torch
        >>> m = CharLSTM(vocab_size=20, embed_dim=8, hidden_size=16)
        >>> m(torch.zeros(3, 7, dtype=torch.long)).shape
        torch.Size([3, 7, 20])
    """

    def __init__(self, vocab_size: int, embed_dim: int = 32, hidden_size: int = 128, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.embed = nn.Embedding(_check_positive_int("vocab_size", vocab_size),
                                  _check_positive_int("embed_dim", embed_dim))
        self.lstm = nn.LSTM(embed_dim, _check_positive_int("hidden_size", hidden_size),
                            num_layers=_check_positive_int("num_layers", num_layers), batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(self.drop(out))


class CharLMTask(CharTextTask):
    """Next-character prediction with :class:`CharLSTM`; metrics ``val_loss`` (nats), ``bpc``,
    ``perplexity``, ``accuracy`` (next character, top-1).

    Args:
        max_chars, val_fraction, seq_len, batches_per_epoch, max_eval_chars, eval_batch_size: the data
            (see :class:`~adaprec.tasks.text.CharTextTask`).
        embed_dim, hidden_size, num_layers, dropout: the model's shape.

    Example:
        >>> task = CharLMTask(max_chars=10_000, seq_len=16)
        >>> len(task.train_data) + len(task.val_data) == 10_000, task.vocab.decode(task.val_data[:3]) != ""
        (True, True)
    """

    name: ClassVar[str] = "charlm"
    defaults: ClassVar[dict[str, Any]] = {"epochs": 10, "batch_size": 32, "lr": 0.003, "optimizer": "adam"}

    def __init__(self, max_chars: int | None = None, val_fraction: float = 0.1, seq_len: int = 64,
                 batches_per_epoch: int = 100, max_eval_chars: int | None = None, embed_dim: int = 32,
                 hidden_size: int = 128, num_layers: int = 1, dropout: float = 0.0,
                 eval_batch_size: int = 64) -> None:
        super().__init__(max_chars=max_chars, val_fraction=val_fraction, seq_len=seq_len,
                         batches_per_epoch=batches_per_epoch, max_eval_chars=max_eval_chars,
                         eval_batch_size=eval_batch_size)
        self.model_kwargs = {"embed_dim": embed_dim, "hidden_size": hidden_size, "num_layers": num_layers,
                             "dropout": dropout}

    def build_model(self, seed: int = 0) -> nn.Module:
        with seeded(seed):
            return CharLSTM(len(self.vocab), **self.model_kwargs)
