"""Real training tasks for tests, benchmarks, tuning and the CLI, and the one loop that trains them.

* ``digits`` — scikit-learn's 8x8 handwritten digits with a small CNN (accuracy);
* ``charlm`` — a character LSTM on the ``pydoc_data.topics`` text (val loss, bits per char, perplexity);
* ``gptlm`` — a GPT-style character transformer on the same text and metrics (:mod:`adaprec.tasks.gptlm`);
* ``cifar10`` / ``imagefolder`` — ResNet-20 or any torchvision model on data at a user's path.

Example:
    >>> from adaprec.tasks import get_task, list_tasks
    >>> "digits" in list_tasks()
    True
    >>> task = get_task("digits")
    >>> sorted(task.evaluate(task.build_model(seed=0)))
    ['accuracy', 'val_loss']
"""

from .base import Task, TensorBatches
from .charlm import CharLMTask, CharLSTM, Vocab
from .cifar import Cifar10Task, ImageFolderTask, ResNetCifar, build_torchvision_model, resnet20
from .digits import DigitsCNN, DigitsTask
from .gptlm import GPT, GPTLMTask
from .registry import get_task, list_tasks, register_task, unregister_task
from .run import RunResult, train

__all__ = [
    "Task", "TensorBatches", "get_task", "list_tasks", "register_task", "unregister_task",
    "DigitsTask", "DigitsCNN", "CharLMTask", "CharLSTM", "Vocab", "GPTLMTask", "GPT",
    "Cifar10Task", "ImageFolderTask", "ResNetCifar", "resnet20", "build_torchvision_model",
    "RunResult", "train",
]
