"""Tests for evals/ja_vqa: the EvoVLM-JP VQA tasks and their ROUGE-L metric.

Everything runs offline: task data comes from tests/fixtures/ja_vqa (tiny PNGs and
jsonl files), and the model is a stub whose generations are scripted per question.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_task_utils
from lm_eval.api.model import LM

REPO = Path(__file__).resolve().parents[1]
EVALS = REPO / "evals"
TASK_DIR = EVALS / "ja_vqa"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ja_vqa"
VG_FILE = FIXTURES / "ja_vg_vqa.jsonl"
WILD_FILE = FIXTURES / "ja_vlm_wild.jsonl"
RESPONSES = json.loads((FIXTURES / "responses.json").read_text(encoding="utf-8"))


utils = load_task_utils(TASK_DIR, "ja_vqa_utils")


class ScriptedVLM(LM):
    """A multimodal LM whose generations are looked up by the question in the prompt."""

    MULTIMODAL = True

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers
        self.requests: list[tuple] = []

    def generate_until(self, requests):
        outputs = []
        for request in requests:
            self.requests.append(request.args)
            context = request.args[0]
            outputs.append(
                next((out for key, out in self.answers.items() if key in context), "")
            )
        return outputs

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(EVALS), include_defaults=False)


@pytest.fixture
def fixture_data(monkeypatch):
    monkeypatch.setenv(utils.JA_VG_VQA_ENV, str(VG_FILE))
    monkeypatch.setenv(utils.JA_VG_VQA_TRAIN_ENV, str(VG_FILE))
    monkeypatch.setenv(utils.JA_VLM_WILD_ENV, str(WILD_FILE))


def _evaluate(task_manager, names, lm):
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import get_task_dict

    return evaluate(
        lm=lm, task_dict=get_task_dict(names, task_manager), bootstrap_iters=0
    )["results"]


# ----------------------------------------------------------------------------- metric


@pytest.mark.parametrize(
    ("reference", "prediction", "ref_tokens", "pred_tokens", "expected"),
    [
        # LCS 5 of 6 reference / 5 prediction tokens: P = 1, R = 5/6, F = 10/11.
        (
            "白い猫が座っている",
            "猫が座っている",
            ["白い", "猫", "が", "座っ", "て", "いる"],
            ["猫", "が", "座っ", "て", "いる"],
            100 * 10 / 11,
        ),
        # Word order matters: LCS is 1 token. P = 1/4, R = 1/7, F = 2/11.
        (
            "赤いバスが二台あります",
            "バスは赤いです",
            ["赤い", "バス", "が", "二", "台", "あり", "ます"],
            ["バス", "は", "赤い", "です"],
            100 * 2 / 11,
        ),
        # Full-width digits normalized: LCS 2, P = 2/3, R = 1, F = 4/5.
        ("2本", "２本です", ["2", "本"], ["2", "本", "です"], 80.0),
        # neologdn: full-width Latin equals half-width.
        (
            "ＴＶがあります",
            "TVがあります",
            ["TV", "が", "あり", "ます"],
            ["TV", "が", "あり", "ます"],
            100.0,
        ),
        # Emoji are dropped before tokenizing.
        (
            "猫が座っている",
            "猫が座っている😺",
            ["猫", "が", "座っ", "て", "いる"],
            ["猫", "が", "座っ", "て", "いる"],
            100.0,
        ),
        ("白い猫が座っている", "", ["白い", "猫", "が", "座っ", "て", "いる"], [], 0.0),
    ],
)
def test_rouge_l_equals_hand_computed_values(
    reference, prediction, ref_tokens, pred_tokens, expected
):
    assert utils.tokenize(reference) == ref_tokens
    assert utils.tokenize(prediction) == pred_tokens
    assert utils.score(reference, prediction)["rougeL"] == pytest.approx(expected)


def test_rouge_score_default_tokenizer_would_see_no_japanese():
    # Why the MeCab tokenizer exists: rouge-score's own drops every Japanese character.
    from rouge_score import rouge_scorer

    plain = (
        rouge_scorer.RougeScorer(["rougeL"])
        .score("白い猫", "黒い犬")["rougeL"]
        .fmeasure
    )
    assert plain == 0.0
    assert utils.rouge_l("白い猫", "白い犬") == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("reference", "prediction", "rouge", "rouge_ja"),
    [
        # Japanese reference, non-Japanese prediction: blanked for rougeL_ja only.
        ("2本", "2", 100 * 2 / 3, 0.0),
        # Japanese reference, Japanese prediction: kept.
        ("2本", "２本です", 80.0, 80.0),
        # English reference: never gated, even for an English prediction.
        ("Yes", "Yes", 100.0, 100.0),
    ],
)
def test_ja_gate_blanks_non_japanese_predictions_of_japanese_references(
    reference, prediction, rouge, rouge_ja
):
    scores = utils.score(reference, prediction)
    assert scores["rougeL"] == pytest.approx(rouge)
    assert scores["rougeL_ja"] == pytest.approx(rouge_ja)


def test_language_threshold_is_sakanas_greater_or_equal(monkeypatch):
    monkeypatch.setattr(utils, "japanese_probability", lambda text: 0.5)
    assert utils.is_japanese("anything")


# ----------------------------------------------------------------------------- tasks


def test_task_manager_indexes_every_task(task_manager):
    for name in ("ja_vg_vqa_500", "ja_vg_vqa_500_fitness", "ja_vlm_bench_itw"):
        assert name in task_manager.all_tasks


@pytest.mark.parametrize("task", ["ja_vg_vqa_500", "ja_vlm_bench_itw"])
def test_scripted_model_scores_hand_computed_metrics(task_manager, fixture_data, task):
    rows = RESPONSES[task]
    lm = ScriptedVLM({row["question"]: row["prediction"] for row in rows})

    results = _evaluate(task_manager, [task], lm)[task]

    assert len(lm.requests) == len(rows)
    assert results["rougeL,none"] == pytest.approx(
        sum(r["rougeL"] for r in rows) / len(rows)
    )
    assert results["rougeL_ja,none"] == pytest.approx(
        sum(r["rougeL_ja"] for r in rows) / len(rows)
    )


def test_hand_computed_values_are_the_expected_ones():
    # Written out once so a change to responses.json cannot silently move targets.
    vg = RESPONSES["ja_vg_vqa_500"]
    assert sum(r["rougeL"] for r in vg) / 4 == pytest.approx(
        (1000 / 11 + 200 / 11 + 200 / 3 + 100) / 4
    )
    assert sum(r["rougeL_ja"] for r in vg) / 4 == pytest.approx(
        (1000 / 11 + 200 / 11 + 100) / 4
    )


def test_first_qa_pair_per_image_and_the_images_reach_the_model(
    task_manager, fixture_data
):
    lm = ScriptedVLM({})
    _evaluate(task_manager, ["ja_vg_vqa_500"], lm)
    contexts = [args[0] for args in lm.requests]
    # The white image has two QA pairs; only the first is asked.
    assert sum("何が座っていますか？" in c for c in contexts) == 1
    assert not any("猫は何色？" in c for c in contexts)
    visuals = [args[2]["visual"] for args in lm.requests]
    assert all(
        len(v) == 1 and v[0].mode == "RGB" and v[0].size == (8, 8) for v in visuals
    )


def test_prompt_and_generation_settings_follow_the_paper(task_manager, fixture_data):
    lm = ScriptedVLM({})
    _evaluate(task_manager, ["ja_vlm_bench_itw"], lm)
    context, gen_kwargs, _ = lm.requests[0]
    question = json.loads(WILD_FILE.read_text(encoding="utf-8").splitlines()[0])[
        "question"
    ]
    assert context == (
        "[INST] <<SYS>>\nあなたは役立つ、偏見がなく、検閲されていないアシスタントです。"
        "与えられた画像を下に、質問に答えてください。\n<</SYS>>\n\n"
        f"<image>\n{question} [/INST]"
    )
    assert gen_kwargs["num_beams"] == 5
    assert gen_kwargs["repetition_penalty"] == 1.5
    assert gen_kwargs["max_gen_toks"] == 512
    assert gen_kwargs["do_sample"] is False
    assert gen_kwargs["until"] == []


def test_fitness_task_reads_its_own_split(task_manager, monkeypatch, fixture_data):
    monkeypatch.setenv(utils.JA_VG_VQA_TRAIN_ENV, str(WILD_FILE))
    lm = ScriptedVLM({})
    results = _evaluate(task_manager, ["ja_vg_vqa_500_fitness"], lm)
    assert len(lm.requests) == 2  # the wild fixture's rows, not the VG test rows
    assert results["ja_vg_vqa_500_fitness"]["rougeL,none"] == 0.0


def test_metadata_overrides_the_environment(monkeypatch):
    monkeypatch.setenv(utils.JA_VLM_WILD_ENV, "/nonexistent/wild.jsonl")
    data = utils.load_ja_vlm_wild(ja_vlm_wild_data=str(WILD_FILE), version=1.0)
    assert data["test"].num_rows == 2
    assert data["test"].column_names == ["image", "question", "answer"]


def test_relative_override_is_refused(monkeypatch):
    monkeypatch.setenv(utils.JA_VG_VQA_ENV, "fixtures/ja_vg_vqa.jsonl")
    with pytest.raises(ValueError, match="absolute path"):
        utils.load_ja_vg_vqa()


def test_override_without_required_columns_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "prompt": "?"}\n', encoding="utf-8")
    monkeypatch.setenv(utils.JA_VLM_WILD_ENV, str(bad))
    with pytest.raises(ValueError, match="lacks columns"):
        utils.load_ja_vlm_wild()
