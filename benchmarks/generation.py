"""Generation-heavy fitness: lm-eval's HF model vs a warm vLLM engine, same candidates.

    OMP_NUM_THREADS=1 python benchmarks/generation.py        # CPU, ~27M parameters
    python benchmarks/generation.py --cuda                   # the same on a GPU
    python benchmarks/generation.py --cuda --mistral7b       # a 7B-sized model

The generation toy's two trained models (``fwd``, ``bwd``: 356k parameters, head_dim
32; see ``mergekit_evolve.engines.gen_toy``) are widened to a larger shape that
computes the same function (every matrix has the large shape and is dense: the
padding gets small seeded noise; heads are widened to head_dim 64, the size of most
small real models', with rotary frequencies that keep the function), so greedy
answers are peaked, as a trained model's are, and the backends can be compared token
for token. Candidates are linear merges
``w * fwd + (1 - w) * bwd``. Each candidate is scored on 128 prompts of 4-27 tokens
(so batched HF generation pads as with real prompts; greedy, exact match) of
``--task``:

* ``toy_gen_varied`` (default): each answer stops at its first ``z``, 0 to 64
  letters (23 on average), as a reasoning answer stops where its reasoning ends;
* ``toy_gen_long``: every answer is 64 letters,

by

* lm-eval's ``HFLM`` over the in-memory model (Hugging Face ``generate`` in fixed
  batches of ``--hf-batch-size``, by default the evaluator's own default, 32): what
  the ``hf`` backend does;
* :class:`~mergekit_evolve.engines.vllm_engine.VllmBackend`: one vLLM engine with
  the product's default settings (eager on CPU; ``--vllm-compile`` compiles it),
  started once; each candidate's weights swapped in place, then the same lm-eval
  task.

Candidates alternate between the backends, so a change in the machine's load hits
both alike; the first candidate warms both up and is reported apart
(``first_candidate_*_s``). The last line printed is one JSON object: ``hf_s`` and
``vllm_s`` (seconds per timed candidate, engine start excluded and reported as
``engine_start_s``;
``vllm_s`` includes the swap, also reported alone as ``swap_s``), ``vllm_speedup``,
``agree`` (fraction of greedy answers identical between the backends),
``engine_starts`` and the machine's load (1-minute average at the start and the
end). ``hf_cpu_s`` and ``vllm_cpu_s`` are the same runs' process CPU seconds: on a
shared machine they show what the load did to the wall times.

``--mistral7b`` widens to a 7B size (hidden 4096, 32 layers, MLP 14336, head_dim
128, bfloat16; about 7.3B parameters, 15 GB) for a GPU with room for the HF model
and the engine side by side.
"""

from __future__ import annotations

import os

# Before transformers, datasets and lm-eval are imported: no hub, no progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TASKS = ("toy_gen_varied", "toy_gen_long")
# (hidden, layers, intermediate, head_dim, noise) of the widened models.
SHAPES = {
    "cpu": (512, 8, 1536, 64, 2e-3),  # ~27M parameters
    "mistral7b": (4096, 32, 14336, 128, 0.0),  # ~7.3B parameters
}


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--toy", default=str(REPO / ".cache" / "gen_toy"), help="gen toy folder"
    )
    parser.add_argument(
        "--weights",
        default="1.0,0.9,0.8,0.7,0.6",
        help="candidates: merge weights w of w*fwd + (1-w)*bwd (comma-separated); "
        "the first one warms both backends up and is not timed",
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=TASKS[0],
        help="toy_gen_varied: answers stop at their first 'z' (0-64 letters, as "
        "reasoning answers vary); toy_gen_long: every answer 64 letters",
    )
    parser.add_argument("--prompts", type=int, default=128, help="prompts per task")
    parser.add_argument(
        "--hf-batch-size", type=int, default=32, help="HFLM generation batch"
    )
    parser.add_argument(
        "--head-dim",
        type=int,
        default=None,
        help="head size of the widened model (default: 64 on CPU, 128 for 7B)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (CPU; both backends)"
    )
    parser.add_argument(
        "--vllm-compile",
        action="store_true",
        help="compile the model at engine start (torch.compile) instead of "
        "VllmSettings' CPU default, eager (GPUs use CUDA graphs either way)",
    )
    parser.add_argument("--cuda", action="store_true", help="run on the GPU")
    parser.add_argument(
        "--mistral7b", action="store_true", help="a 7B-sized model (needs --cuda)"
    )
    return parser.parse_args(argv)


