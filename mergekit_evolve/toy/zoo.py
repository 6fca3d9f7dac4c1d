"""A tiny, offline model zoo whose experts compose only under a good merge recipe.

(One module, longer than most: the spec, the data and the training loop of one
builder that serves every zoo.)

Every zoo is three Llama models sharing one character-level tokenizer, trained by one
builder from a :class:`ZooSpec`:

* ``base``: 2-digit addition whose answers write each digit as a Japanese numeral with
  probability ``spec.base_ja_prob`` (greedy output stays ASCII), plus digit-to-numeral
  transliteration (``"47>四七"``);
* ``math``: ``base`` fine-tuned for subtraction answered in ASCII;
* ``ja``: ``base`` fine-tuned to answer addition in numerals.

The target skill, subtraction answered in numerals, belongs to neither expert. The
mixed-script base is what makes the two fine-tunes compose: both scripts are already
in its distribution, so each expert only shifts a few directions instead of
rewriting shared features (from plain bases every merge lost both skills).

The registered specs (:data:`ZOO_SPECS`):

* ``demo``: experts fine-tuned on all parameters (``configs/toy_ja_math.yml``);
* ``splice``: experts change only their decoder layers (embeddings, final norm and
  head frozen), so the good data-flow paths are layer splices
  (``configs/toy_splice.yml``);
* ``pareto``: prompts mark the wanted answer form (``"47-12j="``), so one model can
  hold both experts' skills and the target at once (``configs/toy_pareto.yml``); the
  base leans towards numerals after ``"j"`` and the math expert keeps that lean and
  addition, so the task vectors compose;
* ``demo_hd32``: the demo with 2 heads of 32 dimensions (vLLM's CPU attention
  refuses head_dim 16).

Training runs on one torch thread whatever the caller set, so a zoo is bit-identical
for a given seed and spec on one machine whatever the thread count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mergekit_evolve.toy.cache import build_atomically, is_built
from mergekit_evolve.toy.data import answer, prompt, split_pairs, to_ja
from mergekit_evolve.toy.tokenizer import EOS, PAD, VOCAB, make_tokenizer

if TYPE_CHECKING:
    import torch

__all__ = [
    "ZOO_VERSION",
    "ZOO_SPECS",
    "MODEL_NAMES",
    "ExpertSpec",
    "ZooSpec",
    "build_zoo",
    "get_spec",
    "make_tiny_random_llama",
    "zoo_model_configs",
]

logger = logging.getLogger(__name__)

ZOO_VERSION = 2
"""Bumped whenever the training code changes; a cached zoo with another version (or
another spec) is rebuilt. 2: one torch thread, eager attention in training."""

MODEL_NAMES = ("base", "math", "ja")

SEQ_LEN = 12  # longest example: "99+99j=一九八\n" is 11 tokens

Example = tuple[str, str]  # (prompt, answer); loss is taken on the answer only


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: ``base`` fine-tuned on one (operator, answer script) skill.

    Attributes:
        name: Model folder name.
        op: ``"+"`` or ``"-"``.
        script: Answer script, ``"ascii"`` or ``"ja"``.
        steps: Fine-tuning steps.
        lr: Peak learning rate (warmup, then cosine decay to zero).
        layers: The decoder layers ``[start, end)`` it trains (embeddings, final
            norm and head then stay frozen too); ``None``: as
            :attr:`ZooSpec.expert_trains` says.
        mix: Chance that a training answer writes one digit in the other script,
            as the base's answers do. Greedy output keeps ``script``, but the
            expert keeps reading the other script in its own answers (what a merge
            that must answer in the other script feeds it).
        both_forms: Marked prompts only: train on its operator asked in either
            script, each answered as its marker asks, so the expert learns to
            follow the marker (not to always answer in ``script``).
        base_style: Marked prompts only: ask with either marker and write each
            answer as the base writes answers after that marker
            (:attr:`ZooSpec.marker_ja_probs`; greedy output stays ASCII). The
            expert learns its operator without unlearning the base's weak
            marker-to-script habit, which another expert can then sharpen.
        replay: Share of training examples drawn from the base's own training
            data, so the expert keeps what the base knew (the math expert keeps
            addition, which a merge must still answer).
    """

    name: str
    op: str
    script: str
    steps: int
    lr: float
    layers: tuple[int, int] | None = None
    mix: float = 0.0
    both_forms: bool = False
    base_style: bool = False
    replay: float = 0.0


