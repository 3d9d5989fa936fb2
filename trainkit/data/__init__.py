"""Built-in data sets; each builds loaders whose batch plans resume exactly."""

from trainkit.data.arrays import ArrayData
from trainkit.data.dataset import DatasetData as DatasetData  # data=dataset
from trainkit.data.table import TableData as TableData  # data=table

__all__ = ["ArrayData", "TextData", "TranslationData", "TsvTranslationData"]


def __getattr__(name: str):
    if name in ("TranslationData", "TsvTranslationData"):
        from trainkit.data import translation

        return getattr(translation, name)
    if name == "TextData":  # data=text (imported when used: it reaches for transformers)
        from trainkit.data import text

        return text.TextData
    raise AttributeError(name)
