"""Cost of quantizing a recurrence for real: the char-LSTM's training step with adaprec's quantized
LSTM (every product at the decided widths, docs/methods.md#recurrent-layers) against adaprec 0.1's
path (hooks around torch's fused kernel: only the input sequence, the weights and the error at the
output sequence quantized; the hidden-to-hidden products ran in FP32 while being billed at 8 bits).

One Adam step (forward, backward, update) of :class:`adaprec.tasks.charlm.CharLSTM` on random character
ids, static 8/8 (CPT's SBM formats: stochastic 8-bit errors), batch 32, for the task's shapes (hidden
128, sequence 64) and a smaller one (hidden 96, sequence 32). All configurations live in one process
and are timed in alternating order, round after round; the figure is the median process CPU time per
step (single thread) and the ratio of the quantized recurrence to the 0.1 path.

Target (issue 13): not more than about 2-3x the 0.1 path per step.

Usage::

    python benchmarks/rnn_speed.py                # writes results/rnn_speed.{json,md}
    python benchmarks/rnn_speed.py --rounds 5 --no-write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from common import command_line, median, write_results  # noqa: E402

import adaprec  # noqa: E402
from adaprec.policies import Fixed  # noqa: E402
from adaprec.quant.simulated import SimulatedBackend  # noqa: E402
from adaprec.tasks.charlm import CharLSTM  # noqa: E402

VOCAB, BATCH = 96, 32
SHAPES = [(128, 64), (96, 32)]  # (hidden, sequence length); the first is the charlm task's default


class HooksOnlyBackend(SimulatedBackend):
    """adaprec 0.1's recurrent layers: hooks around the layer's own (torch's) forward."""

    def _forward_for(self, module, site):
        return None


def _setup(hidden: int, backend):
    torch.manual_seed(0)
    model = CharLSTM(VOCAB, embed_dim=32, hidden_size=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ctl = None
    if backend is not None:
        ctl = adaprec.Controller(model, policy=Fixed(8, 8), optimizer=opt, backend=backend(),
                                 classifier_floor=False)
        ctl.start()
    return model, opt, ctl


def _step(model, opt, ids, target) -> None:
    logits = model(ids)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    configs = {"fp32 (no controller)": None, "0.1 path (hooks around torch's kernel)": HooksOnlyBackend,
               "quantized recurrence": SimulatedBackend}
    rows = []
    for hidden, seq in SHAPES:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, VOCAB, (BATCH, seq), generator=g)
        target = torch.randint(0, VOCAB, (BATCH, seq), generator=g)
        runs = {name: _setup(hidden, b) for name, b in configs.items()}
        times: dict[str, list[float]] = {name: [] for name in configs}
        for model, opt, _ in runs.values():  # warm-up
            for _ in range(3):
                _step(model, opt, ids, target)
        for _ in range(args.rounds):
            for name, (model, opt, _) in runs.items():
                t = time.process_time()
                _step(model, opt, ids, target)
                times[name].append(time.process_time() - t)
        for _, _, ctl in runs.values():
            if ctl is not None:
                ctl.close()
        med = {name: median(v) * 1e3 for name, v in times.items()}
        old, new = med["0.1 path (hooks around torch's kernel)"], med["quantized recurrence"]
        rows.append({"hidden": hidden, "seq_len": seq, "batch": BATCH, "ms": med, "ratio": new / old,
                     "ratio_vs_fp32": new / med["fp32 (no controller)"]})
        print(f"hidden {hidden} seq {seq}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
              + f"; quantized / 0.1 path = {new / old:.2f}x")
    if not args.no_write:
        names = list(configs)
        head = " | ".join(f"{n} (ms/step)" for n in names)
        table = [f"| hidden | seq | {head} | quantized / 0.1 path |",
                 "|---|---|" + "---|" * len(names) + "---|"]
        for r in rows:
            cells = " | ".join(f"{r['ms'][n]:.1f}" for n in names)
            table.append(f"| {r['hidden']} | {r['seq_len']} | {cells} | {r['ratio']:.2f}x |")
        note = ("\n\nMedian process CPU time of one Adam step (1 thread), alternating configurations, "
                f"{args.rounds} rounds; static 8/8 with stochastic 8-bit errors, batch {BATCH}.")
        write_results("rnn_speed", {"rows": rows, "rounds": args.rounds, "target_ratio": 3.0},
                      "\n".join(table) + note, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
