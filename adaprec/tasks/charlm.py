"""Character-level language modelling on the English text bundled with CPython (``pydoc_data.topics``).

The text (about 465k characters of Python reference documentation) is part of every CPython install,
so the task needs no download. Training draws random ``(B, T)`` windows; evaluation scores every
character of a contiguous held-out tail, reporting loss in nats, bits per character and perplexity.

Example:
    >>> from adaprec.tasks.charlm import CharLMTask
    >>> task = CharLMTask(max_chars=20_000, seq_len=32, batches_per_epoch=5)
    >>> x, y = next(iter(task.train_batches(batch_size=4, seed=0)))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 32]), True)
    >>> sorted(task.evaluate(task.build_model(seed=0)))
    ['bpc', 'perplexity', 'val_loss']
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Batch, Task, TensorBatches, _check_positive_int, _check_seed, evaluate_batches, seeded

__all__ = ["CharLSTM", "CharLMTask", "RandomWindows", "Vocab", "load_text"]


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
        raise ImportError("the charlm task needs the standard-library module pydoc_data.topics, which this "
                          "Python installation lacks") from e
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


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> Linear over the vocabulary; ``forward(ids (B, T)) -> logits (B, T, V)``.

    Example:
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


class CharLMTask(Task):
    """Next-character prediction with :class:`CharLSTM`; metrics ``val_loss`` (nats), ``bpc``, ``perplexity``.

    Args:
        max_chars: use only the first ``max_chars`` characters of the text (None: all of it), to keep
            tests and benchmarks fast.
        val_fraction: the last share of the (possibly truncated) text held out for validation.
        seq_len: characters per training window (T).
        batches_per_epoch: how many batches make one epoch.
        max_eval_chars: score at most this many validation characters (None: all), for fast evaluation.
        embed_dim, hidden_size, num_layers, dropout: the model's shape.

    Example:
        >>> task = CharLMTask(max_chars=10_000, seq_len=16)
        >>> len(task.train_data) + len(task.val_data) == 10_000, task.vocab.decode(task.val_data[:3]) != ""
        (True, True)
    """

    name: ClassVar[str] = "charlm"
    primary_metric: ClassVar[str] = "bpc"
    direction: ClassVar[str] = "minimize"
    observe_key: ClassVar[str] = "val_loss"
    # threads: the CLI's default; a model this small runs fastest on one CPU thread.
    defaults: ClassVar[dict[str, Any]] = {"epochs": 10, "batch_size": 32, "lr": 0.003, "optimizer": "adam",
                                          "threads": 1}

    def __init__(self, max_chars: int | None = None, val_fraction: float = 0.1, seq_len: int = 64,
                 batches_per_epoch: int = 100, max_eval_chars: int | None = None, embed_dim: int = 32,
                 hidden_size: int = 128, num_layers: int = 1, dropout: float = 0.0,
                 eval_batch_size: int = 64) -> None:
        text = load_text()
        if max_chars is not None:
            text = text[:_check_positive_int("max_chars", max_chars)]
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        self.seq_len = _check_positive_int("seq_len", seq_len)
        self.batches_per_epoch = _check_positive_int("batches_per_epoch", batches_per_epoch)
        self.eval_batch_size = _check_positive_int("eval_batch_size", eval_batch_size)
        if max_eval_chars is not None:
            _check_positive_int("max_eval_chars", max_eval_chars)
        self.model_kwargs = {"embed_dim": embed_dim, "hidden_size": hidden_size, "num_layers": num_layers,
                             "dropout": dropout}
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

    def build_model(self, seed: int = 0) -> nn.Module:
        with seeded(seed):
            return CharLSTM(len(self.vocab), **self.model_kwargs)

    def train_batches(self, batch_size: int, seed: int = 0) -> RandomWindows:
        return RandomWindows(self.train_data, batch_size, self.seq_len, self.batches_per_epoch, seed)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        batches = TensorBatches(self._val_windows, self.eval_batch_size, shuffle=False)
        loss_sum, _, n = evaluate_batches(model, batches, _loss_sum)
        val_loss = loss_sum / n
        # exp() overflows a float beyond ~709 nats; such a model is diverged, report infinity.
        perplexity = math.exp(val_loss) if val_loss < 700 else math.inf
        return {"val_loss": val_loss, "bpc": val_loss / math.log(2), "perplexity": perplexity}


def _loss_sum(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    x, y = batch
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
    return loss, torch.zeros((), device=loss.device)
