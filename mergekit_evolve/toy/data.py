"""Problems, answer formats and fixed splits of the toy Japanese-arithmetic world.

Prompts are ``"47-12="`` or ``"12+34="``; answers end with a newline (the end marker
that makes exact match strict: ``"12"`` does not match ``"123"``). A Japanese answer
writes each digit as a numeral (``35`` -> ``三五``). Operands are two-digit numbers;
subtraction keeps ``a >= b``.

Marked prompts (the Pareto toy) name the wanted answer form before ``=``:
``"47-12a="`` asks for ASCII digits, ``"47-12j="`` for Japanese numerals, so one model
can hold every (operator, form) skill at once.

The evaluation splits are fixed (seed :data:`SPLIT_SEED`, independent of the zoo's
training seed) and every training set excludes them, so each lm-eval task is held out
from every model in the zoo.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mergekit_evolve.toy.tokenizer import JA_DIGITS

__all__ = [
    "FORM_MARKERS",
    "SPLIT_SEED",
    "SPLIT_SIZE",
    "TASKS",
    "TASK_SPLITS",
    "ToyTask",
    "to_ja",
    "prompt",
    "answer",
    "add_pairs",
    "sub_pairs",
    "split_pairs",
    "task_docs",
    "write_task_data",
]

SPLIT_SEED = 20240319
"""Seed of the evaluation splits; fixed so committed task data never changes."""

SPLIT_SIZE = 200
"""Problems per evaluation split."""

Pair = tuple[int, int]

_TRANS = str.maketrans("0123456789", JA_DIGITS)

FORM_MARKERS = {"ascii": "a", "ja": "j"}
"""Marked prompts: the character before ``=`` that names the answer script."""


@dataclass(frozen=True)
class ToyTask:
    """One toy lm-eval task.

    Attributes:
        op: ``"+"`` or ``"-"``.
        script: Answer script, ``"ascii"`` or ``"ja"``.
        split: The key of :func:`split_pairs` whose problems it asks.
        folder: The task folder under ``evals/`` that holds it.
        marked: Whether prompts name the answer script (:data:`FORM_MARKERS`).
    """

    op: str
    script: str
    split: str
    folder: str = "toy_ja_math"
    marked: bool = False


TASKS: dict[str, ToyTask] = {
    "toy_ja_sub_fitness": ToyTask("-", "ja", "sub_fitness"),
    "toy_ja_sub_heldout": ToyTask("-", "ja", "sub_heldout"),
    "toy_sub_ascii": ToyTask("-", "ascii", "sub_ascii"),
    "toy_add_ja": ToyTask("+", "ja", "add_ja"),
    # The Pareto toy: the target and each expert's skill, fitness and held-out splits.
    "toy_pareto_ja_sub_fitness": ToyTask("-", "ja", "sub_fitness", "toy_pareto", True),
    "toy_pareto_sub_ascii_fitness": ToyTask(
        "-", "ascii", "sub_ascii_fitness", "toy_pareto", True
    ),
    "toy_pareto_add_ja_fitness": ToyTask(
        "+", "ja", "add_ja_fitness", "toy_pareto", True
    ),
    "toy_pareto_ja_sub_heldout": ToyTask("-", "ja", "sub_heldout", "toy_pareto", True),
    "toy_pareto_sub_ascii": ToyTask("-", "ascii", "sub_ascii", "toy_pareto", True),
    "toy_pareto_add_ja": ToyTask("+", "ja", "add_ja", "toy_pareto", True),
}
"""Every toy lm-eval task by name."""

TASK_SPLITS: dict[str, tuple[str, str, str]] = {
    name: (t.op, t.script, t.split)
    for name, t in TASKS.items()
    if t.folder == "toy_ja_math"
}
"""The demo's tasks (``evals/toy_ja_math``): operator, answer script and split."""


def to_ja(text: str) -> str:
    """Write every ASCII digit of ``text`` as a Japanese numeral (``"305"`` ->
    ``"三〇五"``)."""
    return text.translate(_TRANS)


