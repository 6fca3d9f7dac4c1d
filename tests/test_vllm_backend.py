"""``evaluator.backend: vllm`` in whole runs: the same search as with ``hf``, one
engine for every candidate and the held-out scores, staged fitness included."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_evolve.engines.vllm_engine import vllm_available

REPO = Path(__file__).resolve().parent.parent
GEN_TOY_DIR = REPO / ".cache" / "gen_toy"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_available(), reason="vllm is not installed"),
]


def gen_run_config(paths: dict[str, Path], output: Path, backend: str) -> dict:
    """A linear merge of the generation toy's two models, searched on greedy
    exact-match answers in two stages."""
    gen = {"task": "toy_gen_fitness", "metric": "exact_match"}
    return {
        "name": f"gen-{backend}",
        "sources": {
            "models": [{"name": n, "path": str(p)} for n, p in paths.items()],
            "dtype": "float32",
        },
        "space": {
            "type": "parameter",
            "method": "linear",
            "granularity": "global",
            "parameters": {"weight": [0.0, 1.0]},
        },
        "optimizer": {"type": "cma", "population": 4, "max_evals": 12, "seed": 0},
        "fitness": {"tasks": [gen], "limit": 100, "stages": [{"subsample": 40}, {}]},
        "heldout": {"tasks": [gen], "limit": 60, "baselines": False},
        "evaluator": {"backend": backend, "vllm": {"max_model_len": 128}},
        "output": {"dir": str(output), "save_final": False, "plots": False},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    from mergekit_evolve import evaluator
    from mergekit_evolve.engines.gen_toy import build_gen_toy
    from mergekit_evolve.loading import parse_config
    from mergekit_evolve.loop import Evolution
    from mergekit_evolve.rundir import History

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = build_gen_toy(GEN_TOY_DIR, seed=0)
    root = tmp_path_factory.mktemp("backends")
    out = {}
    try:
        for backend in ("hf", "vllm"):
            data = gen_run_config(paths, root / backend, backend)
            config = parse_config(data, "t", None)
            summary = Evolution(config).run()
            out[backend] = (summary, History(root / backend).read())
        out["engines"] = [b.engine_starts for b in evaluator._VLLM_BACKENDS.values()]
    finally:
        evaluator.close_vllm_backends()
        torch.set_num_threads(threads)
    return out


def test_a_vllm_run_searches_as_the_hf_run_does(runs):
    (hf_summary, hf), (vllm_summary, vllm) = runs["hf"], runs["vllm"]
    assert [r.index for r in vllm] == [r.index for r in hf]
    # Greedy answers agree, so each candidate's stages and fitness do too, and the
    # search takes the same path.
    for a, b in zip(hf, vllm, strict=True):
        assert a.genome == b.genome
        assert b.fitness == pytest.approx(a.fitness, abs=0.01)
        assert a.screened == b.screened
    assert {round(r.fitness, 3) for r in hf} != {round(hf[0].fitness, 3)}
    assert vllm_summary["heldout"]["best"] == hf_summary["heldout"]["best"]
    assert vllm_summary["heldout"]["sources"] == hf_summary["heldout"]["sources"]


def test_one_engine_start_serves_every_candidate_and_the_heldout_scores(runs):
    assert runs["engines"] == [1]