@dataclass(frozen=True)
class ZooSpec:
    """Everything that decides what a zoo's training produces, besides the seed.

    Recorded in ``zoo.json``: a cached zoo built from another spec is rebuilt.

    Attributes:
        hidden_size: Model width.
        num_layers: Decoder layers.
        intermediate_size: MLP width.
        num_heads: Attention heads (and key-value heads); head_dim is
            ``hidden_size // num_heads``.
        base_steps: Training steps of the base.
        base_lr: Peak learning rate of the base.
        experts: The fine-tunes of the base, in training order.
        expert_trains: ``"all"`` parameters, or only the decoder ``"layers"``
            (embeddings, final norm and head frozen).
        marked: Whether prompts name the wanted answer script before ``=``
            (``mergekit_evolve.toy.data.FORM_MARKERS``).
        batch_size: Examples per step.
        base_ja_prob: Chance that the base writes one answer digit as a numeral.
        translit_share: Fraction of base examples that are transliterations.
        pareto_pools: Train on pools that also exclude the Pareto toy's fitness
            splits (``mergekit_evolve.toy.data.split_pairs``); the demo keeps
            its original pools.
        marker_ja_probs: Marked prompts only: the base's chance of a numeral digit
            after the ``"a"`` and after the ``"j"`` marker (both below one half,
            so greedy output stays ASCII); ``None``: ``base_ja_prob`` after both,
            and the markers mean nothing to the base.
    """

    hidden_size: int = 64
    num_layers: int = 4
    intermediate_size: int = 256
    num_heads: int = 4
    base_steps: int = 900
    base_lr: float = 3e-3
    experts: tuple[ExpertSpec, ...] = (
        ExpertSpec("math", "-", "ascii", 400, 3e-3),
        ExpertSpec("ja", "+", "ja", 200, 1e-3),
    )
    expert_trains: Literal["all", "layers"] = "all"
    marked: bool = False
    batch_size: int = 128
    base_ja_prob: float = 0.3
    translit_share: float = 0.2
    pareto_pools: bool = False
    marker_ja_probs: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.marker_ja_probs is not None and not self.marked:
            raise ValueError("marker_ja_probs needs marked prompts")
        for expert in self.experts:
            if expert.base_style and self.marker_ja_probs is None:
                raise ValueError(
                    f"expert {expert.name!r}: base_style needs marker_ja_probs"
                )

    @property
    def model_names(self) -> tuple[str, ...]:
        """``base`` and the experts' names."""
        return ("base", *(e.name for e in self.experts))

    @property
    def total_steps(self) -> int:
        """Training steps of the whole zoo."""
        return self.base_steps + sum(e.steps for e in self.experts)

    def llama_config(self):
        """The ``LlamaConfig`` of every model of the zoo."""
        return toy_llama_config(
            self.num_layers, self.hidden_size, self.intermediate_size, self.num_heads
        )

    def record(self) -> dict[str, Any]:
        """The spec as JSON-ready data (for the manifest).

        Fields added after zoos were cached (:data:`_LATER_FIELDS`) appear only
        when set: a zoo cached before them could not have used them, and it stays
        valid instead of being retrained to the same weights.
        """
        record = json_ready(dataclasses.asdict(self))
        for expert in record["experts"]:
            _drop_defaults(expert, _LATER_FIELDS["expert"])
        _drop_defaults(record, _LATER_FIELDS["zoo"])
        return record


_LATER_FIELDS: dict[str, dict[str, Any]] = {
    "zoo": {"marker_ja_probs": None},
    "expert": {"base_style": False, "replay": 0.0},
}
"""Spec fields added after zoo version 2, with their defaults (see ``record``)."""