def prompt(a: int, op: str, b: int, form: str | None = None) -> str:
    """The question text, for example ``"47-12="``.

    Args:
        a: First operand.
        op: ``"+"`` or ``"-"``.
        b: Second operand.
        form: ``None`` for a plain prompt, or the wanted answer script (``"ascii"``
            or ``"ja"``), marked before ``=`` (``"47-12j="``).

    Returns:
        The prompt text.
    """
    return f"{a}{op}{b}{FORM_MARKERS[form] if form else ''}="


def answer(a: int, op: str, b: int, script: str = "ascii") -> str:
    """The exact expected answer, newline-terminated.

    Args:
        a: First operand.
        op: ``"+"`` or ``"-"``.
        b: Second operand.
        script: ``"ascii"`` or ``"ja"`` (every digit as a Japanese numeral).

    Returns:
        The answer text, for example ``"35\\n"`` or ``"三五\\n"``.

    Raises:
        ValueError: For an unknown operator or script.
    """
    if op == "+":
        value = str(a + b)
    elif op == "-":
        value = str(a - b)
    else:
        raise ValueError(f"operator must be '+' or '-', got {op!r}")
    if script == "ascii":
        return value + "\n"
    if script == "ja":
        return to_ja(value) + "\n"
    raise ValueError(f"script must be 'ascii' or 'ja', got {script!r}")


def add_pairs() -> list[Pair]:
    """All two-digit addition problems (8,100)."""
    return [(a, b) for a in range(10, 100) for b in range(10, 100)]


def sub_pairs() -> list[Pair]:
    """All two-digit subtraction problems with ``a >= b`` (4,095)."""
    return [(a, b) for a in range(10, 100) for b in range(10, a + 1)]


def split_pairs() -> dict[str, list[Pair]]:
    """The fixed, disjoint evaluation splits and the training pools that exclude them.

    Returns:
        ``sub_fitness``, ``sub_heldout``, ``sub_ascii``, ``sub_ascii_fitness``
        (subtraction, disjoint), ``add_ja``, ``add_ja_fitness`` (addition);
        ``sub_train`` / ``add_train``: every pair outside the demo's task splits;
        ``sub_train_pareto`` / ``add_train_pareto``: every pair outside all of them.
    """
    rng = random.Random(SPLIT_SEED)
    subs = sub_pairs()
    rng.shuffle(subs)
    adds = add_pairs()
    rng.shuffle(adds)
    n = SPLIT_SIZE
    # New splits are cut after the old ones, so committed task data never changes,
    # and the demo's pools stay as they were: its zoo depends on their exact order
    # (from these pools, seed 0: 93.5 held-out; from the smaller ones: 58.5).
    return {
        "sub_fitness": subs[:n],
        "sub_heldout": subs[n : 2 * n],
        "sub_ascii": subs[2 * n : 3 * n],
        "sub_ascii_fitness": subs[3 * n : 4 * n],
        "sub_train": subs[3 * n :],
        "sub_train_pareto": subs[4 * n :],
        "add_ja": adds[:n],
        "add_ja_fitness": adds[n : 2 * n],
        "add_train": adds[n:],
        "add_train_pareto": adds[2 * n :],
    }


def task_docs(task: str) -> list[dict[str, str | int]]:
    """The documents of one toy lm-eval task.

    Args:
        task: A key of :data:`TASKS`.

    Returns:
        Dicts with ``question``, ``answer``, ``a`` and ``b``.

    Raises:
        ValueError: For an unknown task name.
    """
    if task not in TASKS:
        raise ValueError(f"unknown toy task {task!r}; expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    form = spec.script if spec.marked else None
    return [
        {
            "question": prompt(a, spec.op, b, form),
            "answer": answer(a, spec.op, b, spec.script),
            "a": a,
            "b": b,
        }
        for a, b in split_pairs()[spec.split]
    ]


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_task_data(directory: str | Path, folder: str = "toy_ja_math") -> list[Path]:
    """Write ``<task>.jsonl`` for every toy task of one folder (regenerates
    ``evals/<folder>/data``).

    Args:
        directory: Output folder, created if missing.
        folder: Which tasks: those whose :attr:`ToyTask.folder` is this.

    Returns:
        The written files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for task in (name for name, t in TASKS.items() if t.folder == folder):
        path = directory / f"{task}.jsonl"
        _write_jsonl(path, task_docs(task))
        out.append(path)
    return out