def widened_models(
    args: argparse.Namespace, work: Path
) -> tuple[dict[str, Any], dict[str, Any], Any, Path, Any]:
    """The two widened state dicts, their config, a model folder (fwd) to start the
    engine from, and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_evolve.engines.gen_toy import build_gen_toy, save_model, widen_llama

    toy = build_gen_toy(args.toy, seed=0)
    hidden, layers, intermediate, head_dim, noise = SHAPES[
        "mistral7b" if args.mistral7b else "cpu"
    ]
    head_dim = args.head_dim or head_dim
    states, config = {}, None
    for name in ("fwd", "bwd"):
        small = AutoModelForCausalLM.from_pretrained(toy[name])
        # The same noise seed for both: widening then commutes with merging.
        states[name], config = widen_llama(
            small.state_dict(),
            small.config,
            hidden,
            layers,
            intermediate,
            noise,
            seed=0,
            head_dim=head_dim,
        )
    dtype = torch.bfloat16 if args.mistral7b else torch.float32
    config.dtype = dtype
    states = {n: {k: v.to(dtype) for k, v in s.items()} for n, s in states.items()}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(states["fwd"])
    engine_dir = save_model(model, work / "fwd")
    tokenizer = AutoTokenizer.from_pretrained(engine_dir)
    return states, config, engine_dir, model, tokenizer


def clocks() -> tuple[float, float]:
    """Wall and process CPU seconds (all threads): on a shared machine the CPU time
    shows what the load did to the wall time."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def score(
    lm: Any, task_dict: dict, limit: int, task: str
) -> tuple[float, list[str], tuple[float, float]]:
    """Fitness, the greedy answers in document order, and (wall, CPU) seconds."""
    import torch
    from lm_eval.evaluator import evaluate

    start = clocks()
    with torch.no_grad():
        out = evaluate(
            lm=lm,
            task_dict=task_dict,
            limit=limit,
            bootstrap_iters=0,
            log_samples=True,
            verbosity="ERROR",
        )
    seconds = since(start)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    answers = [s["filtered_resps"][0] for s in samples]
    return float(out["results"][task]["exact_match,none"]), answers, seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    if args.mistral7b and not args.cuda:
        raise SystemExit("--mistral7b needs --cuda")
    device = "cuda" if args.cuda else "cpu"

    from lm_eval.models.huggingface import HFLM

    from mergekit_evolve.engines.gen_toy import interpolate
    from mergekit_evolve.engines.vllm_engine import VllmBackend, VllmSettings
    from mergekit_evolve.evaluator import _quiet
    from mergekit_evolve.tasks import task_manager_for

    weights = [float(w) for w in args.weights.split(",")]
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="gen-bench-"))
    try:
        states, config, engine_dir, model, tokenizer = widened_models(args, work)
        model.to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        log(
            f"model: {params / 1e6:.1f}M parameters, hidden {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, head_dim {config.head_dim}, "
            f"{args.prompts} prompts x up to 64 new tokens ({args.task}), "
            f"candidates w={weights}"
        )
        task_dict = task_manager_for([args.task]).load([args.task])
        hf = _quiet(HFLM)(
            pretrained=model, tokenizer=tokenizer, batch_size=args.hf_batch_size
        )

        start = time.perf_counter()
        import vllm  # noqa: F401  (import time reported on its own)

        import_s = time.perf_counter() - start
        # enforce_eager None: the platform's default (eager on CPU, graphs on GPU).
        settings = VllmSettings(
            max_model_len=128, enforce_eager=False if args.vllm_compile else None
        )
        start = time.perf_counter()
        backend = VllmBackend(settings, engine_dir, tokenizer)
        engine_start_s = time.perf_counter() - start
        log(f"vLLM: import {import_s:.1f}s, engine start {engine_start_s:.1f}s")

        rows = []
        for w in weights:
            with torch.no_grad():
                model.load_state_dict(interpolate(states["fwd"], states["bwd"], w))
            hf_fit, hf_answers, (hf_s, hf_cpu_s) = score(
                hf, task_dict, args.prompts, args.task
            )
            start = clocks()
            lm = backend.lm_for(model)
            swap_s, swap_cpu_s = since(start)
            v_fit, v_answers, (v_eval_s, v_cpu_s) = score(
                lm, task_dict, args.prompts, args.task
            )
            same = sum(a == b for a, b in zip(hf_answers, v_answers, strict=True))
            rows.append(
                {
                    "w": w,
                    "hf_s": hf_s,
                    "vllm_s": swap_s + v_eval_s,
                    "hf_cpu_s": hf_cpu_s,
                    "vllm_cpu_s": swap_cpu_s + v_cpu_s,
                    "swap_s": swap_s,
                    "swap": backend.engine.last_swap,
                    "fitness_hf": hf_fit,
                    "fitness_vllm": v_fit,
                    "agree": same / len(hf_answers),
                    "answers": len(hf_answers),
                    # One token per letter (the toy's tokenizer is by character).
                    "answer_tokens": statistics.fmean(len(a) for a in hf_answers),
                }
            )
            log(
                f"w={w}: HF {hf_s:.1f}s fitness {hf_fit:.3f} | vLLM "
                f"{swap_s + v_eval_s:.1f}s (swap {swap_s:.3f}s, "
                f"{backend.engine.last_swap}) fitness {v_fit:.3f} | agree "
                f"{same}/{len(hf_answers)}"
            )
        engine_starts = backend.engine_starts
        backend.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # The first candidate pays one-off costs (vLLM's first generate compiles its
    # sampler helpers; lm-eval and torch warm up): timed separately, as in
    # throughput.py.
    timed = rows[1:] or rows
    hf_s = statistics.fmean(r["hf_s"] for r in timed)
    vllm_s = statistics.fmean(r["vllm_s"] for r in timed)
    result = {
        "hf_s": round(hf_s, 2),
        "vllm_s": round(vllm_s, 2),
        "vllm_speedup": round(hf_s / vllm_s, 2),
        "hf_cpu_s": round(statistics.fmean(r["hf_cpu_s"] for r in timed), 2),
        "vllm_cpu_s": round(statistics.fmean(r["vllm_cpu_s"] for r in timed), 2),
        "agree": round(
            sum(r["agree"] * r["answers"] for r in rows)
            / sum(r["answers"] for r in rows),
            4,
        ),
        "engine_starts": engine_starts,
        "engine_start_s": round(engine_start_s, 1),
        "vllm_import_s": round(import_s, 1),
        "swap_s": round(statistics.fmean(r["swap_s"] for r in timed), 3),
        "first_candidate_hf_s": round(rows[0]["hf_s"], 2),
        "first_candidate_vllm_s": round(rows[0]["vllm_s"], 2),
        "candidates": len(rows),
        "timed_candidates": len(timed),
        "task": args.task,
        "prompts": rows[0]["answers"],
        "max_new_tokens": 64,
        "mean_answer_tokens": round(
            statistics.fmean(r["answer_tokens"] for r in rows), 1
        ),
        "params_m": round(params / 1e6, 1),
        "head_dim": config.head_dim,
        "fitness_hf": [r["fitness_hf"] for r in rows],
        "fitness_vllm": [r["fitness_vllm"] for r in rows],
        "hf_batch_size": args.hf_batch_size,
        "vllm_enforce_eager": not (args.vllm_compile or args.cuda),
        "device": device,
        "threads": args.threads,
        "load_avg_1m_start": round(load_start, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
