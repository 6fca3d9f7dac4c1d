"""Candidate throughput: the naive pipeline, in-process builds, and Ray workers.

    python benchmarks/throughput.py                 # the toy zoo on CPU (~2-4 minutes)
    python benchmarks/throughput.py --cuda          # the same on the GPU
    python benchmarks/throughput.py --cuda --mistral7b /data/mistral7b  # 7B-shaped

One run measures, on the same candidates of the toy demo's search space (per-layer
task-arithmetic weights of two experts over a base):

(a) the naive pipeline: ``mergekit-yaml`` writes the merge to disk, then the ``lm_eval``
    CLI scores it, both as subprocesses (what a shell script around the tools does);
(b) in-process, on-disk builds: ``run_merge`` into a temporary directory, loaded and
    scored with one reused task dict;
(c) in-process, in-memory builds: the merged tensors are copied into one preallocated
    model and scored with one reused lm-eval wrapper (the default);

the split of (b) and (c) between building and scoring; the in-memory build time over
the time to read every source tensor once (the floor: a build must read each source
tensor at least once); and candidates per minute with Ray at 1 and 2 workers (one CPU
each, or one GPU each with ``--cuda``). The last line printed is one JSON object.

``--mistral7b DIR`` creates three Mistral-7B-shaped models with random weights in DIR
(about 14.5 GB each in bfloat16; no hub access) and benchmarks them instead of the toy
zoo; it is meant for a GPU machine.
"""

from __future__ import annotations

import os

# Before transformers, datasets and lm-eval are imported, here and in the subprocesses
# (which inherit the environment): no hub, no per-call progress bars.
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
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FITNESS_TASK = "toy_ja_sub_fitness"
# Mistral-7B-v0.1's shape (its config.json, weights not needed).
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def log(message: str) -> None:
    print(message, flush=True)


# -- the models and the search space ---------------------------------------------------


def make_random_mistral(
    out_dir: Path, shape: dict[str, Any], seed: int, tokenizer_dir: Path, device: str
) -> Path:
    """A Mistral model of ``shape`` with random bfloat16 weights, plus a tokenizer.

    The toy zoo's character tokenizer goes in, padded with unused tokens to the
    model's vocabulary size (a tokenizer shorter than the vocabulary makes mergekit
    shrink the embeddings), so the toy tasks run on the 7B shape: the scores mean
    nothing, only time is measured.
    """
    import torch
    import transformers

    if (out_dir / "config.json").is_file():
        return out_dir
    config = transformers.MistralConfig(
        **{k: v for k, v in shape.items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.MistralForCausalLM._from_config(
            config, dtype=torch.bfloat16
        )
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp / name)
    tokenizer = json.loads(
        (tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8")
    )
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"<unused_{i}>": i for i in range(len(vocab), shape["vocab_size"])})
    (tmp / "tokenizer.json").write_text(
        json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8"
    )
    del model
    tmp.rename(out_dir)  # complete models only: an interrupted run starts over
    return out_dir


def source_models(args: argparse.Namespace) -> tuple[dict[str, Path], str]:
    """``{name: dir}`` of base and two experts, and their dtype."""
    from mergekit_evolve.toy import build_zoo

    zoo = build_zoo(args.zoo, seed=0)
    if not args.mistral7b:
        return {
            "base": Path(zoo["base"]),
            "math": Path(zoo["math"]),
            "ja": Path(zoo["ja"]),
        }, "float32"
    root = Path(args.mistral7b)
    root.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.cuda else "cpu"
    models = {}
    for seed, name in enumerate(["base", "a", "b"]):
        log(f"creating random Mistral-7B-shaped model {root / name} (once)")
        models[name] = make_random_mistral(
            root / name, MISTRAL_7B, seed, Path(zoo["base"]), device
        )
    return models, "bfloat16"


def run_config(
    models: dict[str, Path],
    dtype: str,
    args: argparse.Namespace,
    out: Path,
    ray_workers: int = 0,
):
    """The toy demo's search (per-layer task-arithmetic weights) over ``models``, with
    the serial runner or ``ray_workers`` Ray workers."""
    from mergekit_evolve.loading import parse_config

    fitness: dict[str, Any] = {
        "tasks": [{"task": FITNESS_TASK, "metric": "acc"}],
        "batch_size": args.batch_size,
    }
    if args.limit:
        fitness["limit"] = args.limit
    data = {
        "name": "throughput",
        "sources": {
            "models": [{"name": n, "path": str(p)} for n, p in models.items()],
            "base_model": "base",
            "dtype": dtype,
            "tokenizer_source": None
            if args.tokenizer_source == "none"
            else args.tokenizer_source,
        },
        "space": {
            "type": "parameter",
            "method": "task_arithmetic",
            "granularity": "layer",
            "embeddings": True,
            "parameters": {"weight": [0.0, 2.0]},
        },
        "optimizer": {"type": "cma", "population": 10, "seed": 0},
        "fitness": fitness,
        "heldout": {"tasks": []},
        "builder": {"cuda": args.cuda},
        "runner": {"type": "ray", "workers": ray_workers, "cpus_per_worker": 1}
        if ray_workers
        else {},
        "output": {"dir": str(out / "run"), "save_final": False, "plots": False},
    }
    return parse_config(data, source="benchmark", base_dir=None)


