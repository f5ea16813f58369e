"""A GPT-style character language model on the English text bundled with CPython (task ``gptlm``).

Same data, vocabulary, windows and metrics as the LSTM task ``charlm`` (both build on
:class:`adaprec.tasks.text.CharTextTask`); the model is a decoder-only transformer:

* token and learned position embeddings (lookups: no products, so nothing to quantize);
* ``n_layers`` pre-norm blocks, each ``h + proj(attention(qkv(ln1(h))))`` then
  ``h + down(gelu(up(ln2(h))))``, where ``qkv``, ``proj``, ``up`` and ``down`` are plain ``nn.Linear``
  layers, so adaprec quantizes every projection and MLP product; causal attention runs through
  ``F.scaled_dot_product_attention`` (its two activation-by-activation products stay FP32 and are
  not counted as quantized layers);
* a final LayerNorm and an **untied** output head ``nn.Linear(d_model, vocab)``. Untied because the
  head is the classifier: the controller's classifier floor keeps it at ``ceil(log2 V) + 3`` bits while
  the token embedding is a lookup that never goes through a quantized product, and one tensor with two
  such roles would blur both the cost accounting and what a "weight precision" means for it. At
  character level tying would save only ``V * d_model`` parameters (about 6k at the default width).

Initialisation follows GPT-2: normal(0, 0.02) weights, zero biases, and the two residual projections
(``proj``, ``down``) scaled by ``1 / sqrt(2 n_layers)``.

Sizes (``preset=``; explicit arguments override a preset's values):

========== ======= ======== ======= ======= ===== ============== =======================================
preset     d_model n_layers n_heads seq_len batch parameters     use
========== ======= ======== ======= ======= ===== ============== =======================================
``tiny``   64      2        4       64      32    about 0.11 M   default: tests, CLI, accuracy benchmarks
``speed``  512     4        8       128     16    about 12.7 M   step-time benchmarks
``memory`` 768     8        12      256     16    about 56.9 M   memory benchmarks (>= 50 M parameters)
========== ======= ======== ======= ======= ===== ============== =======================================

The batch size of a preset is the task's default ``batch_size`` (``train`` and the CLI use it unless
told otherwise).

Example:
    >>> import torch
    >>> from adaprec.tasks.gptlm import GPT, GPTLMTask
    >>> GPT(vocab_size=10, d_model=16, n_layers=1, n_heads=2, seq_len=8)(
    ...     torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 10])
    >>> task = GPTLMTask(max_chars=20_000, batches_per_epoch=2)
    >>> sorted(task.evaluate(task.build_model(seed=0)))
    ['accuracy', 'bpc', 'perplexity', 'val_loss']
    >>> [n for n in task.build_model().state_dict() if n.startswith("blocks.0.") and n.endswith("weight")]
    ['blocks.0.ln1.weight', 'blocks.0.qkv.weight', 'blocks.0.proj.weight', 'blocks.0.ln2.weight', \
'blocks.0.up.weight', 'blocks.0.down.weight']
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import _check_positive_int, seeded
from .text import CharTextTask

__all__ = ["GPT", "Block", "GPTLMTask", "PRESETS"]

#: Model shapes and the default batch size of each named size (see the module docstring).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "seq_len": 64, "batch_size": 32},
    "speed": {"d_model": 512, "n_layers": 4, "n_heads": 8, "seq_len": 128, "batch_size": 16},
    "memory": {"d_model": 768, "n_layers": 8, "n_heads": 12, "seq_len": 256, "batch_size": 16},
}


def _check_dropout(dropout: Any) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return float(dropout)


class Block(nn.Module):
    """One pre-norm transformer block: causal self-attention then a 4x GELU MLP, each residual.

    Example:
        >>> import torch
        >>> Block(d_model=8, n_heads=2)(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = _check_dropout(dropout)
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return h + self.drop(self.down(F.gelu(self.up(self.ln2(h)))))


class GPT(nn.Module):
    """Decoder-only transformer over token ids; ``forward(ids (B, T)) -> logits (B, T, vocab_size)``.

    ``T`` may not exceed ``seq_len`` (the learned position table's length).

    Example:
        >>> import torch
        >>> m = GPT(vocab_size=20, d_model=32, n_layers=2, n_heads=4, seq_len=16)
        >>> m(torch.zeros(2, 16, dtype=torch.long)).shape, m.num_parameters() > 0
        (torch.Size([2, 16, 20]), True)
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 seq_len: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        vocab_size = _check_positive_int("vocab_size", vocab_size)
        d_model = _check_positive_int("d_model", d_model)
        n_layers = _check_positive_int("n_layers", n_layers)
        n_heads = _check_positive_int("n_heads", n_heads)
        self.seq_len = _check_positive_int("seq_len", seq_len)
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(_check_dropout(dropout))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # GPT-2: keep the residual stream's variance from growing with depth
            for m in (blk.proj, blk.down):
                nn.init.normal_(m.weight, 0.0, 0.02 / math.sqrt(2 * n_layers))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[-1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's seq_len={self.seq_len}")
        h = self.drop(self.tok(ids) + self.pos(torch.arange(t, device=ids.device)))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))


class GPTLMTask(CharTextTask):
    """Next-character prediction with :class:`GPT`; metrics ``val_loss`` (nats), ``bpc`` (primary),
    ``perplexity``, ``accuracy`` (next character, top-1).

    Args:
        preset: ``"tiny"`` (default shapes), ``"speed"`` or ``"memory"`` (see the module docstring);
            explicit ``d_model``, ``n_layers``, ``n_heads``, ``seq_len`` override the preset's values,
            and the preset's batch size becomes the task's default ``batch_size``.
        d_model, n_layers, n_heads, dropout: the model's shape.
        max_chars, val_fraction, seq_len, batches_per_epoch, max_eval_chars, eval_batch_size: the data
            (see :class:`~adaprec.tasks.text.CharTextTask`); ``seq_len`` is also the context length.

    Defaults (``train`` and the CLI): 5 epochs of 50 batches, AdamW at lr 1e-2 with a 10% linear warm-up
    then a cosine decay (``"warmup_cosine"``; without the warm-up the runs' speed of leaving the early
    plateau varies a lot from run to run), no weight decay — about 20 s on one CPU thread at the
    ``tiny`` size.

    Example:
        >>> task = GPTLMTask(max_chars=20_000, preset="speed", n_layers=1)
        >>> kw = task.model_kwargs
        >>> kw["d_model"], kw["n_layers"], task.seq_len, task.defaults["batch_size"]
        (512, 1, 128, 16)
    """

    name: ClassVar[str] = "gptlm"
    defaults: ClassVar[dict[str, Any]] = {"epochs": 5, "batch_size": 32, "lr": 0.01, "optimizer": "adamw",
                                          "lr_schedule": "warmup_cosine"}

    def __init__(self, max_chars: int | None = None, val_fraction: float = 0.1, seq_len: int | None = None,
                 batches_per_epoch: int = 50, max_eval_chars: int | None = None, *,
                 preset: str = "tiny", d_model: int | None = None, n_layers: int | None = None,
                 n_heads: int | None = None, dropout: float = 0.0, eval_batch_size: int = 64) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        shape = dict(PRESETS[preset])
        given = {"d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "seq_len": seq_len}
        shape.update({k: v for k, v in given.items() if v is not None})
        for k in ("d_model", "n_layers", "n_heads", "seq_len"):
            _check_positive_int(k, shape[k])
        if shape["d_model"] % shape["n_heads"]:
            raise ValueError(f"d_model ({shape['d_model']}) must be a multiple of n_heads "
                             f"({shape['n_heads']})")
        _check_dropout(dropout)
        super().__init__(max_chars=max_chars, val_fraction=val_fraction, seq_len=shape["seq_len"],
                         batches_per_epoch=batches_per_epoch, max_eval_chars=max_eval_chars,
                         eval_batch_size=eval_batch_size)
        self.preset = preset
        self.model_kwargs = {"d_model": shape["d_model"], "n_layers": shape["n_layers"],
                             "n_heads": shape["n_heads"], "seq_len": shape["seq_len"], "dropout": dropout}
        if shape["batch_size"] != type(self).defaults["batch_size"]:
            self.defaults = {**type(self).defaults, "batch_size": shape["batch_size"]}

    def build_model(self, seed: int = 0) -> nn.Module:
        with seeded(seed):
            return GPT(len(self.vocab), **self.model_kwargs)
