"""Tasks: how a batch becomes a loss and metrics."""

from trainkit.tasks.base import ModelLossTask, Task
from trainkit.tasks.supervised import ClassificationTask, RegressionTask, SupervisedTask
from trainkit.tasks.vae import VAETask

__all__ = [
    "ClassificationTask",
    "ModelLossTask",
    "RegressionTask",
    "Seq2SeqTask",
    "SupervisedTask",
    "Task",
    "VAETask",
]


def __getattr__(name: str):
    if name == "Seq2SeqTask":
        from trainkit.tasks.seq2seq import Seq2SeqTask

        return Seq2SeqTask
    raise AttributeError(name)