def _drop_defaults(record: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, default in defaults.items():
        if record.get(key) == default:
            del record[key]


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively, so a record compares equal after a JSON trip."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


DEMO = ZooSpec()

ZOO_SPECS: dict[str, ZooSpec] = {
    "demo": DEMO,
    # Experts rewrite only their decoder layers: no skill can sit in the head, so a
    # merge must route the hidden state through the right layers (issue 14). The
    # math expert also reads numerals in its own answers (mix), as the spliced
    # model feeds it: math layers 0-4 then ja layer 5 answer the target.
    "splice": ZooSpec(
        num_layers=6,
        base_steps=700,
        expert_trains="layers",
        pareto_pools=True,
        experts=(
            ExpertSpec("math", "-", "ascii", 300, 3e-3, mix=0.3),
            ExpertSpec("ja", "+", "ja", 300, 3e-3),
        ),
    ),
    # "47-12a=" and "47-12j=" ask for different answers: the skills need not exclude
    # each other, so a merge can keep both experts' skills and gain the target. The
    # base leans a little towards numerals after "j" (greedy output stays ASCII);
    # the math expert learns subtraction written the base's way after each marker,
    # with addition replayed, so it keeps both that lean and addition; the
    # Japanese expert sharpens "j" into numerals. Both task vectors then add up on
    # "47-12j=". The spec before (markers meaningless to the base, the math expert
    # on "a" alone without replay) composed to at best 14.5 on the target: its
    # math expert had forgotten addition (0 on "12+34a=") and answered "47-12j="
    # in ASCII outright (100), so no weighting could keep both.
    "pareto": ZooSpec(
        base_steps=700,
        experts=(
            ExpertSpec("math", "-", "ascii", 500, 3e-3, base_style=True, replay=0.3),
            ExpertSpec("ja", "+", "ja", 200, 1e-3),
        ),
        marked=True,
        pareto_pools=True,
        marker_ja_probs=(0.1, 0.4),
    ),
    "demo_hd32": dataclasses.replace(DEMO, num_heads=2),
}
"""Named zoo specs; ``build_zoo(..., spec="splice")`` picks one."""


def get_spec(spec: ZooSpec | str) -> ZooSpec:
    """A spec, or the registered spec of that name.

    Raises:
        ValueError: For an unknown name.
    """
    if isinstance(spec, ZooSpec):
        return spec
    try:
        return ZOO_SPECS[spec]
    except KeyError:
        raise ValueError(
            f"unknown toy zoo {spec!r}; expected one of {sorted(ZOO_SPECS)}"
        ) from None


def toy_llama_config(
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    heads: int,
    max_positions: int = 64,
):
    """A ``LlamaConfig`` over the toy character vocabulary (head_dim =
    hidden/heads), float32, untied head: every toy model's (zoo, VLM, generation
    toy)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=VOCAB[PAD],
        eos_token_id=VOCAB[EOS],
        bos_token_id=None,
        dtype="float32",
    )


def _save(model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def make_tiny_random_llama(
    path: str | Path, seed: int, num_layers: int = 2, hidden_size: int = 32
) -> Path:
    """Save an untrained random Llama with the toy tokenizer (for fast unit tests).

    Args:
        path: Output directory (created).
        seed: Seed of the weight initialization; the same seed gives the same weights.
        num_layers: Decoder layers.
        hidden_size: Hidden size; 4 attention heads, MLP width ``2 * hidden_size``.

    Returns:
        ``path`` as a ``Path``.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = toy_llama_config(num_layers, hidden_size, 2 * hidden_size, 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _save(model, Path(path))


# --- training ------------------------------------------------------------------


def _mixed_script(text: str, rng: random.Random, prob: float) -> str:
    return "".join(
        to_ja(ch) if ch.isdigit() and rng.random() < prob else ch for ch in text
    )


def _base_examples(
    rng: random.Random,
    pairs: list[tuple[int, int]],
    n: int,
    spec: ZooSpec = DEMO,
) -> list[Example]:
    """Base training examples: mixed-script addition and transliteration.

    With marked prompts either marker appears: both markers are then in the base's
    distribution, and with ``spec.marker_ja_probs`` each leans its answers towards
    its script (without it they mean nothing yet).
    """
    out = []
    for _ in range(n):
        if rng.random() < spec.translit_share:
            number = str(rng.randrange(0, 200))
            out.append((f"{number}>", to_ja(number) + "\n"))
        else:
            a, b = rng.choice(pairs)
            form = rng.choice(("ascii", "ja")) if spec.marked else None
            out.append(
                (
                    prompt(a, "+", b, form),
                    _mixed_script(answer(a, "+", b), rng, _ja_prob(spec, form)),
                )
            )
    return out


def _ja_prob(spec: ZooSpec, form: str | None) -> float:
    """The base's chance of writing an answer digit as a numeral after ``form``."""
    if form is None or spec.marker_ja_probs is None:
        return spec.base_ja_prob
    return spec.marker_ja_probs[form == "ja"]


def _task_examples(
    op: str,
    script: str,
    pairs: list[tuple[int, int]],
    marked: bool,
    mix: float = 0.0,
    both_forms: bool = False,
    base_style: ZooSpec | None = None,
) -> Callable[[random.Random, int], list[Example]]:
    """An expert's training sampler; ``base_style``: the spec whose base's marked
    answers it imitates (:attr:`ExpertSpec.base_style`)."""
    if (both_forms or base_style) and not marked:
        raise ValueError("both_forms and base_style need marked prompts")

    def sample(rng: random.Random, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            a, b = rng.choice(pairs)
            if base_style is not None:
                form = rng.choice(("ascii", "ja"))
                prob = _ja_prob(base_style, form)
                text = _mixed_script(answer(a, op, b), rng, prob)
                out.append((prompt(a, op, b, form), text))
                continue
            # Only the options in use draw from rng, so each keeps its stream.
            wanted = rng.choice(("ascii", "ja")) if both_forms else script
            ja_prob = mix if wanted == "ascii" else 1.0 - mix
            text = (
                _mixed_script(answer(a, op, b), rng, ja_prob)
                if mix
                else answer(a, op, b, wanted)
            )
            out.append((prompt(a, op, b, wanted if marked else None), text))
        return out

    return sample


def _with_replay(
    sample: Callable[[random.Random, int], list[Example]],
    replay: Callable[[random.Random, int], list[Example]],
    share: float,
) -> Callable[[random.Random, int], list[Example]]:
    """``sample``, with each example drawn from ``replay`` at chance ``share``."""

    def mixed(rng: random.Random, n: int) -> list[Example]:
        out: list[Example] = []
        for _ in range(n):
            out.extend(replay(rng, 1) if rng.random() < share else sample(rng, 1))
        return out

    return mixed


def _encode(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 outside the answer)."""
    import torch

    ids = torch.full((len(examples), SEQ_LEN), VOCAB[PAD], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (q, a) in enumerate(examples):
        toks = [VOCAB[c] for c in q + a]
        ids[i, : len(toks)] = torch.tensor(toks)
        labels[i, len(q) : len(toks)] = ids[i, len(q) : len(toks)]
    return ids, labels


def _trainable(
    model, trains: str = "all", layers: tuple[int, int] | None = None
) -> list:
    """The parameters a stage trains; the others are frozen (``requires_grad`` off).

    Args:
        model: A ``LlamaForCausalLM``.
        trains: ``"all"``, or ``"layers"``: only the decoder layers.
        layers: Only these decoder layers ``[start, end)``.
    """
    if layers is not None:
        modules = list(model.model.layers)[slice(*layers)]
    elif trains == "layers":
        modules = list(model.model.layers)
    else:
        modules = [model]
    chosen = {id(p) for module in modules for p in module.parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
        if p.requires_grad:
            params.append(p)
    return params


def _train(
    model,
    sample: Callable[[random.Random, int], list[Example]],
    steps: int,
    lr: float,
    rng: random.Random,
    name: str,
    batch_size: int,
    params: list,
    bar: Any,
) -> None:
    import torch

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        # Linear warmup, then cosine decay to zero.
        return (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    start = time.perf_counter()
    logger.info("toy zoo: training %s (%d steps)", name, steps)
    for step in range(steps):
        ids, labels = _encode(sample(rng, batch_size))
        # Right padding sits after every answer token: causal attention needs no mask.
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.update(1)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            bar.set_postfix_str(f"{name} loss {loss.item():.3f}", refresh=False)
            logger.info(
                "toy zoo: %s step %d/%d loss %.4f (%.0fs)",
                name,
                step + 1,
                steps,
                loss.item(),
                time.perf_counter() - start,
            )
    model.eval()


def _build(directory: Path, seed: int, spec: ZooSpec, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    splits = split_pairs()
    suffix = "_pareto" if spec.pareto_pools else ""
    pools = {"-": splits["sub_train" + suffix], "+": splits["add_train" + suffix]}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.llama_config())
    # Eager attention: on these 12-token batches it is ~10% faster to train than
    # SDPA. The saved config keeps the default, so loading is unaffected.
    model.set_attn_implementation("eager")
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "toy zoo: base Llama with %d parameters, %d training steps in all",
        n_params,
        spec.total_steps,
    )

    # The CLI disables tqdm by default (library bars); ours asks explicitly.
    with tqdm(
        total=spec.total_steps, desc="toy zoo", unit="step", disable=not progress
    ) as bar:
        rng = random.Random(seed)

        def base_sample(r: random.Random, n: int) -> list[Example]:
            return _base_examples(r, pools["+"], n, spec)

        _train(
            model,
            base_sample,
            spec.base_steps,
            spec.base_lr,
            rng,
            "base",
            spec.batch_size,
            _trainable(model, "all"),
            bar,
        )
        _save(model, directory / "base")
        base_state = {k: v.clone() for k, v in model.state_dict().items()}

        for i, expert in enumerate(spec.experts):
            model.load_state_dict(base_state)
            sample = _task_examples(
                expert.op,
                expert.script,
                pools[expert.op],
                spec.marked,
                expert.mix,
                expert.both_forms,
                spec if expert.base_style else None,
            )
            if expert.replay:
                sample = _with_replay(sample, base_sample, expert.replay)
            _train(
                model,
                sample,
                expert.steps,
                expert.lr,
                random.Random(seed * 1000 + i + 1),
                expert.name,
                spec.batch_size,
                _trainable(model, spec.expert_trains, expert.layers),
                bar,
            )
            _save(model, directory / expert.name)


def zoo_model_configs(
    directory: str | Path, spec: ZooSpec | str = "demo"
) -> dict[str, dict]:
    """The ``config.json`` each zoo model will have, keyed by its resolved path.

    Lets ``--dry-run`` validate and decode a toy config before the zoo is trained.

    Args:
        directory: The zoo folder.
        spec: A :class:`ZooSpec` or the name of a registered one.

    Returns:
        ``{path: config dict}`` for every model of the zoo.
    """
    spec = get_spec(spec)
    directory = Path(directory).resolve()
    config = spec.llama_config().to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    return {str(directory / name): dict(config) for name in spec.model_names}


def build_zoo(
    directory: str | Path,
    seed: int = 0,
    force: bool = False,
    spec: ZooSpec | str = "demo",
    progress: bool = False,
) -> dict[str, Path]:
    """Train (or reuse) a toy zoo: a shared base and two experts.

    Cached: when ``<directory>/zoo.json`` records the same seed, spec and
    :data:`ZOO_VERSION`, nothing is trained. Otherwise the zoo is built in a temporary
    folder beside ``directory`` and moved into place with ``os.replace``, so an
    interrupted build (even by Ctrl-C) leaves no half zoo and no temporary folder.
    Training uses one torch thread, whatever the caller set (restored after): the
    result does not depend on the caller's thread count. The demo zoo takes about
    100 s on one core.

    Args:
        directory: Folder that holds (or will hold) ``base/`` and the experts.
        seed: Seed of initialization and training data order.
        force: Rebuild even when a matching zoo exists.
        spec: A :class:`ZooSpec` or the name of a registered one (:data:`ZOO_SPECS`).
        progress: Show a progress bar over the training steps (stderr). Progress is
            also logged at INFO per stage and every 100 steps.

    Returns:
        ``{"base": ..., "math": ..., "ja": ...}``: standard Hugging Face model folders
        (``LlamaForCausalLM``, float32 safetensors, tokenizer files).

    Raises:
        ValueError: For an unknown spec name.
    """
    spec = get_spec(spec)
    directory = Path(directory).resolve()
    paths = {name: directory / name for name in spec.model_names}
    meta = {"seed": seed, "zoo_version": ZOO_VERSION, "spec": spec.record()}
    if not force and is_built(
        directory, "zoo.json", meta, [p / "config.json" for p in paths.values()]
    ):
        logger.info("toy zoo: reusing %s", directory)
        return paths
    logger.info(
        "toy zoo: building %s (%d steps; about %.0f s on one core)",
        directory,
        spec.total_steps,
        spec.total_steps * 0.07,
    )
    # One thread and deterministic kernels: the same seed gives the same zoo, and a
    # second thread only spin-waits on these tiny matrices when the machine is busy.
    build_atomically(
        directory,
        "zoo.json",
        meta,
        lambda tmp: _build(tmp, seed, spec, progress),
        threads=1,
        deterministic=True,
        required=None if force else [p / "config.json" for p in paths.values()],
    )
    return paths
