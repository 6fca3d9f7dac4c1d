"""lm-eval hooks for the EvoVLM-JP Japanese VQA tasks.

Tasks defined next to this file (run with lm-eval's ``hf-multimodal`` model type):

* ``ja_vg_vqa_500``: JA-VG-VQA-500 (``SakanaAI/JA-VG-VQA-500``, split ``test``,
  the first QA pair of each of the 500 images, as the paper); held out.
* ``ja_vg_vqa_500_fitness``: the same dataset's ``train`` split, for search fitness.
* ``ja_vlm_bench_itw``: JA-VLM-Bench-In-the-Wild
  (``SakanaAI/JA-VLM-Bench-In-the-Wild``, split ``test``, 50 questions).

Prompt, generation settings and metric follow Sakana AI's released evaluation code
(``evomerge/eval/{ja_vg_vqa,ja_vlm_wild,metrics,utils}.py`` and
``evomerge/models/prompt_templates.py`` in github.com/SakanaAI/evolutionary-model-merge):
the ``ja-shisa-vqa`` prompt, ROUGE-L F x 100 over MeCab tokens (fugashi +
unidic-lite) after emoji removal and neologdn normalization, and ``rougeL_ja``, which
blanks a prediction that fastText lid.176 does not call Japanese when the reference
is Japanese.

lm-eval imports this file by path (``!function utils.x``), once per YAML, so nothing
here may depend on the working directory or on shared module state.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

# One language detector for every Japanese metric of the project (lid.176, offline).
from mergekit_evolve.langid import japanese_probability

logger = logging.getLogger(__name__)

# Sakana AI's ``JA_SHISA_VQA`` template verbatim ("You are a helpful, unbiased,
# uncensored assistant. Answer the question based on the given image."). The input
# is "<image>\n{question}"; the tokenizer adds BOS, as in their LLaVA wrapper.
PROMPT_TEMPLATE = (
    "[INST] <<SYS>>\n"
    "あなたは役立つ、偏見がなく、検閲されていないアシスタントです。"
    "与えられた画像を下に、質問に答えてください。\n"
    "<</SYS>>\n\n"
    "{input} [/INST]"
)
IMAGE_PLACEHOLDER = "<image>"

JA_VG_VQA_HUB_ID = "SakanaAI/JA-VG-VQA-500"
JA_VLM_WILD_HUB_ID = "SakanaAI/JA-VLM-Bench-In-the-Wild"

#: Environment variables that point a task at local data (see :func:`load_ja_vg_vqa`).
JA_VG_VQA_ENV = "MERGEKIT_EVOLVE_JA_VG_VQA"
JA_VG_VQA_TRAIN_ENV = "MERGEKIT_EVOLVE_JA_VG_VQA_TRAIN"
JA_VLM_WILD_ENV = "MERGEKIT_EVOLVE_JA_VLM_WILD"
#: Task metadata keys that do the same and win over the environment.
JA_VG_VQA_META_KEY = "ja_vg_vqa_data"
JA_VG_VQA_TRAIN_META_KEY = "ja_vg_vqa_train_data"
JA_VLM_WILD_META_KEY = "ja_vlm_wild_data"

#: Sakana's VQA scoring calls a text Japanese when fastText lid.176 gives
#: ``__label__ja`` at least 0.5 (``>=``; the MGSM ``acc_ja`` uses ``>``).
JA_PROBABILITY_THRESHOLD = 0.5

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Sakana's emoji ranges, applied after ``emoji.is_emoji`` per character.
_EMOJI_RE = re.compile(
    "[\U0001f600-\U0001f64f\U0001f300-\U0001f5ff\U0001f680-\U0001f6ff"
    "\U0001f1e0-\U0001f1ff\U00002702-\U000027b0]+",
    flags=re.UNICODE,
)


# --------------------------------------------------------------------------- prompt


def doc_to_text(doc: dict[str, Any]) -> str:
    """The paper's ``ja-shisa-vqa`` prompt with the image before the question.

    Args:
        doc: A row with a ``question`` column.

    Returns:
        The prompt, ``<image>`` included (lm-eval swaps it for the model's image token).
    """
    # str.format on the template only, so braces inside a question are left alone.
    return PROMPT_TEMPLATE.format(input=f"{IMAGE_PLACEHOLDER}\n{doc['question']}")


def doc_to_image(doc: dict[str, Any]) -> list[Any]:
    """The row's image as an RGB PIL image, in the list hf-multimodal expects."""
    image = doc["image"]
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        image = Image.open(image)
    return [image.convert("RGB")]


# --------------------------------------------------------------------------- data


def load_ja_vg_vqa(**kwargs: Any) -> Any:
    """JA-VG-VQA-500 test split, first QA pair per image (the paper's held-out set).

    Args:
        **kwargs: Task metadata (lm-eval passes it to ``custom_dataset``);
            ``ja_vg_vqa_data`` (an absolute ``.jsonl``/``.json``/``.parquet`` path or a
            hub id) overrides ``MERGEKIT_EVOLVE_JA_VG_VQA``, which overrides
            ``SakanaAI/JA-VG-VQA-500``. A local file has ``image`` (a path, absolute
            or relative to the file) and either ``question``/``answer`` or ``qas``.

    Returns:
        A ``datasets.DatasetDict`` with one ``test`` split (``image``, ``question``,
        ``answer``).

    Raises:
        ValueError: The override is a relative path, a missing file, or lacks columns.
    """
    source = _data_source(kwargs, JA_VG_VQA_META_KEY, JA_VG_VQA_ENV)
    return _load(source, JA_VG_VQA_HUB_ID, "test")


def load_ja_vg_vqa_train(**kwargs: Any) -> Any:
    """JA-VG-VQA-500 train split, first QA pair per image: a fitness set disjoint
    from the held-out test split. Overrides: ``ja_vg_vqa_train_data`` /
    ``MERGEKIT_EVOLVE_JA_VG_VQA_TRAIN`` (see :func:`load_ja_vg_vqa`)."""
    source = _data_source(kwargs, JA_VG_VQA_TRAIN_META_KEY, JA_VG_VQA_TRAIN_ENV)
    return _load(source, JA_VG_VQA_HUB_ID, "train")


def load_ja_vlm_wild(**kwargs: Any) -> Any:
    """JA-VLM-Bench-In-the-Wild test split (42 images, 50 questions). Overrides:
    ``ja_vlm_wild_data`` / ``MERGEKIT_EVOLVE_JA_VLM_WILD`` (see :func:`load_ja_vg_vqa`)."""
    source = _data_source(kwargs, JA_VLM_WILD_META_KEY, JA_VLM_WILD_ENV)
    return _load(source, JA_VLM_WILD_HUB_ID, "test")


def _data_source(meta: dict[str, Any], meta_key: str, env_var: str) -> str | None:
    value = meta.get(meta_key) or os.environ.get(env_var) or None
    return str(value) if value is not None else None


def _load(source: str | None, hub_id: str, split_name: str) -> Any:
    import datasets

    if source is not None and _looks_like_file(source):
        split = _load_local(source)
    else:
        path = source or hub_id
        logger.info("loading %s (split %s) from the hub", path, split_name)
        split = datasets.load_dataset(path, split=split_name)
    if "qas" in split.column_names and "question" not in split.column_names:
        split = _first_qa(split)
    missing = {"image", "question", "answer"} - set(split.column_names)
    if missing:
        raise ValueError(
            f"data from {source or hub_id!r} lacks columns {sorted(missing)}; expected "
            f"'image' and 'question'/'answer' (or 'qas'), got {split.column_names}"
        )
    return datasets.DatasetDict({"test": split.select_columns(["image", "question", "answer"])})


def _first_qa(split: Any) -> Any:
    """The first QA pair per image, as the paper (``extract_qa`` takes ``qas[0]``).

    Built from the ``qas`` column alone, so no image is decoded and re-encoded.
    """
    qas = [row[0] for row in split["qas"]]
    return (
        split.remove_columns(["qas"])
        .add_column("question", [qa["question"] for qa in qas])
        .add_column("answer", [qa["answer"] for qa in qas])
    )


def _load_local(source: str) -> Any:
    import datasets

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
        raise ValueError(f"local data must be one of {sorted(_LOCAL_BUILDERS)}, got {str(file)!r}")
    logger.info("loading local %s data from %s", builder, file)
    split = datasets.load_dataset(builder, data_files={"test": str(file)}, split="test")
    if "image" in split.column_names and split.features["image"].dtype == "string":
        # Image paths are relative to the data file, so a fixture folder can move.
        split = split.map(lambda row: {"image": str((file.parent / row["image"]).resolve())})
        split = split.cast_column("image", datasets.Image())
    return split


def _looks_like_file(source: str) -> bool:
    # A hub id is "owner/name": no file suffix, no leading "/", "~" or ".".
    return (
        Path(source).suffix.lower() in _LOCAL_BUILDERS
        or source.startswith(("/", "~", "."))
        or os.path.isabs(source)
    )


# --------------------------------------------------------------------------- metric


def normalize_text(text: str) -> str:
    """Sakana's ``normalize_answer``: drop emoji, neologdn-normalize (full/half width,
    repeated long vowels, spaces between Japanese characters), collapse whitespace."""
    import emoji
    import neologdn

    text = "".join("" if emoji.is_emoji(ch) else ch for ch in text)
    text = _EMOJI_RE.sub("", text)
    text = neologdn.normalize(text)
    return " ".join(text.split())


class MecabTokenizer:
    """MeCab word segmentation (fugashi + unidic-lite) for rouge-score.

    rouge-score's default tokenizer keeps only ``[a-z0-9]`` and so drops every
    Japanese character; a tokenizer object with ``tokenize()`` replaces it.
    """

    def __init__(self) -> None:
        try:
            from fugashi import Tagger
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "the ja_vqa metric needs fugashi, unidic-lite, neologdn, emoji and "
                "rouge-score (pip install 'mergekit-evolve[ja]')"
            ) from err
        self.tagger = Tagger("-Owakati")

    def tokenize(self, text: str) -> list[str]:
        return self.tagger.parse(normalize_text(text)).split()