def genomes(dim: int, count: int, seed: int = 0) -> list[tuple[float, ...]]:
    """Genomes around the demo's starting point (CMA-ES samples x0 = 0.5, sigma 1/6)."""
    rng = np.random.default_rng(seed)
    return [
        tuple(float(v) for v in np.clip(rng.normal(0.5, 1 / 6, dim), 0, 1))
        for _ in range(count)
    ]


# -- (a) the naive pipeline ------------------------------------------------------------


def naive_candidate(
    space, genome, args: argparse.Namespace, work: Path, dtype: str
) -> dict[str, float]:
    """``mergekit-yaml`` then the ``lm_eval`` CLI, as subprocesses; seconds and
    fitness."""
    from mergekit_evolve.tasks import project_task_dir

    bin_dir = Path(sys.executable).parent
    config_file, model_dir, results_dir = (
        work / "merge.yml",
        work / "merged",
        work / "lm_eval",
    )
    for path in (model_dir, results_dir):
        shutil.rmtree(path, ignore_errors=True)
    config_file.write_text(space.decode(np.array(genome)).to_yaml(), encoding="utf-8")
    merge = [
        str(bin_dir / "mergekit-yaml"),
        str(config_file),
        str(model_dir),
        "--copy-tokenizer",
        "--no-write-model-card",
    ]
    if args.cuda:
        merge += ["--cuda", "--read-to-gpu"]
    evaluate = [
        str(bin_dir / "lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype={dtype}",
        "--tasks",
        FITNESS_TASK,
        "--include_path",
        str(project_task_dir()),
        "--batch_size",
        str(args.batch_size),
        "--device",
        "cuda" if args.cuda else "cpu",
        "--output_path",
        str(results_dir),
    ]
    if args.limit:
        evaluate += ["--limit", str(args.limit)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run(merge, check=True, capture_output=True, env=env)
    merged = time.perf_counter()
    subprocess.run(evaluate, check=True, capture_output=True, env=env)
    done = time.perf_counter()
    [results_file] = results_dir.rglob("results_*.json")
    acc = json.loads(results_file.read_text(encoding="utf-8"))["results"][FITNESS_TASK][
        "acc,none"
    ]
    return {
        "build": merged - start,
        "eval": done - merged,
        "total": done - start,
        "fitness": float(acc),
    }


# -- (b), (c) in process ---------------------------------------------------------


def in_process(config, sources, space, genome_list, in_memory: bool) -> dict[str, Any]:
    """Seconds per candidate with one Worker (the first candidate warms it up and is
    not timed: it allocates the model and the lm-eval wrapper)."""
    from mergekit_evolve.state import Candidate
    from mergekit_evolve.worker import make_worker

    config = config.with_overrides(**{"builder.in_memory": in_memory})
    worker = make_worker(config, sources, space)
    results = []
    for i, genome in enumerate(genome_list):
        result = worker.evaluate(Candidate(i, 0, genome))
        if not result.ok:
            raise SystemExit(f"candidate {i} failed: {result.error}")
        results.append(result)
    timed = results[1:]
    build = statistics.fmean(r.build_seconds for r in timed)
    score = statistics.fmean(r.eval_seconds for r in timed)
    return {
        "build": build,
        "eval": score,
        "total": build + score,
        "fitness": [r.fitness for r in results],
    }


def read_floor(sources, device: str) -> float:
    """Seconds to read every source tensor once into memory (page cache warm: the
    first pass is not timed), the least any build of these sources can take."""
    import torch
    from safetensors.torch import load_file

    files = [
        f for m in sources.models for f in sorted(Path(m.path).glob("*.safetensors"))
    ]
    if not files:
        raise SystemExit("the source models have no .safetensors files")
    times = []
    for _ in range(3):  # pass 1 warms the page cache; keep the best of the others
        start = time.perf_counter()
        for f in files:
            tensors = load_file(str(f), device=device)
            del tensors
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


# -- Ray -----------------------------------------------------------------------


def ray_throughput(
    models, dtype, args, out: Path, sources, space, worker_counts: list[int]
) -> dict[int, dict[str, float]]:
    """Candidates per minute with each of ``worker_counts`` Ray workers.

    All runners are started together (their actors sit idle while another one is
    timed) and timed in alternating rounds, so a change in the machine's background
    load hits every configuration alike. Each worker first builds one untimed
    candidate (model allocated, wrapper made).
    """
    from contextlib import ExitStack

    from mergekit_evolve.runners.ray import RayRunner
    from mergekit_evolve.state import Candidate

    rounds = max(1, args.ray_rounds)
    per_round = max(1, args.ray_candidates // rounds)
    pool = genomes(space.dim, per_round, seed=1)
    timed: dict[int, dict[str, float]] = {
        w: {"seconds": 0.0, "busy": 0.0, "count": 0} for w in worker_counts
    }
    with ExitStack() as stack:
        runners = {}
        for workers in worker_counts:
            runner = stack.enter_context(
                RayRunner(
                    run_config(models, dtype, args, out, ray_workers=workers), sources
                )
            )
            list(
                runner.evaluate(
                    [Candidate(i, 0, pool[i % len(pool)]) for i in range(workers)]
                )
            )
            runners[workers] = runner
        for _ in range(rounds):
            for workers, runner in runners.items():
                todo = [Candidate(i, 0, g) for i, g in enumerate(pool)]
                busy_before = runner.busy_seconds
                start = time.perf_counter()
                results = list(runner.evaluate(todo))
                timed[workers]["seconds"] += time.perf_counter() - start
                timed[workers]["busy"] += runner.busy_seconds - busy_before
                timed[workers]["count"] += len(results)
                failed = [r for r in results if not r.ok]
                if failed:
                    raise SystemExit(
                        f"Ray candidate {failed[0].index} failed: {failed[0].error}"
                    )
    return {
        w: {
            "cpm": 60 * t["count"] / t["seconds"],
            "idle_fraction": max(0.0, 1 - t["busy"] / (w * t["seconds"])),
        }
        for w, t in timed.items()
    }


# -- main ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--zoo",
        default=str(REPO / ".cache" / "toy_zoo"),
        help="toy zoo directory (built if missing)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=20,
        help="in-process candidates per mode (plus one warm-up)",
    )
    parser.add_argument(
        "--naive-candidates",
        type=int,
        default=2,
        help="candidates through the naive pipeline",
    )
    parser.add_argument(
        "--ray-candidates",
        type=int,
        default=60,
        help="timed candidates per Ray configuration",
    )
    parser.add_argument(
        "--ray-rounds",
        type=int,
        default=3,
        help="alternating timed rounds of the Ray configurations",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="score only the first N documents of the fitness task",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="lm-eval batch size (in process and naive)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in process and in the naive subprocesses "
        "(a Ray worker gets 1 per CPU)",
    )
    parser.add_argument(
        "--tokenizer-source",
        choices=["base", "none"],
        default="base",
        help="sources.tokenizer_source: 'base' (the default of run configs) makes "
        "mergekit re-index the embeddings on every build (~4 s at a 32k vocabulary); "
        "'none' skips it",
    )
    parser.add_argument(
        "--cuda", action="store_true", help="merge and evaluate on the GPU"
    )
    parser.add_argument(
        "--mistral7b",
        metavar="DIR",
        help="create 3 random Mistral-7B-shaped models in DIR and use them",
    )
    parser.add_argument(
        "--no-ray", dest="ray", action="store_false", help="skip the Ray measurements"
    )
    parser.add_argument(
        "--no-naive", dest="naive", action="store_false", help="skip the naive pipeline"
    )
    parser.add_argument(
        "--work-dir", help="scratch directory (default: a new temporary one)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("lm_eval", "lm-eval", "mergekit", "transformers", "datasets", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # mergekit logs through the root logger
    import torch

    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: torch sees no GPU")
    # Same thread count on every path: more torch threads than free cores makes torch
    # spin and wait (8x slower evaluation measured on a busy 2-core machine).
    torch.set_num_threads(args.threads)
    device = "cuda" if args.cuda else "cpu"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mergekit-evolve-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    from mergekit_evolve.sources import load_sources
    from mergekit_evolve.spaces import make_space

    models, dtype = source_models(args)
    config = run_config(models, dtype, args, work)
    sources = load_sources(config.sources)
    space = make_space(config.space, sources, config.dtype)
    genome_list = genomes(space.dim, args.candidates + 1)
    cpu = f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    where = torch.cuda.get_device_name() if args.cuda else f"CPU ({cpu})"
    log(
        f"sources: {', '.join(str(p) for p in models.values())} ({dtype}); "
        f"{space.dim} genes; device {where}"
    )
    out: dict[str, Any] = {
        "device": where,
        "dtype": dtype,
        "genes": space.dim,
        "models": "mistral-7b-shaped" if args.mistral7b else "toy_zoo",
        "threads": args.threads,
        "load_avg_at_start": load,
    }

    naive = None
    if args.naive:
        log(
            "(a) naive pipeline: mergekit-yaml + lm_eval CLI, "
            f"{args.naive_candidates} candidates ..."
        )
        runs = [
            naive_candidate(space, genome_list[i], args, work, dtype)
            for i in range(args.naive_candidates)
        ]
        naive = {
            k: statistics.fmean(r[k] for r in runs) for k in ("build", "eval", "total")
        }
        log(
            f"    {naive['total']:.2f} s/candidate "
            f"(mergekit-yaml {naive['build']:.2f} s, lm_eval {naive['eval']:.2f} s)"
        )
        out.update(
            naive_s=naive["total"],
            naive_build_s=naive["build"],
            naive_eval_s=naive["eval"],
        )

    log(f"(b) in-process, on-disk builds: {args.candidates} candidates ...")
    ondisk = in_process(config, sources, space, genome_list, in_memory=False)
    log(
        f"    {ondisk['total']:.3f} s/candidate "
        f"(build {ondisk['build']:.3f} s, eval {ondisk['eval']:.3f} s)"
    )
    log(f"(c) in-process, in-memory builds: {args.candidates} candidates ...")
    inmemory = in_process(config, sources, space, genome_list, in_memory=True)
    log(
        f"    {inmemory['total']:.3f} s/candidate "
        f"(build {inmemory['build']:.3f} s, eval {inmemory['eval']:.3f} s)"
    )
    # The three paths must score the same merge alike, or the comparison is moot.
    agree = np.allclose(ondisk["fitness"], inmemory["fitness"], atol=1e-6)
    if naive is not None:
        agree = agree and np.allclose(
            [r["fitness"] for r in runs], inmemory["fitness"][: len(runs)], atol=1e-6
        )
    log(f"    same fitness on every path: {agree}")

    floor = read_floor(sources, device)
    log(
        f"floor: reading every source tensor once takes {floor:.4f} s; "
        f"in-memory build = {inmemory['build'] / floor:.1f} x floor"
    )
    out.update(
        ondisk_s=ondisk["total"],
        ondisk_build_s=ondisk["build"],
        ondisk_eval_s=ondisk["eval"],
        inmemory_s=inmemory["total"],
        inmemory_build_s=inmemory["build"],
        inmemory_eval_s=inmemory["eval"],
        floor_s=floor,
        build_over_floor=inmemory["build"] / floor,
        fitness_agree=bool(agree),
        speedup=(naive["total"] / inmemory["total"]) if naive else None,
    )
    if naive:
        log(
            f"speedup: naive / in-memory = {out['speedup']:.0f}x; "
            f"naive / on-disk = {naive['total'] / ondisk['total']:.0f}x"
        )

    if args.ray:
        import ray

        per = "GPU" if args.cuda else "CPU"
        available = torch.cuda.device_count() if args.cuda else 2
        counts = [w for w in (1, 2) if w <= available]
        # One local Ray for every runner: the actors of all of them at once (1 + 2
        # logical CPUs on 2 cores is fine: only the runner being timed is busy). GPUs
        # cannot be overbooked that way (Ray would hand out device ids that do not
        # exist).
        gpus = {"num_gpus": available} if args.cuda else {}
        ray.init(
            address="local",
            num_cpus=sum(counts),
            object_store_memory=128 * 2**20,
            include_dashboard=False,
            logging_level=logging.WARNING,
            **gpus,
        )
        log(
            f"Ray with {' and '.join(map(str, counts))} worker(s), 1 {per} each: "
            f"{args.ray_candidates} candidates each, "
            f"in {args.ray_rounds} alternating rounds ..."
        )
        try:
            if args.cuda and sum(counts) > available:
                # Not enough GPUs for all runners at once: one after the other.
                got = {}
                for w in counts:
                    got.update(
                        ray_throughput(models, dtype, args, work, sources, space, [w])
                    )
            else:
                got = ray_throughput(models, dtype, args, work, sources, space, counts)
        finally:
            ray.shutdown()
        for workers in (1, 2):
            if workers in got:
                log(
                    f"    {workers} worker(s): "
                    f"{got[workers]['cpm']:.0f} candidates/min, "
                    f"workers idle {100 * got[workers]['idle_fraction']:.1f}%"
                )
            else:
                log(f"    {workers} workers: skipped (only {available} {per}s)")
            out[f"ray{workers}_cpm"] = got[workers]["cpm"] if workers in got else None
            out[f"ray{workers}_idle_fraction"] = (
                got[workers]["idle_fraction"] if workers in got else None
            )
        out["ray_speedup"] = (
            out["ray2_cpm"] / out["ray1_cpm"]
            if out["ray1_cpm"] and out["ray2_cpm"]
            else None
        )
        if out["ray_speedup"]:
            log(f"Ray speedup, 2 workers / 1 worker: {out['ray_speedup']:.2f}x")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    out["load_avg_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
    print(json.dumps(rounded), flush=True)
    return rounded


if __name__ == "__main__":
    main()
