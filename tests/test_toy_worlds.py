"""The toy worlds keep their promises: in the splice zoo a hand-built layer splice
learns the target that no source has; in the Pareto zoo each expert holds its own
skill, no source holds the target, and a hand-built merge holds all three while a
heavier one trades a skill away. Each zoo trains once (minutes, cached in .cache/),
so these tests are slow."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EVALS = REPO / "evals"


def _score(path: Path, tasks: list[str]) -> dict[str, float]:
    """lm-eval accuracy (percent) of the model folder on toy tasks."""
    import torch
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lm = HFLM(
        pretrained=model, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=200
    )
    manager = TaskManager(include_path=str(EVALS), include_defaults=False)
    results = evaluate(
        lm=lm, task_dict=manager.load_task_or_group(tasks), bootstrap_iters=0
    )["results"]
    return {task: 100 * results[task]["acc,none"] for task in tasks}


def _splice(first: Path, second: Path, k: int, depth: int, out: Path) -> Path:
    """mergekit passthrough: ``first``'s layers [0, k), then ``second``'s [k, depth)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": str(first), "layer_range": [0, k]}]},
                {"sources": [{"model": str(second), "layer_range": [k, depth]}]},
            ],
        }
    )
    options = MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=True)
    run_merge(config, str(out), options=options)
    return out


def _task_arithmetic(
    zoo: dict[str, Path], weights: dict[str, float], out: Path
) -> Path:
    """mergekit task arithmetic on ``zoo["base"]``, one weight per expert."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(zoo["base"]),
            "dtype": "float32",
            "models": [
                {"model": str(zoo[name]), "parameters": {"weight": weight}}
                for name, weight in weights.items()
            ],
        }
    )
    options = MergeOptions(write_model_card=False, quiet=True, copy_tokenizer=True)
    run_merge(config, str(out), options=options)
    return out


@pytest.fixture(scope="module")
def splice_zoo(one_thread_module) -> dict[str, Path]:
    from mergekit_evolve.toy import build_zoo

    return build_zoo(REPO / ".cache" / "toy_splice", seed=0, spec="splice")


@pytest.fixture(scope="module")
def pareto_zoo(one_thread_module) -> dict[str, Path]:
    from mergekit_evolve.toy import build_zoo

    return build_zoo(REPO / ".cache" / "toy_pareto", seed=0, spec="pareto")


@pytest.fixture(scope="module")
def one_thread_module():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPLICE_AT = 5
"""The splice the splice toy is built for: math layers [0, 5), then ja's [5, 6)."""


@pytest.mark.slow
def test_splice_toy_a_hand_built_splice_learns_the_target(splice_zoo, tmp_path):
    from mergekit_evolve.toy.zoo import ZOO_SPECS

    tasks = ["toy_ja_sub_heldout", "toy_sub_ascii", "toy_add_ja"]
    scores = {name: _score(path, tasks) for name, path in splice_zoo.items()}
    assert max(s["toy_ja_sub_heldout"] for s in scores.values()) <= 5, scores
    assert scores["math"]["toy_sub_ascii"] >= 95, scores
    assert scores["ja"]["toy_add_ja"] >= 95, scores
    depth = ZOO_SPECS["splice"].num_layers
    spliced = _splice(
        splice_zoo["math"], splice_zoo["ja"], SPLICE_AT, depth, tmp_path / "splice"
    )
    assert _score(spliced, tasks[:1])["toy_ja_sub_heldout"] >= 80


PARETO_TASKS = [
    "toy_pareto_ja_sub_heldout",  # the target
    "toy_pareto_sub_ascii",  # the math expert's skill
    "toy_pareto_add_ja",  # the Japanese expert's skill
]


@pytest.mark.slow
def test_pareto_toy_experts_hold_their_skills_and_no_source_the_target(pareto_zoo):
    tasks = PARETO_TASKS
    scores = {name: _score(path, tasks) for name, path in pareto_zoo.items()}
    assert max(s["toy_pareto_ja_sub_heldout"] for s in scores.values()) <= 5, scores
    assert scores["math"]["toy_pareto_sub_ascii"] >= 95, scores
    assert scores["ja"]["toy_pareto_add_ja"] >= 95, scores
    # Each expert lacks the other's skill: a merge has something to keep.
    assert scores["math"]["toy_pareto_add_ja"] <= 5, scores
    assert scores["ja"]["toy_pareto_sub_ascii"] <= 5, scores


@pytest.mark.slow
def test_pareto_toy_skills_coexist_in_one_merge_and_trade_off_in_another(
    pareto_zoo, tmp_path
):
    """The world the Pareto search is for: the full math task vector and a quarter
    of the Japanese one hold the target and 90% of each best source's skill (seen:
    100, 100, 97.5 held out), while the full Japanese vector, which a search for
    the target alone may well pick (92 on the target), writes "47-12a=" in
    numerals and loses the math skill (seen: 0)."""
    target, math_skill, ja_skill = PARETO_TASKS
    sources = [_score(path, PARETO_TASKS) for path in pareto_zoo.values()]
    best = {task: max(s[task] for s in sources) for task in PARETO_TASKS}
    kept = _task_arithmetic(pareto_zoo, {"math": 1.0, "ja": 0.25}, tmp_path / "kept")
    scores = _score(kept, PARETO_TASKS)
    assert scores[target] >= 80, scores
    assert scores[math_skill] >= 0.9 * best[math_skill], (scores, best)
    assert scores[ja_skill] >= 0.9 * best[ja_skill], (scores, best)
    heavy = _task_arithmetic(pareto_zoo, {"math": 1.0, "ja": 1.0}, tmp_path / "heavy")
    scores = _score(heavy, PARETO_TASKS)
    assert scores[target] >= 80, scores
    assert scores[math_skill] < 0.9 * best[math_skill], (scores, best)


@pytest.mark.slow
def test_a_dataflow_search_written_as_before_finds_the_splice(splice_zoo, tmp_path):
    """configs/toy_splice.yml as written (no new keys), on a budget of one
    generation: the seeded data-flow search finds a splice that reaches the target
    held out, which no source does (seen on main 3903bf4: every one of 300
    candidates scored 0 on two seeds, and candidate 0 was reported as the best)."""
    from mergekit_evolve.loading import load_config
    from mergekit_evolve.loop import Evolution

    config = load_config(REPO / "configs" / "toy_splice.yml").with_overrides(
        **{
            "output.dir": str(tmp_path / "run"),
            "optimizer.max_evals": 12,  # the seeds: two own paths and ten splices
            "heldout.tasks": [{"task": "toy_ja_sub_heldout"}],
            "output.save_final": False,
        }
    )
    summary = Evolution(config).run()
    target = summary["heldout"]["best"]["toy_ja_sub_heldout"]
    sources = summary["heldout"]["sources"]
    assert target >= 0.8, summary["heldout"]
    assert max(s["toy_ja_sub_heldout"] for s in sources.values()) < 0.1
    assert "no_signal" not in summary
