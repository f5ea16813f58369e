"""CIFAR-style ResNet-20, torchvision models by name, and image data sets read from a user's own path.

This is the real-world route: CIFAR-10 (the python version) or any ImageFolder tree already on disk,
trained with a ResNet-20 or any torchvision classifier. adaprec never downloads data, so a path without
data gets an error that says what was expected there.

Example:
    >>> import torch
    >>> from adaprec.tasks.cifar import resnet20
    >>> model = resnet20()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    0.27
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Batch, Task, _check_positive_int, _check_seed, evaluate_batches, seeded

__all__ = [
    "BasicBlock",
    "Cifar10Task",
    "ImageFolderTask",
    "ResNetCifar",
    "build_torchvision_model",
    "load_cifar10",
    "load_image_folder",
    "resnet20",
]

# Per-channel statistics of the CIFAR-10 training set, the usual normalisation constants.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision() -> Any:
    try:
        import torchvision
    except ImportError as e:  # torchvision is an extra, not a core dependency
        raise ImportError("this task needs torchvision: pip install 'adaprec[extras]'") from e
    return torchvision


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al., 2016).

    ``shortcut="A"`` (the CIFAR paper's choice, parameter-free) subsamples and zero-pads the identity when
    the shape changes; ``"B"`` uses a 1x1 convolution + BN projection instead.

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-padded identity) or 'B' (1x1 projection), "
                             f"got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.pad = stride, out_channels - in_channels
        self.projection: nn.Module | None = None
        if shortcut == "B" and (stride != 1 or in_channels != out_channels):
            self.projection = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.projection is not None:
            return self.projection(x)
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            # Zero channels split around the identity, as in the original option A.
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNetCifar(nn.Module):
    """The CIFAR ResNet family (6n+2 layers): a 3x3 stem, three stages of ``n`` basic blocks at widths
    16/32/64 (strides 1/2/2), global average pooling and a linear classifier.

    Example:
        >>> ResNetCifar(depth=8, num_classes=5)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 5])
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 shortcut: str = "A", in_channels: int = 3) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                             f"got {depth!r}")
        n = (depth - 2) // 6
        w0, w1, w2 = (_check_positive_int("widths[i]", w) for w in widths)
        self.conv1 = nn.Conv2d(_check_positive_int("in_channels", in_channels), w0, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.layer1 = self._stage(w0, w0, n, 1, shortcut)
        self.layer2 = self._stage(w0, w1, n, 2, shortcut)
        self.layer3 = self._stage(w1, w2, n, 2, shortcut)
        self.fc = nn.Linear(w2, _check_positive_int("num_classes", num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int, shortcut: str) -> nn.Sequential:
        blocks = [BasicBlock(cin, cout, stride, shortcut)]
        blocks += [BasicBlock(cout, cout, 1, shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10, shortcut: str = "A") -> ResNetCifar:
    """ResNet-20 for 32x32 inputs (about 0.27M parameters).

    Example:
        >>> len([m for m in resnet20().modules() if isinstance(m, nn.Conv2d)])
        19
    """
    return ResNetCifar(20, num_classes, shortcut=shortcut)


def build_torchvision_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """A randomly initialised torchvision classifier by name (``torchvision.models.get_model``).

    Example:
        >>> m = build_torchvision_model("resnet18", num_classes=7)
        >>> m.fc.out_features
        7
    """
    tv = _torchvision()
    _check_model_name(name, resnet20_allowed=False)
    num_classes = _check_positive_int("num_classes", num_classes)
    return tv.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _build_named_model(name: str, num_classes: int) -> nn.Module:
    if name == "resnet20":
        return resnet20(num_classes)
    return build_torchvision_model(name, num_classes)


def load_cifar10(path: str | Path, train_transform: Any = None,
                 test_transform: Any = None) -> tuple[Any, Any]:
    """``(train, test)`` CIFAR-10 data sets from ``path`` (which holds ``cifar-10-batches-py``); no download.

    Raises:
        FileNotFoundError: the path does not hold the CIFAR-10 python-version files.
    """
    tv = _torchvision()
    root = Path(path).expanduser()
    expected = root / "cifar-10-batches-py"
    if not expected.is_dir():
        raise FileNotFoundError(
            f"no CIFAR-10 data at {str(root)!r}: expected the folder {str(expected)!r} (the 'python version' "
            f"archive from https://www.cs.toronto.edu/~kriz/cifar.html, extracted). adaprec never downloads "
            f"data; point path= at the folder that contains cifar-10-batches-py.")
    try:
        train = tv.datasets.CIFAR10(str(root), train=True, download=False, transform=train_transform)
        test = tv.datasets.CIFAR10(str(root), train=False, download=False, transform=test_transform)
    except RuntimeError as e:  # torchvision's integrity check failed: files missing or corrupted
        raise FileNotFoundError(f"the CIFAR-10 files in {str(expected)!r} are incomplete or corrupted "
                                f"({e}); re-extract the python-version archive there") from e
    return train, test


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_image_folder(path: str | Path, train_transform: Any = None, test_transform: Any = None,
                      val_dirs: tuple[str, ...] = ("val", "test")) -> tuple[Any, Any]:
    """``(train, val)`` ImageFolder data sets from ``path/train/<class>/*`` and ``path/val/<class>/*``.

    ``path/test`` is accepted in place of ``path/val``. Both parts must have the same class folders.

    Raises:
        FileNotFoundError: a part is missing or holds no images.
        ValueError: the parts' class folders differ.
    """
    tv = _torchvision()
    root = Path(path).expanduser()
    layout = (f"expected {str(root / 'train')!r} and {str(root / val_dirs[0])!r} (or "
              f"{', '.join(repr(str(root / d)) for d in val_dirs[1:])}), each with one sub-folder of images "
              f"per class")
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {str(root)!r}: the path does not exist; {layout}")
    val_dir = next((root / d for d in val_dirs if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or val_dir is None:
        raise FileNotFoundError(f"no image data at {str(root)!r}: {layout}")
    parts = []
    for d, tf in ((root / "train", train_transform), (val_dir, test_transform)):
        has_images = any(p.suffix.lower() in _IMAGE_SUFFIXES for p in d.glob("*/*"))
        if not has_images:
            raise FileNotFoundError(f"no images in {str(d)!r}: {layout} "
                                    f"(suffixes {', '.join(_IMAGE_SUFFIXES)})")
        parts.append(tv.datasets.ImageFolder(str(d), transform=tf))
    train, val = parts
    if train.classes != val.classes:
        raise ValueError(f"class folders differ between {str(root / 'train')!r} ({train.classes}) and "
                         f"{str(val_dir)!r} ({val.classes})")
    return train, val


class _VisionTask(Task):
    """Shared part of the image tasks: cross-entropy training, accuracy evaluation, DataLoaders."""

    primary_metric: ClassVar[str] = "accuracy"
    direction: ClassVar[str] = "maximize"
    observe_key: ClassVar[str] = "val_acc"

    train_set: Any
    test_set: Any
    num_classes: int
    model_name: str

    def __init__(self, num_workers: int = 0, eval_batch_size: int = 256) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        self.num_workers = num_workers
        self.eval_batch_size = _check_positive_int("eval_batch_size", eval_batch_size)

    def build_model(self, seed: int = 0) -> nn.Module:
        with seeded(seed):
            return _build_named_model(self.model_name, self.num_classes)

    def train_batches(self, batch_size: int, seed: int = 0) -> torch.utils.data.DataLoader:
        _check_seed(seed)
        # A seeded generator fixes the shuffle of every epoch (and the workers' augmentation seeds).
        return torch.utils.data.DataLoader(
            self.train_set, batch_size=_check_positive_int("batch_size", batch_size), shuffle=True,
            generator=torch.Generator().manual_seed(seed), num_workers=self.num_workers, drop_last=True,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loader = torch.utils.data.DataLoader(self.test_set, batch_size=self.eval_batch_size, shuffle=False,
                                             num_workers=self.num_workers)
        loss_sum, correct, n = evaluate_batches(model, loader, _loss_and_correct)
        return {"accuracy": correct / n, "val_loss": loss_sum / n}


def _loss_and_correct(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()


class Cifar10Task(_VisionTask):
    """CIFAR-10 from a local ``path`` (standard augmentation: random crop with 4-pixel padding + flip).

    Args:
        path: folder containing ``cifar-10-batches-py``.
        model: ``"resnet20"`` or any torchvision classifier name.
        augment: random crop + horizontal flip on the training set.
        num_workers: DataLoader worker processes.

    Example:
        >>> Cifar10Task("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        FileNotFoundError: no CIFAR-10 data at '/nonexistent': ...
    """

    name: ClassVar[str] = "cifar10"
    defaults: ClassVar[dict[str, Any]] = {"epochs": 160, "batch_size": 128, "lr": 0.1, "optimizer": "sgd",
                                          "lr_schedule": "step", "weight_decay": 1e-4}

    def __init__(self, path: str | Path, model: str = "resnet20", augment: bool = True, num_workers: int = 0,
                 eval_batch_size: int = 256) -> None:
        super().__init__(num_workers, eval_batch_size)
        tv = _torchvision()
        T = tv.transforms
        normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else [])
                             + normalize)
        self.train_set, self.test_set = load_cifar10(path, train_tf, T.Compose(normalize))
        self.path, self.model_name, self.num_classes = Path(path), model, 10
        if model != "resnet20":
            _check_model_name(model)  # fail now, not after the data has loaded and training started


class ImageFolderTask(_VisionTask):
    """Classification on an ImageFolder tree at ``path`` (``train/`` and ``val/`` with one folder per class).

    Images are resized (shorter side) and centre-cropped to ``image_size``; training adds a random flip.
    Normalisation uses the ImageNet statistics.

    Args:
        path: folder holding ``train/`` and ``val/`` (or ``test/``).
        model: any torchvision classifier name, or ``"resnet20"`` for small images.
        image_size: side of the square crop fed to the model.

    Example:
        >>> ImageFolderTask("/nonexistent")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        FileNotFoundError: no image folder at '/nonexistent': ...
    """

    name: ClassVar[str] = "imagefolder"
    defaults: ClassVar[dict[str, Any]] = {"epochs": 30, "batch_size": 64, "lr": 0.1, "optimizer": "sgd",
                                          "lr_schedule": "cosine", "weight_decay": 1e-4}

    def __init__(self, path: str | Path, model: str = "resnet18", image_size: int = 224, num_workers: int = 0,
                 eval_batch_size: int = 256) -> None:
        super().__init__(num_workers, eval_batch_size)
        tv = _torchvision()
        T = tv.transforms
        size = _check_positive_int("image_size", image_size)
        resize = [T.Resize(size), T.CenterCrop(size)]
        normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.train_set, self.test_set = load_image_folder(
            path, T.Compose(resize + [T.RandomHorizontalFlip()] + normalize), T.Compose(resize + normalize))
        self.path, self.model_name = Path(path), model
        self.num_classes = len(self.train_set.classes)
        if model != "resnet20":
            _check_model_name(model)


def _check_model_name(name: str, resnet20_allowed: bool = True) -> None:
    tv = _torchvision()
    known = tv.models.list_models(module=tv.models)
    if name not in known:
        hint = "use 'resnet20' or a torchvision classification model" if resnet20_allowed else \
            "known torchvision classification models"
        raise ValueError(f"unknown model {name!r}; {hint}: {', '.join(sorted(known))}")
