"""lm-eval hooks for the EvoLLM-JP Japanese math tasks and the leaderboard average.

Tasks defined next to this file:

* ``ja_gsm8k_fitness``: the search fitness of Akiba et al. (2024), "Evolutionary
  Optimization of Model Merging Recipes" (arXiv:2403.13187): 1069 GSM8K test
  problems translated to Japanese (``SakanaAI/gsm8k-ja-test_250-1319``).
* ``mgsm_ja_evo``: the paper's test set, MGSM ja (``juletxara/mgsm``, 250 problems).
* ``ja_leaderboard_avg``: a macro average over lm-eval's ``japanese_leaderboard``.

The prompt, stop strings and the ``acc_ja`` language gate follow Sakana AI's
released evaluation code (``evomerge/eval/ja_mgsm.py``,
``evomerge/models/prompt_templates.py`` and ``evomerge/models/causallm.py`` in
github.com/SakanaAI/evolutionary-model-merge). Answer extraction deliberately
departs from the paper's regex where that regex is wrong; see
:func:`extract_last_number`.

lm-eval imports this file by path (``!function utils.x``), once per YAML tag, so
nothing here may depend on the working directory or on shared module state.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

# One language detector for every Japanese metric of the project (lid.176, offline).
from mergekit_evolve.langid import japanese_probability

logger = logging.getLogger(__name__)

# Sakana AI's ``JA_ALPACA_COT_TEMPLATE`` verbatim: "Below is an instruction that
# describes a task. Write a response, in Japanese, that appropriately completes the
# request. Let's think step by step." No trailing space after "### 応答:".
PROMPT_TEMPLATE = (
    "以下に、あるタスクを説明する指示があります。"
    "リクエストを適切に完了するための回答を日本語で記述してください。"
    "一歩一歩考えましょう。\n\n"
    "### 指示:\n{input}\n\n"
    "### 応答:"
)

JA_GSM8K_HUB_ID = "SakanaAI/gsm8k-ja-test_250-1319"
MGSM_HUB_ID = "juletxara/mgsm"
MGSM_HUB_CONFIG = "ja"

#: Environment variables that point a task at other data (see :func:`load_ja_gsm8k`).
JA_GSM8K_ENV = "MERGEKIT_EVOLVE_JA_GSM8K"
MGSM_JA_ENV = "MERGEKIT_EVOLVE_MGSM_JA"
#: Keys of lm-eval task metadata (``--metadata`` / ``TaskManager(metadata=...)``)
#: that do the same and win over the environment.
JA_GSM8K_META_KEY = "ja_gsm8k_data"
MGSM_JA_META_KEY = "mgsm_ja_data"

#: The paper counts a response as Japanese when fastText lid.176 gives
#: ``__label__ja`` a probability above 0.5.
JA_PROBABILITY_THRESHOLD = 0.5

_LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


# --------------------------------------------------------------------------- prompt


def doc_to_text(doc: dict[str, Any]) -> str:
    """Build the paper's zero-shot Japanese step-by-step prompt for one problem.

    Args:
        doc: A row with a ``question`` column.

    Returns:
        The prompt, ending in ``"### 応答:"``.
    """
    # str.format on the template only, so braces inside a question are left alone.
    return PROMPT_TEMPLATE.format(input=doc["question"])


# --------------------------------------------------------------------------- data


def load_ja_gsm8k(**kwargs: Any) -> Any:
    """Load the fitness set: the hub dataset, or a local/other copy when overridden.

    lm-eval 0.4.13 calls a task's ``custom_dataset`` with the task metadata and
    ``dataset_kwargs`` as keyword arguments.

    Args:
        **kwargs: Task metadata; ``ja_gsm8k_data`` (an absolute path to a
            ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or a hub dataset id)
            overrides the ``MERGEKIT_EVOLVE_JA_GSM8K`` environment variable, which
            overrides the default ``SakanaAI/gsm8k-ja-test_250-1319``.

    Returns:
        A ``datasets.DatasetDict`` with one ``test`` split (``question``,
        ``answer_number`` columns).

    Raises:
        ValueError: The override is a relative path or a file that does not exist.
    """
    source = _data_source(kwargs, JA_GSM8K_META_KEY, JA_GSM8K_ENV)
    return _load_test_split(source, default=(JA_GSM8K_HUB_ID, None))


def load_mgsm_ja(**kwargs: Any) -> Any:
    """Load the test set: MGSM ja, or a local/other copy when overridden.

    Args:
        **kwargs: Task metadata; ``mgsm_ja_data`` overrides the
            ``MERGEKIT_EVOLVE_MGSM_JA`` environment variable, which overrides the
            default ``juletxara/mgsm`` (config ``ja``). A hub id given as an override
            (e.g. the script-free mirror ``jbross-ibm-research/mgsm``) is loaded
            with config ``ja`` too.

    Returns:
        A ``datasets.DatasetDict`` with one ``test`` split.

    Raises:
        ValueError: The override is a relative path or a file that does not exist.
    """
    source = _data_source(kwargs, MGSM_JA_META_KEY, MGSM_JA_ENV)
    return _load_test_split(
        source, default=(MGSM_HUB_ID, MGSM_HUB_CONFIG), hub_config=MGSM_HUB_CONFIG
    )


def _data_source(meta: dict[str, Any], meta_key: str, env_var: str) -> str | None:
    value = meta.get(meta_key) or os.environ.get(env_var) or None
    return str(value) if value is not None else None


def _load_test_split(
    source: str | None,
    default: tuple[str, str | None],
    hub_config: str | None = None,
) -> Any:
    import datasets

    if source is None:
        path, name = default
        logger.info("loading %s (config %s) from the hub", path, name)
        split = datasets.load_dataset(path, name, split="test")
    elif _looks_like_file(source):
        file = Path(source).expanduser()
        if not file.is_absolute():
            # Relative paths would depend on the working directory of whoever runs
            # lm-eval (CLI, a Ray worker, pytest): refuse rather than guess.
            raise ValueError(
                f"local data must be an absolute path, got {source!r} "
                f"(try {str(Path.cwd() / source)!r})"
            )
        if not file.is_file():
            raise ValueError(f"local data file {str(file)!r} does not exist")
        builder = _LOCAL_BUILDERS.get(file.suffix.lower())
        if builder is None:
            raise ValueError(
                f"local data must be one of {sorted(_LOCAL_BUILDERS)}, got {str(file)!r}"
            )
        logger.info("loading local %s data from %s", builder, file)
        split = datasets.load_dataset(
            builder, data_files={"test": str(file)}, split="test"
        )
    else:
        logger.info("loading %s (config %s) from the hub", source, hub_config)
        split = datasets.load_dataset(source, hub_config, split="test")
    missing = {"question", "answer_number"} - set(split.column_names)
    if missing:
        raise ValueError(
            f"data from {source or default[0]!r} lacks columns {sorted(missing)}; "
            f"expected 'question' and 'answer_number', got {split.column_names}"
        )
    return datasets.DatasetDict({"test": split})


def _looks_like_file(source: str) -> bool:
    # A hub id is "owner/name": no file suffix, no leading "/", "~" or ".".
    return (
        Path(source).suffix.lower() in _LOCAL_BUILDERS
        or source.startswith(("/", "~", "."))
        or os.path.isabs(source)
    )


# --------------------------------------------------------------------------- answers

# A number: an optional minus sign, then digits with optional comma thousands
# groups (exactly three digits each) and optional decimals, or a bare ".5". The
# sign only counts when it does not follow a digit, a Latin letter or a closing
# bracket, so "5-3=2" yields 5, 3, 2 (not -3), while "答えは-5" and "= -5" give -5.
_NUMBER_RE = re.compile(
    r"(?P<sign>(?<![0-9A-Za-z)\]])-)?"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?|(?P<bare>\.\d+))"
)
# Signs that NFKC leaves alone but models do write: minus sign, hyphen, dashes.
_MINUS_CHARS = str.maketrans({"\u2212": "-", "\u2010": "-", "\u2013": "-"})


def extract_last_number(text: str) -> Decimal | None:
    """Return the last number in a response, as the paper scores MGSM.

    Differences from the paper's ``re.findall(r"\\d*\\.?\\d+", text)[-1]``:

    * Thousands separators: "1,234" is 1234 (the paper reads 234: its pattern
      never matches a comma, so its ``replace(",", "")`` is dead code).
    * Negative numbers: "-5" (also with U+2212 "−") is -5 (the paper reads 5).
    * Full-width digits and punctuation are NFKC-normalised first. The paper's
      ``\\d`` matches "１２３" (and ``float`` accepts it), but not "，" or "．":
      it reads "１，２３４" as 234 and "３．５" as 5.
    * Decimals are compared exactly (``Decimal``), so "18.00" equals 18 and
      "0.1" is not a float approximation; a sentence-final period ("18.") is not
      part of the number, as in the paper.

    Args:
        text: The model's generated text.

    Returns:
        The last number, or ``None`` when the text has none.
    """
    normalized = unicodedata.normalize("NFKC", text).translate(_MINUS_CHARS)
    last: Decimal | None = None
    for match in _NUMBER_RE.finditer(normalized):
        integer = (match.group("int") or "0").replace(",", "")
        fraction = match.group("frac") or match.group("bare") or ""
        last = Decimal((match.group("sign") or "") + integer + fraction)
    return last


def parse_gold(value: Any) -> Decimal | None:
    """Turn a dataset's ``answer_number`` (int, float or string) into a ``Decimal``.

    Args:
        value: The gold answer.

    Returns:
        The answer, or ``None`` when it is missing or not a number.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, Decimal)):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    try:
        return Decimal(unicodedata.normalize("NFKC", str(value)).replace(",", ""))
    except InvalidOperation:
        return None


