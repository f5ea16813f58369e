"""Character-level text shared by the language-model tasks (``charlm``, ``gptlm``).

The text is the English of ``pydoc_data.topics`` (about 465k characters of Python reference
documentation), part of every CPython install, so no task needs a download. This module holds
everything about the data that the LM tasks share: the text, its vocabulary, random training windows,
the contiguous held-out tail, and :class:`CharTextTask`, the task base class that trains on windows
and evaluates loss, bits per character, perplexity and next-character accuracy. A concrete task only
adds its model (``build_model``).

Example:
    >>> v = Vocab.from_text("abc")
    >>> x, y = next(iter(RandomWindows(v.encode("abcabcabc"), batch_size=2, seq_len=3, batches=1)))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Batch, Task, TensorBatches, _check_positive_int, _check_seed, evaluate_batches

__all__ = ["CharTextTask", "RandomWindows", "Vocab", "load_text"]


@lru_cache(maxsize=1)
def load_text() -> str:
    """The English text of ``pydoc_data.topics``: every topic's body, joined in the module's order.

    Example:
        >>> len(load_text()) > 100_000
        True
    """
    try:
        from pydoc_data import topics
    except ImportError as e:  # some distributions strip it out of minimal Python installs
        raise ImportError("the language-model tasks need the standard-library module pydoc_data.topics, "
                          "which this Python installation lacks") from e
    return "".join(topics.topics.values())


@dataclass(frozen=True)
class Vocab:
    """The characters of a text, sorted, with their integer ids.

    Example:
        >>> v = Vocab.from_text("hello")
        >>> v.chars, v.encode("hole").tolist(), v.decode(v.encode("hole"))
        (('e', 'h', 'l', 'o'), [1, 3, 2, 0], 'hole')
    """

    chars: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("a Vocab needs at least one character")
        if len(set(self.chars)) != len(self.chars) or any(len(c) != 1 for c in self.chars):
            raise ValueError("Vocab.chars must be distinct single characters")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        index = self._index  # type: ignore[attr-defined]
        try:
            return torch.tensor([index[c] for c in text], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary of {len(self)} "
                             "characters") from None

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if any(not 0 <= i < len(self.chars) for i in ids):
            raise ValueError(f"ids must lie in [0, {len(self.chars)}), got {min(ids)}..{max(ids)}")
        return "".join(self.chars[i] for i in ids)


class RandomWindows:
    """``batches`` batches of ``(x, y)`` windows per pass, ``y`` being ``x`` shifted by one character.

    Window starts are drawn uniformly from a private generator seeded once, so each pass (epoch) sees
    new windows and the whole sequence is reproducible. An "epoch" is a fixed number of batches rather
    than a sweep over the text: that keeps epochs short and equal-sized whatever the text length.

    Example:
        >>> data = torch.arange(100)
        >>> x, y = next(iter(RandomWindows(data, batch_size=2, seq_len=5, batches=3, seed=0)))
        >>> bool((y - x == 1).all()), len(RandomWindows(data, 2, 5, 3))
        (True, 3)
    """

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, batches: int, seed: int = 0) -> None:
        self.data = data
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.batches = _check_positive_int("batches", batches)
        _check_seed(seed)
        if data.numel() < seq_len + 1:
            raise ValueError(f"text of {data.numel()} characters is too short for seq_len={seq_len}")
        self.generator = torch.Generator().manual_seed(seed)
        # Offsets 0..T added to each start build all windows of a batch with one gather.
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        high = self.data.numel() - self.seq_len  # last valid start leaves room for the shifted target
        for _ in range(self.batches):
            starts = torch.randint(0, high, (self.batch_size, 1), generator=self.generator)
            windows = self.data[starts + self._offsets]
            yield windows[:, :-1], windows[:, 1:]


class CharTextTask(Task):
    """Next-character prediction on the bundled text; subclasses supply the model (``build_model``).

    Metrics: ``val_loss`` (nats per character), ``bpc`` (bits per character, the primary metric),
    ``perplexity`` and ``accuracy`` (share of held-out characters predicted exactly, top-1).

    Args:
        max_chars: use only the first ``max_chars`` characters of the text (None: all of it), to keep
            tests and benchmarks fast.
        val_fraction: the last share of the (possibly truncated) text held out for validation.
        seq_len: characters per training and evaluation window (T).
        batches_per_epoch: how many batches make one epoch.
        max_eval_chars: score at most this many validation characters (None: all), for fast evaluation.
        eval_batch_size: windows per evaluation batch.

    Example:
        >>> from adaprec.tasks.charlm import CharLMTask
        >>> task = CharLMTask(max_chars=10_000, seq_len=16)
        >>> len(task.train_data) + len(task.val_data) == 10_000, task.vocab.decode(task.val_data[:3]) != ""
        (True, True)
    """

    primary_metric: ClassVar[str] = "bpc"
    direction: ClassVar[str] = "minimize"
    observe_key: ClassVar[str] = "val_loss"

    def __init__(self, max_chars: int | None = None, val_fraction: float = 0.1, seq_len: int = 64,
                 batches_per_epoch: int = 100, max_eval_chars: int | None = None,
                 eval_batch_size: int = 64) -> None:
        text = load_text()
        if max_chars is not None:
            text = text[:_check_positive_int("max_chars", max_chars)]
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
                or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.batches_per_epoch = _check_positive_int("batches_per_epoch", batches_per_epoch)
        self.eval_batch_size = _check_positive_int("eval_batch_size", eval_batch_size)
        if max_eval_chars is not None:
            _check_positive_int("max_eval_chars", max_eval_chars)
        # The vocabulary covers the whole (truncated) text, so validation never meets an unknown char.
        self.vocab = Vocab.from_text(text)
        data = self.vocab.encode(text)
        n_val = int(len(data) * val_fraction)
        # Contiguous split (not random windows) so validation text is never seen in training.
        self.train_data, self.val_data = data[:len(data) - n_val], data[len(data) - n_val:]
        if max_eval_chars is not None:
            self.val_data = self.val_data[:max_eval_chars + 1]
        for part, d in (("training", self.train_data), ("validation", self.val_data)):
            if d.numel() < seq_len + 1:
                raise ValueError(f"the {part} text has {d.numel()} characters, fewer than seq_len + 1 = "
                                 f"{seq_len + 1}; raise max_chars (now {max_chars}) or lower seq_len")
        self._val_windows = self._windows(self.val_data)

    def _windows(self, data: Tensor) -> tuple[Tensor, Tensor]:
        # Non-overlapping windows covering the tail; each target character is scored exactly once.
        n = (data.numel() - 1) // self.seq_len
        x = data[:n * self.seq_len].view(n, self.seq_len)
        y = data[1:n * self.seq_len + 1].view(n, self.seq_len)
        return x, y

    def train_batches(self, batch_size: int, seed: int = 0) -> RandomWindows:
        return RandomWindows(self.train_data, batch_size, self.seq_len, self.batches_per_epoch, seed)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        batches = TensorBatches(self._val_windows, self.eval_batch_size, shuffle=False)
        loss_sum, correct, n = evaluate_batches(model, batches, _loss_sum_and_correct)
        val_loss = loss_sum / n
        # exp() overflows a float beyond ~709 nats; such a model is diverged, report infinity.
        perplexity = math.exp(val_loss) if val_loss < 700 else math.inf
        return {"val_loss": val_loss, "bpc": val_loss / math.log(2), "perplexity": perplexity,
                "accuracy": correct / n}


def _loss_sum_and_correct(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    x, y = batch
    logits = model(x)
    logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()
