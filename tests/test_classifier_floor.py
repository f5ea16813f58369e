"""The classifier bit-width floor (docs/methods.md#classifier-floor): values, auto-detection, scope, logging,
removal."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import adaprec
from adaprec.constraints import ClassifierFloor, Floor, classifier_bits, find_classifier
from adaprec.formats import FloatFormat, Precision
from adaprec.policies import Fixed


def _cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 32), nn.ReLU(),
                         nn.Linear(32, classes))


def _bits(p: Precision) -> tuple[int, int, int]:
    return p.weight.bits, p.activation.bits, p.gradient.bits


def test_floor_values() -> None:
    assert [classifier_bits(c) for c in (10, 100, 1000)] == [7, 10, 13]
    assert [classifier_bits(c) for c in (2, 3, 16, 17)] == [4, 5, 7, 8]
    assert classifier_bits(10, margin=0) == 5 and classifier_bits(2**40) == 32
    for bad in (1, 0, True, 2.5):
        with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
            classifier_bits(bad)
    with pytest.raises(ValueError, match="margin must be an int >= 0"):
        ClassifierFloor(margin=-1)


@pytest.mark.parametrize("classes,bits", [(10, 7), (100, 10), (1000, 13)])
def test_raises_only_the_classifier_and_logs(classes: int, bits: int, caplog) -> None:
    model = _cnn(classes)
    caplog.set_level(logging.INFO, logger="adaprec")
    with adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=4)) as ctl:
        cur = ctl.current
    assert ctl.classifier_floor.target == "5" and ctl.classifier_floor.bits == bits
    assert _bits(cur["5"]) == (bits, bits, bits)
    assert _bits(cur["0"]) == _bits(cur["3"]) == (4, 4, 4)
    # Rounding modes and per-channel choices of the raised formats are kept.
    assert cur["5"].gradient.rounding == "stochastic" and cur["5"].weight.per_channel
    msgs = [r.getMessage() for r in caplog.records if r.name == "adaprec" and r.levelno == logging.INFO]
    assert any("classifier floor raised layer '5'" in m and f"{bits} bits" in m for m in msgs), msgs


def test_above_the_floor_untouched_and_floats(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="adaprec")
    with adaprec.Controller(_cnn(), policy=Fixed(bits=8, grad_bits=8)) as ctl:
        assert _bits(ctl.current["5"]) == (8, 8, 8)
    assert ctl.classifier_floor.raised == 0
    assert not [r for r in caplog.records if "classifier floor" in r.getMessage()]
    fl = ClassifierFloor("fc", num_classes=1000)  # 13 bits: fp8 moves to bf16, bf16 stays
    out = fl({"fc": Precision.uniform("fp8_e4m3"), "x": Precision.uniform("fp8_e4m3")}, None)
    assert out["fc"].weight == FloatFormat("bf16") and out["x"].weight.name == "fp8_e4m3"
    assert fl({"fc": Precision.uniform("bf16")}, None)["fc"].weight.name == "bf16"


def test_switch_off_configure_and_remove() -> None:
    pol = Fixed(bits=4, grad_bits=4)
    with adaprec.Controller(_cnn(), policy=pol, classifier_floor=False) as ctl:
        assert ctl.classifier_floor is None and _bits(ctl.current["5"]) == (4, 4, 4)
    with adaprec.Controller(_cnn(), policy=pol, classifier_floor=ClassifierFloor(margin=0,
                                                                                 roles=("gradient",))) as ctl:
        assert _bits(ctl.current["5"]) == (4, 4, 5)
    with adaprec.Controller(_cnn(), policy=pol) as ctl:
        assert _bits(ctl.current["5"]) == (7, 7, 7)
        ctl.constraints.remove(ctl.classifier_floor)
        ctl.refresh(force=True)
        assert _bits(ctl.current["5"]) == (4, 4, 4)
    # User constraints come after the floor and have the last word.
    with adaprec.Controller(_cnn(), policy=pol, constraints=[Floor("last", 9)]) as ctl:
        assert _bits(ctl.current["5"]) == (9, 9, 9)
    with pytest.raises(TypeError, match="classifier_floor must be True, False or"):
        adaprec.Controller(_cnn(), policy=pol, classifier_floor="on")


def test_auto_detection_rule() -> None:
    m = _cnn()
    assert find_classifier(m, ["0", "3", "5"]) == "5"
    assert find_classifier(m, ["0", "3"]) is None  # head left in FP32: never a hidden layer instead
    assert find_classifier(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1)), ["0", "1"]) is None  # 1 output
    assert find_classifier(nn.Sequential(nn.Linear(4, 8), nn.Conv1d(8, 10, 1)), ["0", "1"]) is None

    class LM(nn.Module):  # a language model's decoder is a classifier over the vocabulary
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.rnn, self.head = nn.Embedding(100, 8), nn.LSTM(8, 16), nn.Linear(16, 100)

    assert find_classifier(LM(), ["rnn", "head"]) == "head"
    attn = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2))  # its out_proj is not a head
    assert find_classifier(attn, ["0", "1"]) is None
    pol = Fixed(bits=4, grad_bits=4)
    with adaprec.Controller(_cnn(), policy=pol, layers=["!5"]) as ctl:
        assert ctl.classifier_floor.target is None and _bits(ctl.current["3"]) == (4, 4, 4)


def test_named_layer_and_bad_names() -> None:
    pol = Fixed(bits=4, grad_bits=4)
    with adaprec.Controller(_cnn(), policy=pol, classifier_floor=ClassifierFloor("3")) as ctl:
        assert _bits(ctl.current["3"]) == (8, 8, 8) and _bits(ctl.current["5"]) == (4, 4, 4)  # C=32
    with pytest.raises(ValueError, match="not a quantized layer"):
        with adaprec.Controller(_cnn(), policy=pol, classifier_floor=ClassifierFloor("fc")):
            pass
    with pytest.raises(ValueError, match="pass num_classes="):
        with adaprec.Controller(_cnn(), policy=pol, classifier_floor=ClassifierFloor("0")):
            pass
    with adaprec.Controller(_cnn(), policy=pol,
                            classifier_floor=ClassifierFloor("0", num_classes=100)) as ctl:
        assert _bits(ctl.current["0"]) == (10, 10, 10)
    with pytest.raises(ValueError, match="name the layer and num_classes"):
        ClassifierFloor()({"a": Precision.cpt(4, 4)}, None)
    with pytest.raises(TypeError, match="layer must be a layer name"):
        ClassifierFloor(layer=3)  # type: ignore[arg-type]


def test_repeated_raises_log_once_at_info(caplog) -> None:
    floor = ClassifierFloor("fc", num_classes=10)
    caplog.set_level(logging.DEBUG, logger="adaprec")
    layers = {"fc": Precision.cpt(3, 8)}
    for _ in range(3):
        assert _bits(floor(layers, None)["fc"]) == (7, 7, 8)
    levels = [r.levelno for r in caplog.records if "classifier floor" in r.getMessage()]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG] and floor.raised == 3


def test_floor_keeps_4bit_classifier_errors_alive() -> None:
    """Why the floor exists: at 4 bits (round to nearest) the classifier's non-target errors ~1/C vanish."""
    from adaprec.formats import IntFormat

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 100))
    x = torch.randn(64, 16)
    y = torch.randint(0, 100, (64,))
    grads = {}
    for floor in (False, True):
        pol = Fixed(bits="fp32", grad_bits=IntFormat(4, rounding="nearest"))
        with adaprec.Controller(model, policy=pol, classifier_floor=floor):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            grads[floor] = model[0].weight.grad.clone()
    w = model[0].weight.detach().clone().requires_grad_()
    nn.functional.cross_entropy(x @ w.T + model[0].bias.detach(), y).backward()
    ref = w.grad
    err = {k: float((g - ref).norm() / ref.norm()) for k, g in grads.items()}
    assert err[True] < 0.1 < err[False], err