def paper_extract_answer_number(completion: str) -> float | None:
    """The paper's extraction, kept verbatim for comparison in docs and tests."""
    matches = re.findall(r"\d*\.?\d+", completion)
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


# --------------------------------------------------------------------------- language


def is_japanese(text: str) -> bool:
    """Whether the paper's ``acc_ja`` would accept ``text`` as Japanese (p > 0.5)."""
    return japanese_probability(text) > JA_PROBABILITY_THRESHOLD


# --------------------------------------------------------------------------- metrics


def score_response(response: str, gold: Any) -> dict[str, float]:
    """Score one response: ``acc`` (last number equals gold) and ``acc_ja``.

    Args:
        response: The generated text.
        gold: The ``answer_number`` of the problem.

    Returns:
        ``{"acc": 0.0 | 1.0, "acc_ja": 0.0 | 1.0}``; ``acc_ja`` also requires the
        response to be Japanese.
    """
    predicted, expected = extract_last_number(response), parse_gold(gold)
    correct = predicted is not None and expected is not None and predicted == expected
    # The language model runs only when it can change the result.
    japanese = correct and is_japanese(response)
    return {"acc": float(correct), "acc_ja": float(japanese)}


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` hook for ``ja_gsm8k_fitness`` and ``mgsm_ja_evo``.

    Args:
        doc: The dataset row (``answer_number`` is the gold answer).
        results: One generated string (the ``none`` filter keeps the first).

    Returns:
        Per-document ``acc`` and ``acc_ja``, averaged by lm-eval.
    """
    return score_response(results[0], doc["answer_number"])


# --------------------------------------------------------------------------- leaderboard
# lm-eval's japanese_leaderboard reports acc, exact_match and rouge2 under different
# filter names, and a group's aggregate_metric_list can only average one
# "metric,filter" key. ja_leaderboard_avg therefore re-scores every member as
# "score,none" (and keeps each member's own metric beside it).


def lb_choice_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict:
    """``process_results`` for the multiple-choice members (gold index in ``label``)."""
    lls = [loglikelihood for loglikelihood, _ in results]
    acc = float(max(range(len(lls)), key=lls.__getitem__) == int(doc["label"]))
    return {"acc": acc, "score": acc}


def lb_exact_match_results(doc: dict[str, Any], results: list[str]) -> dict:
    """``process_results`` for JSQuAD/JAQKET: exact match with the first answer."""
    gold = doc["answers"]["text"][0]
    em = float(results[0].strip() == gold.strip())
    return {"exact_match": em, "score": em}


def lb_mgsm_results(doc: dict[str, Any], results: list[str]) -> dict:
    """``process_results`` for ``ja_leaderboard_mgsm``, using lm-eval's own scorer."""
    from lm_eval.tasks.japanese_leaderboard import ja_leaderboard_mgsm

    acc = float(ja_leaderboard_mgsm.process_results(doc, results)["acc"])
    return {"acc": acc, "score": acc}


def lb_xlsum_results(doc: dict[str, Any], results: list[str]) -> dict:
    """``process_results`` for XL-Sum: (reference, prediction) pairs for ROUGE-2."""
    # The member's "whitespaces" filter strips the prediction before scoring.
    pair = (doc["summary"], results[0].strip())
    return {"rouge2": pair, "score": pair}


def lb_rouge2_agg(items: list[tuple[str, str]]) -> float:
    """Corpus ROUGE-2 F with MeCab tokens, via lm-eval's own implementation."""
    from lm_eval.tasks.japanese_leaderboard import ja_leaderboard_xlsum

    return ja_leaderboard_xlsum.rouge2_agg(items)
