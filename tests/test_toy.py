"""Fast tests of the toy world: tokenizer, tiny random models, task data and tasks.

The full zoo is not built here (minutes); a session fixture elsewhere does that.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from mergekit_evolve.toy import make_tiny_random_llama, make_tokenizer
from mergekit_evolve.toy.data import (
    TASK_SPLITS,
    TASKS,
    add_pairs,
    answer,
    prompt,
    split_pairs,
    sub_pairs,
    task_docs,
    to_ja,
    write_task_data,
)
from mergekit_evolve.toy.tokenizer import VOCAB

EVALS = Path(__file__).resolve().parents[1] / "evals"
FOLDERS = sorted({t.folder for t in TASKS.values()})


def test_tokenizer_round_trip_and_reload(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = make_tokenizer()
    text = "47-12=三五\n12+34=46\n"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no specials added
    assert tok.decode(ids) == text
    assert tok.pad_token_id == VOCAB["<pad>"] and tok.eos_token_id == VOCAB["</s>"]
    assert tok.padding_side == "left"

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.decode(ids) == text
    assert again.padding_side == "left"
    assert again.get_vocab() == tok.get_vocab()


def test_tokenizer_maps_unknown_characters_to_unk() -> None:
    tok = make_tokenizer()
    assert tok("é")["input_ids"] == [VOCAB["<unk>"]]


def test_tiny_random_llama_loads_and_is_deterministic(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = make_tiny_random_llama(tmp_path / "a", seed=3)
    b = make_tiny_random_llama(tmp_path / "b", seed=3)
    c = make_tiny_random_llama(tmp_path / "c", seed=4)
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c))
    assert ma.config.num_hidden_layers == 2 and ma.config.hidden_size == 32
    assert ma.dtype == torch.float32
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(a)
    logits = ma(**tok(["12+3="], return_tensors="pt")).logits
    assert logits.shape == (1, 5, len(VOCAB))


def test_tiny_random_llama_leaves_global_rng_alone(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_random_llama(tmp_path / "m", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_answers_end_with_newline_and_use_numerals() -> None:
    assert to_ja("305") == "三〇五"
    assert answer(47, "-", 12) == "35\n"
    assert answer(47, "-", 12, "ja") == "三五\n"
    assert answer(99, "+", 99, "ja") == "一九八\n"
    assert answer(10, "-", 10, "ja") == "〇\n"
    with pytest.raises(ValueError):
        answer(1, "*", 2)
    with pytest.raises(ValueError):
        answer(1, "+", 2, "roman")


def test_splits_are_disjoint_deterministic_and_cover_the_pools() -> None:
    splits = split_pairs()
    assert splits == split_pairs()
    pools = {"sub": sub_pairs(), "add": add_pairs()}
    for op, pool in pools.items():
        evals = [k for k in splits if k.startswith(op) and "_train" not in k]
        for i, x in enumerate(evals):
            for y in evals[i + 1 :]:
                assert not set(splits[x]) & set(splits[y]), (x, y)
        # The Pareto pool excludes every split; the demo's pool only its own.
        rest = sorted(sum((splits[k] for k in evals), splits[f"{op}_train_pareto"]))
        assert rest == sorted(pool)
        demo_splits = {"sub": ["sub_fitness", "sub_heldout", "sub_ascii"]}.get(
            op, ["add_ja"]
        )
        demo = sorted(sum((splits[k] for k in demo_splits), splits[f"{op}_train"]))
        assert demo == sorted(pool)
    assert len(splits) == 10
    for name in splits:
        if "_train" not in name:
            assert len(splits[name]) == 200, name


def test_marked_prompts_name_the_answer_script() -> None:
    assert prompt(47, "-", 12) == "47-12="
    assert prompt(47, "-", 12, "ja") == "47-12j="
    assert prompt(47, "-", 12, "ascii") == "47-12a="
    target = task_docs("toy_pareto_ja_sub_heldout")
    skill = task_docs("toy_pareto_sub_ascii")
    # Same problems as the demo's splits; only the marker tells the form apart.
    assert [d["question"] for d in target] == [
        d["question"][:-1] + "j=" for d in task_docs("toy_ja_sub_heldout")
    ]
    assert skill[0]["question"].endswith("a=") and skill[0]["answer"][0].isdigit()
    fitness = {d["question"][:-2] for d in task_docs("toy_pareto_sub_ascii_fitness")}
    assert not fitness & {d["question"][:-2] for d in skill}


@pytest.mark.parametrize("folder", FOLDERS)
def test_committed_task_data_matches_the_generator(tmp_path: Path, folder) -> None:
    written = write_task_data(tmp_path, folder)
    assert sorted(p.name for p in written) == sorted(
        p.name for p in (EVALS / folder / "data").glob("*.jsonl")
    )
    for path in written:
        committed = (EVALS / folder / "data" / path.name).read_text(encoding="utf-8")
        assert committed == path.read_text(encoding="utf-8"), (
            f"{path.name}: regenerate with mergekit_evolve.toy.data.write_task_data"
        )


def test_task_docs_formats() -> None:
    doc = task_docs("toy_ja_sub_heldout")[0]
    a, b = doc["a"], doc["b"]
    assert doc["question"] == f"{a}-{b}=" and doc["answer"] == to_ja(str(a - b)) + "\n"
    assert task_docs("toy_sub_ascii")[0]["answer"].rstrip("\n").isdigit()
    assert task_docs("toy_add_ja")[0]["question"].count("+") == 1
    with pytest.raises(ValueError, match="unknown toy task"):
        task_docs("nope")


def _load_tasks(include_path: Path, names: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_path), include_defaults=False)
    return tm.load_task_or_group(names)


def _docs(task_obj) -> list[dict]:
    return list(task_obj.test_docs())


def test_tasks_load_from_any_cwd_and_from_a_copied_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wheel ships evals/ as mergekit_evolve/evals/: paths must follow utils.py.
    copy = tmp_path / "mergekit_evolve" / "evals"
    shutil.copytree(EVALS, copy)
    monkeypatch.chdir(tmp_path)
    for root in (EVALS, copy):
        tasks = _load_tasks(root, sorted(TASKS))
        assert set(tasks) == set(TASKS)
        for name, task in tasks.items():
            docs = _docs(task)
            expected = task_docs(name)
            assert len(docs) == len(expected) == 200
            assert task.doc_to_text(docs[0]) == expected[0]["question"]
            assert task.doc_to_target(docs[0]) == expected[0]["answer"]
            assert task.config.output_type == "loglikelihood"
            assert task.config.target_delimiter == ""


def test_fitness_and_heldout_tasks_share_no_problem() -> None:
    tasks = _load_tasks(EVALS, ["toy_ja_sub_fitness", "toy_ja_sub_heldout"])
    fit = {d["question"] for d in _docs(tasks["toy_ja_sub_fitness"])}
    held = {d["question"] for d in _docs(tasks["toy_ja_sub_heldout"])}
    assert fit and held and not fit & held


class _ScriptedLM:
    """An lm-eval LM whose greedy continuation of a prompt is given by a table."""

    def __init__(self, greedy: dict[str, str]) -> None:
        from lm_eval.api.model import LM

        class Scripted(LM):
            def loglikelihood(self, requests):
                return [(0.0, greedy.get(r.args[0]) == r.args[1]) for r in requests]

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

            def generate_until(self, requests):
                raise NotImplementedError

        self.lm = Scripted()


def test_acc_is_exact_match_of_the_whole_answer() -> None:
    from lm_eval.evaluator import evaluate

    tasks = _load_tasks(EVALS, ["toy_ja_sub_heldout"])
    docs = task_docs("toy_ja_sub_heldout")
    # Right on the first half; on the second half the answer misses only the end
    # marker, i.e. a model that would go on writing digits: that must not count.
    greedy = {d["question"]: d["answer"] for d in docs[:100]}
    greedy.update({d["question"]: d["answer"].rstrip("\n") for d in docs[100:]})
    result = evaluate(lm=_ScriptedLM(greedy).lm, task_dict=tasks, bootstrap_iters=0)
    assert result["results"]["toy_ja_sub_heldout"]["acc,none"] == pytest.approx(0.5)


def test_hf_model_scores_through_lm_eval(tmp_path: Path) -> None:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_random_llama(tmp_path / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    lm = HFLM(
        pretrained=model, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=64
    )
    result = evaluate(
        lm=lm, task_dict=_load_tasks(EVALS, ["toy_add_ja"]), bootstrap_iters=0
    )
    assert result["results"]["toy_add_ja"]["acc,none"] == 0.0  # random weights


def test_committed_data_is_utf8_jsonl() -> None:
    assert set(TASK_SPLITS) <= set(TASKS)
    for task, spec in TASKS.items():
        lines = (
            (EVALS / spec.folder / "data" / f"{task}.jsonl")
            .read_text(encoding="utf-8")
            .splitlines()
        )
        rows = [json.loads(line) for line in lines]
        assert set(rows[0]) == {"question", "answer", "a", "b"}


def test_two_processes_building_one_folder_build_it_once(tmp_path):
    """Parallel test workers (or two runs) asking for one toy zoo: the second waits
    for the first's build and uses it, instead of replacing the folder under it."""
    import multiprocessing

    from mergekit_evolve.toy.cache import build_atomically

    directory = tmp_path / "zoo"
    log = tmp_path / "builds.log"

    def build(tmp):
        with log.open("a") as fh:
            fh.write("built\n")
        time.sleep(1.0)  # long enough for the other process to wait on the lock
        (tmp / "config.json").write_text("{}")

    def worker():
        build_atomically(
            directory,
            "zoo.json",
            {"seed": 0},
            build,
            threads=1,
            required=[directory / "config.json"],
        )

    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=worker) for _ in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert log.read_text() == "built\n"
    assert (directory / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".zoo.lock",
        "builds.log",
        "zoo",
    ]
