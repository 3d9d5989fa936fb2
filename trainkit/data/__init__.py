"""Built-in data sets; each builds loaders whose batch plans resume exactly."""

from trainkit.data.arrays import ArrayData

__all__ = ["ArrayData", "TranslationData", "TsvTranslationData"]


def __getattr__(name: str):
    if name in ("TranslationData", "TsvTranslationData"):
        from trainkit.data import translation

        return getattr(translation, name)
    raise AttributeError(name)
