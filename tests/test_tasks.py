"""Tests of adaprec.tasks: data splits, batchers, models, metrics, registry and the training loop."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from adaprec.tasks import (
    CharLMTask,
    Cifar10Task,
    DigitsTask,
    ImageFolderTask,
    TensorBatches,
    Vocab,
    build_torchvision_model,
    get_task,
    list_tasks,
    register_task,
    resnet20,
    train,
    unregister_task,
)
from adaprec.tasks.charlm import load_text
from adaprec.tasks.cifar import ResNetCifar
from adaprec.tasks.digits import load_digits_split
from adaprec.tasks.run import make_lr_schedule, make_optimizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The test machine is small and shared; several intra-op threads oversubscribe it badly.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask(seed=0)


@pytest.fixture(scope="module")
def small_lm() -> CharLMTask:
    return CharLMTask(max_chars=30_000, seq_len=32, batches_per_epoch=10, embed_dim=16, hidden_size=32)


# --- digits ---------------------------------------------------------------------------------------

def test_digits_split_is_deterministic_stratified_and_scaled():
    a = load_digits_split(seed=0)
    b = load_digits_split(seed=0)
    c = load_digits_split(seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    # Stratified: every class keeps its share (about 20%) of the held-out part, to within one sample.
    total = Counter(y_tr.tolist()) + Counter(y_te.tolist())
    test = Counter(y_te.tolist())
    assert sorted(total) == list(range(10))
    for cls, n in total.items():
        assert abs(test[cls] - 0.2 * n) <= 1, (cls, test[cls], n)


def test_digits_split_rejects_bad_fraction_and_seed():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        load_digits_split(seed=-1)


def test_digits_model_shapes_and_seeded_init(digits):
    m1, m2, m3 = digits.build_model(0), digits.build_model(0), digits.build_model(1)
    assert m1(digits.x_test[:7]).shape == (7, 10)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert not torch.equal(m1.conv1.weight, m3.conv1.weight)
    assert 2_000 < sum(p.numel() for p in m1.parameters()) < 10_000


def test_tensor_batches_cover_every_sample_each_epoch_in_a_new_order():
    xs, ys = torch.randn(10, 3), torch.arange(10)
    batches = TensorBatches((xs, ys), batch_size=3, seed=5)
    assert len(batches) == 4
    e1 = torch.cat([b[1] for b in batches])
    e2 = torch.cat([b[1] for b in batches])
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(10))
    assert not torch.equal(e1, e2)
    again = TensorBatches((xs, ys), batch_size=3, seed=5)
    assert torch.equal(torch.cat([b[1] for b in again]), e1)
    for x, y in TensorBatches((xs, ys), batch_size=3, seed=0):
        assert torch.equal(x, xs[y])  # inputs stay paired with their targets
    assert len(TensorBatches((xs, ys), batch_size=3, drop_last=True)) == 3
    with pytest.raises(ValueError, match="same first dimension"):
        TensorBatches((xs, ys[:5]), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches((xs, ys), batch_size=0)


def test_fp32_digits_cnn_learns(digits):
    torch.manual_seed(0)
    model = digits.build_model(0)
    before = digits.evaluate(model)["accuracy"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = digits.train_batches(32, seed=0)
    for _ in range(2):
        for batch in batches:
            loss = digits.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    metrics = digits.evaluate(model)
    assert before < 0.3
    assert metrics["accuracy"] > 0.8, metrics  # chance is 0.1
    assert model.training  # evaluate() restores the mode it found


# --- charlm ---------------------------------------------------------------------------------------

def test_charlm_vocab_round_trip_and_split(small_lm):
    text = load_text()[:30_000]
    assert small_lm.vocab.chars == tuple(sorted(set(text)))
    full = torch.cat([small_lm.train_data, small_lm.val_data])
    assert small_lm.vocab.decode(full) == text  # contiguous split, nothing lost or reordered
    assert len(small_lm.val_data) == 3_000
    with pytest.raises(ValueError, match="not in the vocabulary"):
        small_lm.vocab.encode("\x00")
    with pytest.raises(ValueError, match="ids must lie"):
        small_lm.vocab.decode([len(small_lm.vocab)])
    assert Vocab.from_text("banana").decode(Vocab.from_text("banana").encode("nab")) == "nab"


def test_charlm_batches_are_shifted_windows_of_the_training_text(small_lm):
    batches = small_lm.train_batches(batch_size=5, seed=3)
    assert len(batches) == 10
    seen = list(batches)
    assert len(seen) == 10
    train_text = small_lm.vocab.decode(small_lm.train_data)
    for x, y in seen[:3]:
        assert x.shape == y.shape == (5, 32) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            window = small_lm.vocab.decode(row_x) + small_lm.vocab.decode(row_y[-1:])
            assert window in train_text
    again = list(small_lm.train_batches(batch_size=5, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seen, again))
    assert not torch.equal(seen[0][0], list(batches)[0][0])  # next epoch draws new windows


def test_charlm_metrics_are_consistent_and_learning_lowers_them(small_lm):
    model = small_lm.build_model(seed=0)
    m0 = small_lm.evaluate(model)
    assert set(m0) == {"val_loss", "bpc", "perplexity", "accuracy"}
    assert m0["bpc"] == pytest.approx(m0["val_loss"] / math.log(2))
    assert m0["perplexity"] == pytest.approx(math.exp(m0["val_loss"]))
    # An untrained model is close to uniform over the vocabulary.
    assert m0["val_loss"] == pytest.approx(math.log(len(small_lm.vocab)), rel=0.1)
    # The evaluation is the mean cross-entropy over every held-out next character.
    x, y = small_lm._val_windows
    with torch.no_grad():
        direct = F.cross_entropy(model(x).reshape(-1, len(small_lm.vocab)), y.reshape(-1)).item()
    assert m0["val_loss"] == pytest.approx(direct, rel=1e-5)
    assert x.numel() == (len(small_lm.val_data) - 1) // 32 * 32
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        for batch in small_lm.train_batches(16, seed=0):
            loss = small_lm.loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert small_lm.evaluate(model)["val_loss"] < m0["val_loss"] - 0.5


def test_charlm_rejects_text_too_short_and_bad_args():
    with pytest.raises(ValueError, match="seq_len"):
        CharLMTask(max_chars=200, seq_len=64)
    with pytest.raises(ValueError, match="val_fraction"):
        CharLMTask(max_chars=5_000, val_fraction=0.0)
    with pytest.raises(ValueError, match="max_chars"):
        CharLMTask(max_chars=0)
    capped = CharLMTask(max_chars=20_000, seq_len=16, max_eval_chars=160)
    assert capped._val_windows[0].shape == (10, 16)


# --- cifar / torchvision --------------------------------------------------------------------------

def test_resnet20_parameters_and_output_shape():
    model = resnet20()
    n = sum(p.numel() for p in model.parameters())
    assert n == 269_722  # the 0.27M of He et al. (2016), option-A shortcuts
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19  # 19 convolutions + 1 linear = 20 weighted layers
    assert resnet20(num_classes=100, shortcut="B")(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNetCifar(depth=21)


def test_cifar_path_without_data_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        Cifar10Task(tmp_path)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        get_task("cifar10", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs path="):
        get_task("cifar10")
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete or corrupted"):
        Cifar10Task(tmp_path)


def _write_image_folder(root, classes=("cat", "dog"), per_class=3):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for part in ("train", "val"):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / part / c / f"{i}.png")


def test_image_folder_task_loads_and_trains_one_step(tmp_path):
    _write_image_folder(tmp_path)
    task = ImageFolderTask(tmp_path, model="resnet20", image_size=16)
    assert task.num_classes == 2
    model = task.build_model(seed=0)
    x, y = next(iter(task.train_batches(batch_size=4, seed=0)))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,)
    task.loss(model, (x, y)).backward()
    metrics = task.evaluate(model)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["val_loss"])
    result = train(task, "fixed", epochs=1, batch_size=4, lr=0.01)  # DataLoader path through the loop
    assert result.steps == 1  # 6 images, drop_last


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderTask(tmp_path / "nope")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images in"):
        ImageFolderTask(tmp_path)
    _write_image_folder(tmp_path / "mixed", classes=("a",))
    (tmp_path / "mixed" / "val" / "b").mkdir()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "val" / "b" / "0.png")
    with pytest.raises(ValueError, match="class folders differ"):
        ImageFolderTask(tmp_path / "mixed", model="resnet20")
    _write_image_folder(tmp_path / "ok")
    with pytest.raises(ValueError, match="unknown model 'resnet2000'.*resnet18"):
        ImageFolderTask(tmp_path / "ok", model="resnet2000")


def test_build_torchvision_model_by_name():
    model = build_torchvision_model("resnet18", num_classes=3)
    assert model.fc.out_features == 3
    with pytest.raises(ValueError, match="unknown model .not_a_model.*mobilenet_v2"):
        build_torchvision_model("not_a_model")


# --- registry -------------------------------------------------------------------------------------

def test_registry_lists_and_rejects_unknown_names():
    assert {"digits", "charlm", "cifar10", "imagefolder"} <= set(list_tasks())
    with pytest.raises(ValueError, match="unknown task 'mnist'.*charlm.*digits"):
        get_task("mnist")
    with pytest.raises(TypeError, match="bad arguments for task 'digits'"):
        get_task("digits", colour=True)
    task = get_task("digits")
    assert get_task(task) is task
    register_task("tiny-lm", lambda **kw: CharLMTask(max_chars=5_000, seq_len=8, **kw), "tiny")
    try:
        assert get_task("tiny-lm").seq_len == 8
        with pytest.raises(ValueError, match="already registered"):
            register_task("tiny-lm", CharLMTask)
    finally:
        unregister_task("tiny-lm")
    assert "tiny-lm" not in list_tasks()


# --- the training loop ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy, summary", [("fp32", "fp32/fp32"), ("fixed", "int8/int8")])
def test_train_one_epoch_on_digits(digits, policy, summary):
    fresh_keys = set(digits.build_model(0).state_dict())
    result = train(digits, policy, epochs=1, batch_size=64, lr=0.05, seed=0)
    assert result.steps == len(digits.train_batches(64)) == 23
    assert result.history and result.history[0].summary() == summary
    assert result.report["steps"] == 23 and result.report["gbitops"] > 0
    assert result.primary_metric == "accuracy" and result.primary == result.metrics["accuracy"]
    assert result.primary > 0.3 and result.best == result.primary
    (epoch,) = result.epoch_metrics
    assert epoch["epoch"] == 0 and math.isfinite(epoch["train_loss"]) and epoch["time_s"] > 0
    assert set(result.model.state_dict()) == fresh_keys  # the controller left the model plain
    json.dumps(result.to_dict())


def test_train_is_deterministic_and_low_precision_costs_less(digits):
    a = train(digits, "fp32", epochs=1, batch_size=64, seed=1)
    b = train(digits, "fp32", epochs=1, batch_size=64, seed=1)
    q = train(digits, "fixed", epochs=1, batch_size=64, seed=1)
    assert a.metrics == b.metrics
    assert all(torch.equal(p, r) for p, r in zip(a.model.parameters(), b.model.parameters()))
    assert q.report["gbitops"] < a.report["gbitops"]


# The controller wraps opt.step; a scheduler made before entering must not take that for misuse.
@pytest.mark.filterwarnings("error:Seems like:UserWarning")
def test_train_charlm_observes_val_loss_and_uses_schedule(small_lm):
    seen, ctls = [], []
    result = train(small_lm, "fixed", epochs=2, batch_size=8, lr=0.01, optimizer="adam",
                   lr_schedule="cosine", on_epoch=lambda e, m: seen.append((e, m["bpc"])),
                   on_start=ctls.append)
    (ctl,) = ctls
    assert ctl.stats["val_loss"] == result.metrics["val_loss"]  # the controller saw the validation loss
    assert "val_acc" not in ctl.stats and torch.is_tensor(ctl.stats["loss"])
    assert [e for e, _ in seen] == [0, 1]
    assert result.primary_metric == "bpc" and result.direction == "minimize"
    assert result.best == min(b for _, b in seen)
    assert result.steps == 20
    assert result.epoch_metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches 0 at the end


def test_on_epoch_can_stop_the_run(digits):
    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        assert "accuracy" in metrics
        raise Stop

    with pytest.raises(Stop):
        train(digits, "fixed", epochs=3, batch_size=128, on_epoch=stop)


def test_train_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="epochs"):
        train(digits, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train(digits, epochs=1, lr=-1.0)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        train(digits, epochs=1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        train(digits, epochs=1, lr_schedule="linear")
    with pytest.raises(ValueError, match="controller_kwargs may not set"):
        train(digits, epochs=1, controller_kwargs={"optimizer": None})
    with pytest.raises(ValueError, match="not a torch device"):
        train(digits, epochs=1, device="tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(digits, epochs=1, device="cuda")
    with pytest.raises(ValueError, match="unknown task"):
        train("nope", epochs=1)


def test_optimizer_and_schedule_factories():
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(lambda params, lr: torch.optim.SGD(params, lr=lr), model.parameters(), 0.5)
    assert opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        make_optimizer(lambda params, lr: None, model.parameters(), 0.5)
    assert make_lr_schedule(None, opt, 10) is None
    sched = make_lr_schedule("cosine", opt, 4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
