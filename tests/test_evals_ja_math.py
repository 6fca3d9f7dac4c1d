"""Tests for evals/ja_math: the EvoLLM-JP math tasks and the leaderboard average.

Everything runs offline: task data comes from tests/fixtures/ja_math (or, for the
leaderboard members, from tiny in-memory stand-ins), and the model is a stub whose
generations are scripted per prompt.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import load_task_utils
from lm_eval.api.model import LM

REPO = Path(__file__).resolve().parents[1]
EVALS = REPO / "evals"
TASK_DIR = EVALS / "ja_math"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ja_math"
JA_GSM8K_FILE = FIXTURES / "ja_gsm8k.jsonl"
MGSM_JA_FILE = FIXTURES / "mgsm_ja.jsonl"
RESPONSES = json.loads((FIXTURES / "responses.json").read_text(encoding="utf-8"))


utils = load_task_utils(TASK_DIR, "ja_math_utils")


class ScriptedLM(LM):
    """An LM whose generations are looked up by the problem inside the prompt."""

    def __init__(self, answers: dict[str, str], default: str = "") -> None:
        super().__init__()
        self.answers = answers
        self.default = default
        self.requests: list[tuple[str, dict]] = []

    def generate_until(self, requests):
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            self.requests.append((context, gen_kwargs))
            outputs.append(
                next(
                    (out for key, out in self.answers.items() if key in context),
                    self.default,
                )
            )
        return outputs

    def loglikelihood(self, requests):
        # The shortest continuation wins; ties go to the first choice (argmax).
        return [(-float(len(request.args[1])), False) for request in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(EVALS), include_defaults=False)


@pytest.fixture
def fixture_data(monkeypatch):
    monkeypatch.setenv(utils.JA_GSM8K_ENV, str(JA_GSM8K_FILE))
    monkeypatch.setenv(utils.MGSM_JA_ENV, str(MGSM_JA_FILE))


def _evaluate(task_manager, names, lm):
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import get_task_dict

    task_dict = get_task_dict(names, task_manager)
    return evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0)["results"]


# ----------------------------------------------------------------------------- tasks


def test_task_manager_indexes_every_task(task_manager):
    for name in ("ja_gsm8k_fitness", "mgsm_ja_evo", "ja_leaderboard_avg"):
        assert name in task_manager.all_tasks


@pytest.mark.parametrize("task", ["ja_gsm8k_fitness", "mgsm_ja_evo"])
def test_scripted_model_scores_hand_computed_metrics(task_manager, fixture_data, task):
    rows = RESPONSES[task]
    lm = ScriptedLM({row["question"]: row["response"] for row in rows})

    results = _evaluate(task_manager, [task], lm)[task]

    assert results["acc,none"] == pytest.approx(sum(r["acc"] for r in rows) / 12)
    assert results["acc_ja,none"] == pytest.approx(sum(r["acc_ja"] for r in rows) / 12)
    assert len(lm.requests) == 12


def test_hand_computed_values_are_the_expected_ones():
    # Written out once so a change to responses.json cannot silently move targets.
    assert sum(r["acc"] for r in RESPONSES["mgsm_ja_evo"]) == 9
    assert sum(r["acc_ja"] for r in RESPONSES["mgsm_ja_evo"]) == 6
    assert sum(r["acc"] for r in RESPONSES["ja_gsm8k_fitness"]) == 10
    assert sum(r["acc_ja"] for r in RESPONSES["ja_gsm8k_fitness"]) == 8


def test_prompt_and_generation_settings_follow_the_paper(task_manager, fixture_data):
    lm = ScriptedLM({})
    _evaluate(task_manager, ["mgsm_ja_evo"], lm)
    context, gen_kwargs = lm.requests[0]
    question = json.loads(MGSM_JA_FILE.read_text(encoding="utf-8").splitlines()[0])[
        "question"
    ]
    assert context == (
        "以下に、あるタスクを説明する指示があります。リクエストを適切に完了するための"
        "回答を日本語で記述してください。一歩一歩考えましょう。\n\n"
        f"### 指示:\n{question}\n\n### 応答:"
    )
    assert gen_kwargs["until"] == [
        "Instruction:",
        "Instruction",
        "Response:",
        "Response",
    ]
    assert gen_kwargs["do_sample"] is False
    assert gen_kwargs["max_gen_toks"] == 1024


def test_metadata_overrides_the_environment(fixture_data, monkeypatch):
    monkeypatch.setenv(utils.MGSM_JA_ENV, "/nonexistent/mgsm.jsonl")
    data = utils.load_mgsm_ja(mgsm_ja_data=str(MGSM_JA_FILE), version=1.0)
    assert data["test"].num_rows == 12


def test_relative_override_is_refused(monkeypatch):
    monkeypatch.setenv(utils.JA_GSM8K_ENV, "fixtures/ja_gsm8k.jsonl")
    with pytest.raises(ValueError, match="absolute path"):
        utils.load_ja_gsm8k()


def test_missing_override_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(utils.JA_GSM8K_ENV, str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="does not exist"):
        utils.load_ja_gsm8k()


def test_override_without_required_columns_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "solution": 2}\n', encoding="utf-8")
    monkeypatch.setenv(utils.MGSM_JA_ENV, str(bad))
    with pytest.raises(ValueError, match="answer_number"):
        utils.load_mgsm_ja()


def test_task_folder_works_when_copied_elsewhere(tmp_path, fixture_data):
    # The wheel ships evals/ as mergekit_evolve/evals: nothing may depend on the cwd
    # or on the folder's location.
    import shutil

    from lm_eval.tasks import TaskManager

    copy = tmp_path / "mergekit_evolve" / "evals" / "ja_math"
    shutil.copytree(TASK_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    tm = TaskManager(include_path=str(copy.parent), include_defaults=False)
    rows = RESPONSES["mgsm_ja_evo"]
    lm = ScriptedLM({row["question"]: row["response"] for row in rows})
    results = _evaluate(tm, ["mgsm_ja_evo"], lm)["mgsm_ja_evo"]
    assert results["acc,none"] == pytest.approx(0.75)


# ---------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected", "paper"),
    [
        ("答えは18ドルです。", "18", 18.0),
        ("答えは1,234です", "1234", 234.0),  # thousands separator
        ("合計は2,500,000円", "2500000", 0.0),
        ("答えは-5度", "-5", 5.0),  # negative
        ("x=−7", "-7", 7.0),  # U+2212 minus sign
        ("答え：－８", "-8", 8.0),  # full-width hyphen-minus
        ("5-3=2", "2", 2.0),  # a minus between numbers is not a sign
        ("10-15", "15", 15.0),
        ("１２３個", "123", 123.0),  # full-width digits
        ("１，２３４円", "1234", 234.0),
        ("３．５キロ", "3.5", 5.0),
        ("60×2.5=150.0", "150.0", 150.0),  # decimals
        ("答えは18.", "18", 18.0),  # sentence-final period
        ("Total: $1,000.50.", "1000.50", 0.5),
        ("2,3,4", "4", 4.0),  # a list, not a thousands separator
        ("1,2345", "2345", 2345.0),
        ("v1.2", "1.2", 1.2),
    ],
)
def test_extract_last_number(text, expected, paper):
    assert utils.extract_last_number(text) == Decimal(expected)
    assert utils.paper_extract_answer_number(text) == paper


@pytest.mark.parametrize("text", ["", "答えはありません", "No answer."])
def test_extract_last_number_without_number(text):
    assert utils.extract_last_number(text) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (18, "18"),
        (3.5, "3.5"),
        (8.0, "8"),
        ("1,234", "1234"),
        ("-5", "-5"),
        (None, None),
    ],
)
def test_parse_gold(value, expected):
    got = utils.parse_gold(value)
    assert got == (Decimal(expected) if expected is not None else None)


# ----------------------------------------------------------------------------- language


def test_japanese_answer_counts_for_acc_and_acc_ja():
    assert utils.score_response("3+5=8なので、答えは8個です。", 8) == {
        "acc": 1.0,
        "acc_ja": 1.0,
    }


def test_english_answer_counts_for_acc_only():
    assert utils.score_response("3 + 5 = 8, so the answer is 8.", 8) == {
        "acc": 1.0,
        "acc_ja": 0.0,
    }


def test_wrong_japanese_answer_counts_for_neither():
    assert utils.score_response("3+5=9なので、答えは9個です。", 8) == {
        "acc": 0.0,
        "acc_ja": 0.0,
    }


@pytest.mark.parametrize(
    ("text", "japanese"),
    [
        ("答えは42です", True),
        ("はい", True),
        ("The answer is 42.", False),
        # lid.176 calls mixed text with a short Japanese tail English, as the paper did.
        ("First 5+3=8, so 答えは8", False),
        ("42", False),  # bare numbers are not Japanese
        ("１２３", False),
        ("", False),
        ("答えは\n42です", True),  # newlines are removed first, as in the paper
    ],
)
def test_language_gate(text, japanese):
    assert utils.is_japanese(text) is japanese


def test_language_gate_agrees_with_fixture_labels():
    for rows in RESPONSES.values():
        for row in rows:
            if row["acc"]:
                assert utils.is_japanese(row["response"]) is bool(row["acc_ja"]), row


# --------------------------------------------------------------------- leaderboard

_LEADERBOARD_MEMBERS = {
    # (path, name): rows shared by every split; 6 rows cover 5-shot prompts.
    ("Rakuten/JGLUE", "JCommonsenseQA"): [
        {
            "q_id": i,
            "question": f"質問{i}",
            **{f"choice{c}": "あ" * (c + 1) for c in range(5)},
            "label": i % 2,  # the stub picks choice 0: right on even rows
        }
        for i in range(6)
    ],
    ("Rakuten/JGLUE", "JNLI"): [
        {"sentence1": "前提", "sentence2": "仮説", "label": [0, 2][i % 2]}
        for i in range(6)
    ],
    ("Rakuten/JGLUE", "MARC-ja"): [
        {"sentence": "良い製品です。", "label": 0} for _ in range(6)
    ],
    ("Rakuten/JGLUE", "JSQuAD"): [
        {
            "id": str(i),
            "title": "t",
            "context": "t [SEP] 日本の首都は東京です。",
            "question": "首都はどこ？",
            "answers": {"text": [["東京", "大阪"][i % 2]], "answer_start": [0]},
            "is_impossible": False,
        }
        for i in range(6)
    ],
    ("kumapo/JAQKET", "v2.0"): [
        {
            "qid": str(i),
            "question": "日本一高い山は？",
            "answers": {"text": ["富士山"]},
            "ctxs": {"title": ["山"], "text": ["富士山は日本一高い山です。"]},
        }
        for i in range(6)
    ],
    ("juletxara/mgsm", "ja"): [
        {
            "question": f"問題：計算{i}",
            "answer": "ステップごとの答え：5",
            "answer_number": [5, 7][i % 2],
            "equation_solution": "5",
        }
        for i in range(6)
    ],
    ("mkshing/xlsum_ja", None): [
        {
            "id": str(i),
            "url": "u",
            "title": "t",
            "text": "記事",
            "summary": "要約です。",
        }
        for i in range(6)
    ],
    ("polm-stability/xwinograd-ja", None): [
        {
            "sentence1": "短い文。",
            "sentence2": "ずっと長い文です。",
            "answer": ["1", "2"][i % 2],
        }
        for i in range(6)
    ],
}
# Hand-computed with the stub (shortest choice; fixed generations below).
_LEADERBOARD_EXPECTED = {
    "ja_leaderboard_jcommonsenseqa": 0.5,
    "ja_leaderboard_jnli": 0.5,
    "ja_leaderboard_marc_ja": 1.0,
    "ja_leaderboard_xwinograd": 0.5,
    "ja_leaderboard_jsquad": 0.5,
    "ja_leaderboard_jaqket_v2": 1.0,
    "ja_leaderboard_mgsm": 0.5,
    "ja_leaderboard_xlsum": 1.0,
}


def test_leaderboard_average_is_a_macro_average(monkeypatch):
    for module in ("fugashi", "unidic_lite", "neologdn", "emoji", "rouge_score"):
        pytest.importorskip(module)
    import datasets
    from lm_eval.tasks import TaskManager

    def fake_load_dataset(path, name=None, **kwargs):
        rows = _LEADERBOARD_MEMBERS[(path, name)]
        split = datasets.Dataset.from_list(rows)
        return datasets.DatasetDict(
            {"train": split, "validation": split, "test": split}
        )

    # Only the built-in members load through datasets.load_dataset; nothing else
    # would reach the hub anyway (offline), this gives them tiny stand-in data.
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tm = TaskManager(include_path=str(EVALS))  # built-ins needed for the members
    lm = ScriptedLM(
        {
            "日本の首都は東京です。\n質問：首都はどこ？\n\n### 応答：": " 東京 ",
            (
                "富士山は日本一高い山です。\n質問：日本一高い山は？\n\n### 応答："
            ): "富士山",
            "計算": "答えは5",
            "ニュース記事：記事": "要約です。",
        }
    )
    results = _evaluate(tm, ["ja_leaderboard_avg"], lm)

    for task, value in _LEADERBOARD_EXPECTED.items():
        assert results[task]["score,none"] == pytest.approx(value), task
    expected = sum(_LEADERBOARD_EXPECTED.values()) / 8
    assert results["ja_leaderboard_avg"]["score,none"] == pytest.approx(expected)
    # Each member keeps its own metric beside the common "score".
    assert results["ja_leaderboard_jsquad"]["exact_match,none"] == pytest.approx(0.5)
    assert results["ja_leaderboard_xlsum"]["rouge2,none"] == pytest.approx(1.0)
