"""The ``gptlm`` task: a GPT-style character LM whose every projection is a quantized Linear."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

import adaprec
from adaprec.cli import main
from adaprec.tasks import GPT, CharLMTask, GPTLMTask, get_task, train
from adaprec.tasks.gptlm import PRESETS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny() -> GPTLMTask:
    return GPTLMTask(max_chars=30_000, seq_len=32, d_model=32, n_layers=2, n_heads=2, batches_per_epoch=10)


def test_attention_is_causal_and_shapes_follow_the_config():
    torch.manual_seed(0)
    m = GPT(vocab_size=17, d_model=24, n_layers=2, n_heads=3, seq_len=10).eval()
    ids = torch.randint(0, 17, (2, 10))
    out = m(ids)
    assert out.shape == (2, 10, 17)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 17
    out2 = m(changed)
    # Positions before the changed token cannot see it; the changed position and later ones do.
    assert torch.equal(out[:, :6], out2[:, :6])
    assert not torch.allclose(out[:, 6:], out2[:, 6:])
    assert m(ids[:, :4]).shape == (2, 4, 17)  # shorter contexts work
    with pytest.raises(ValueError, match="longer than the model's seq_len=10"):
        m(torch.zeros(1, 11, dtype=torch.long))


def test_shares_the_charlm_data_and_metrics(tiny):
    lm = CharLMTask(max_chars=30_000, seq_len=32, batches_per_epoch=10)
    assert tiny.vocab == lm.vocab
    assert torch.equal(tiny.train_data, lm.train_data) and torch.equal(tiny.val_data, lm.val_data)
    a = list(tiny.train_batches(4, seed=1))
    b = list(lm.train_batches(4, seed=1))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    m = tiny.evaluate(tiny.build_model(seed=0))
    assert set(m) == {"val_loss", "bpc", "perplexity", "accuracy"}
    assert m["val_loss"] == pytest.approx(math.log(len(tiny.vocab)), rel=0.05)  # untrained: ~uniform
    assert m["bpc"] == pytest.approx(m["val_loss"] / math.log(2))
    assert 0.0 <= m["accuracy"] <= 1.0
    assert get_task("gptlm", max_chars=30_000).name == "gptlm"


def test_every_projection_and_the_head_are_quantized_and_billed(tiny):
    model = tiny.build_model(seed=0)
    batch = next(iter(tiny.train_batches(4, seed=0)))
    with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits=6, grad_bits=8)) as ctl:
        names = set(ctl.layer_names)
        loss = tiny.loss(model, batch)
        loss.backward()
        ctl.step()
        rep = ctl.report()
    per_block = {"qkv", "proj", "up", "down"}
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in per_block} | {"head"}
    # The MACs of one step: B*T tokens through every Linear (d -> 3d, d -> d, d -> 4d, 4d -> d, d -> V).
    d, v, tokens = 32, len(tiny.vocab), 4 * 32
    macs = tokens * (2 * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + d * v)
    assert rep["gbitops_fp32"] * 1e9 == pytest.approx(macs * 3 * 32 * 32)
    # Classifier floor: a ~90-character vocabulary keeps the head at ceil(log2 V) + 3 bits.
    head = ctl.history[0].layers["head"]
    assert head.weight.bits == math.ceil(math.log2(v)) + 3
    assert ctl.history[0].layers["blocks.0.qkv"].weight.bits == 6


def test_training_under_cpt_lowers_bits_per_character(tiny):
    res = train(tiny, adaprec.policies.CPT(bits=(4, 8), cycles=2), epochs=2, seed=0)
    bpc = [m["bpc"] for m in res.epoch_metrics]
    untrained = math.log2(len(tiny.vocab))
    assert bpc[-1] < untrained - 1.0, bpc
    assert res.steps == 20 and res.report["savings_vs_reference"] > 0


def test_presets_and_overrides():
    task = GPTLMTask(max_chars=20_000, preset="speed", n_layers=1, seq_len=64)
    assert task.model_kwargs == {"d_model": 512, "n_layers": 1, "n_heads": 8, "seq_len": 64, "dropout": 0.0}
    assert task.defaults["batch_size"] == 16 and GPTLMTask.defaults["batch_size"] == 32
    assert GPTLMTask(max_chars=20_000).model_kwargs["d_model"] == PRESETS["tiny"]["d_model"]
    # The memory benchmark's size has >= 50 M parameters: 12 d^2 per block plus embeddings and head.
    cfg = PRESETS["memory"]
    d, layers = cfg["d_model"], cfg["n_layers"]
    assert layers * 12 * d * d >= 50_000_000


@pytest.mark.parametrize("kw, match", [
    ({"preset": "huge"}, "unknown preset 'huge'.*tiny, speed, memory"),
    ({"d_model": 30, "n_heads": 4}, r"d_model \(30\) must be a multiple of n_heads \(4\)"),
    ({"n_layers": 0}, "n_layers must be a positive int"),
    ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\)"),
    ({"seq_len": 20_000, "max_chars": 20_000}, "fewer than seq_len"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTLMTask(**{"max_chars": 20_000, **kw})


def test_cli_train_prt_and_tune_take_the_task(tmp_path, capsys):
    assert main(["train", "--task", "gptlm", "--epochs", "1", "--param", "cycles=4", "--no-logs",
                 "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "task gptlm" in out and "bpc" in out and "savings vs static" in out
    assert main(["prt", "--task", "gptlm", "--start-bits", "2", "--max-bits", "3", "--steps-per-bits", "3",
                 "--window", "1"]) == 0
    assert "watching training loss" in capsys.readouterr().out
    from adaprec import tune

    sub = argparse.ArgumentParser(prog="adaprec").add_subparsers(dest="command")
    args = tune.add_tune_parser(sub).parse_args(
        ["--policy", "cpt", "--task", "gptlm", "--trials", "2", "--storage", f"sqlite:///{tmp_path / 's.db'}",
         "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    assert args.func(args) == 0
    assert "gptlm" in capsys.readouterr().out