def _tokenizer() -> MecabTokenizer:
    # Cached on the function object: the MeCab dictionary loads once per import.
    cached = getattr(_tokenizer, "instance", None)
    if cached is None:
        cached = MecabTokenizer()
        _tokenizer.instance = cached  # type: ignore[attr-defined]
    return cached


def _scorer() -> Any:
    cached = getattr(_scorer, "instance", None)
    if cached is None:
        from rouge_score import rouge_scorer

        cached = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_tokenizer())
        _scorer.instance = cached  # type: ignore[attr-defined]
    return cached


def tokenize(text: str) -> list[str]:
    """The tokens ROUGE-L compares: MeCab words of the normalized text."""
    return _tokenizer().tokenize(text)


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure in [0, 1] of one prediction (longest common subsequence of
    MeCab tokens; 0 when either side has no token)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def is_japanese(text: str) -> bool:
    """Sakana's VQA language test: ``ja`` probability at least 0.5."""
    return japanese_probability(text) >= JA_PROBABILITY_THRESHOLD


def gate_japanese(reference: str, prediction: str) -> str:
    """The prediction ``rougeL_ja`` scores: blanked when the reference is Japanese
    and the prediction is not (an English reference leaves it alone)."""
    if is_japanese(reference) and not is_japanese(prediction):
        return ""
    return prediction


def score(reference: str, prediction: str) -> dict[str, float]:
    """``rougeL`` and ``rougeL_ja`` of one prediction, x 100 as the paper reports.

    The paper aggregates with rouge-score's ``BootstrapAggregator`` (the median of
    1000 resampled means, which moves with its random seed); lm-eval's ``mean`` of the
    per-example values here is the exact quantity that median estimates.
    """
    # Sakana's LLaVA wrapper strips every generation before scoring.
    prediction = prediction.strip()
    full = rouge_l(reference, prediction)
    kept = gate_japanese(reference, prediction) == prediction
    return {"rougeL": 100.0 * full, "rougeL_ja": 100.0 * full if kept else 0.0}


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` hook for every ``ja_vqa`` task.

    Args:
        doc: The dataset row (``answer`` is the reference).
        results: One generated string.

    Returns:
        Per-document ``rougeL`` and ``rougeL_ja`` (x 100), averaged by lm-eval.
    """
    return score(str(doc["answer"]), results[0])
