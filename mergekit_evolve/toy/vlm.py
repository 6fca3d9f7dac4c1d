"""A tiny, offline LLaVA whose merge with the toy Japanese expert answers in Japanese.

(One module, longer than most: the toy VLM's images, tasks and training, kept
together like the text zoo's.)

The toy VLM is a ``LlavaForConditionalGeneration``: a 2-layer CLIP vision tower
(32 x 32 images, 8 x 8 patches: 16 image tokens), a projector, and the toy zoo's
*base* LM with an added ``<image>`` token. It is trained briefly (tower frozen at its
random init, projector and LM trained) on synthetic pictures of 1-4 coloured shapes,
each filling one patch cell, to answer in English/ASCII:

* ``<image>count=`` -> ``3`` (how many shapes),
* ``<image>color?`` -> ``red``, ``<image>shape?`` -> ``box`` / ``ring``,

with the base's own mixed-script additions replayed alongside, so the VLM's LM stays
a fine-tune of the same base as the zoo's experts. The zoo's ``ja`` expert answers
additions after ``=`` in Japanese numerals; the count question also ends in ``=``
and answers with a digit, so a merge can carry the numeral habit over: the target
is ``<image>count=`` -> ``三``, which neither the VLM (ASCII) nor the expert (no
vision) has.

Evaluation images and questions are fixed (seed :data:`SPLIT_SEED`) and excluded from
training; :func:`write_task_data` writes them to ``evals/toy_ja_vqa/data``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_evolve.toy.cache import build_atomically, is_built
from mergekit_evolve.toy.tokenizer import JA_DIGITS, VOCAB, make_tokenizer

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "TOY_VLM_VERSION",
    "IMAGE_TOKEN",
    "SPLIT_SEED",
    "Picture",
    "draw",
    "build_toy_vlm",
    "make_tiny_random_llava",
    "toy_vlm_config",
    "task_docs",
    "write_task_data",
]

logger = logging.getLogger(__name__)

TOY_VLM_VERSION = 1
"""Bumped whenever the toy VLM's recipe changes; another version's cache is rebuilt."""

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = len(VOCAB)  # appended after the zoo's vocabulary
IMAGE_SIZE, PATCH = 32, 8
GRID = IMAGE_SIZE // PATCH  # 4 x 4 cells, one per patch
NUM_IMAGE_TOKENS = GRID * GRID
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
}
SHAPES = ("box", "ring")
MAX_COUNT = 4

SPLIT_SEED = 20240320
"""Seed of the evaluation pictures; fixed so committed task data never changes."""
SPLIT_SIZE = 100
"""Questions per evaluation task."""

# Training recipe (about a minute on one core).
STEPS, BATCH = 400, 64
LR_PROJECTOR, LR_LM = 3e-3, 2e-3
REPLAY_SHARE = 0.25  # share of text-only base examples (mixed-script additions)
TRAIN_POOL = 4000  # distinct training pictures (their tower features are cached)
QUESTION_MIX = {"count": 0.5, "color": 0.25, "shape": 0.25}

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
)
"""The toy's chat template: the message text with ``<image>`` where the image goes."""


@dataclass(frozen=True)
class Picture:
    """One synthetic image: ``count`` shapes of one colour and kind, distinct cells."""

    color: str
    shape: str
    cells: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.cells)

    @property
    def name(self) -> str:
        return f"{self.color}_{self.shape}_{'-'.join(map(str, self.cells))}"


def draw(picture: Picture) -> Image.Image:
    """Renders a picture: black background, each shape filling 6 x 6 of its 8 x 8 cell
    (``box`` filled, ``ring`` hollow), so every shape lies inside one patch."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    pen = ImageDraw.Draw(image)
    rgb = COLORS[picture.color]
    for cell in picture.cells:
        x, y = (cell % GRID) * PATCH + 1, (cell // GRID) * PATCH + 1
        if picture.shape == "box":
            pen.rectangle([x, y, x + 5, y + 5], fill=rgb)
        else:
            pen.rectangle([x, y, x + 5, y + 5], outline=rgb, width=2)
    return image


def _random_picture(rng: random.Random) -> Picture:
    count = rng.randint(1, MAX_COUNT)
    cells = tuple(sorted(rng.sample(range(GRID * GRID), count)))
    return Picture(rng.choice(list(COLORS)), rng.choice(SHAPES), cells)


def question(kind: str) -> str:
    """The question text after the image placeholder."""
    return {"count": "count=", "color": "color?", "shape": "shape?"}[kind]


def answer(picture: Picture, kind: str, script: str = "ascii") -> str:
    """The expected answer (no trailing newline): ``3``, ``三`` (``script="ja"``),
    ``red``."""
    if kind == "count":
        digit = str(picture.count)
        return JA_DIGITS[picture.count] if script == "ja" else digit
    if kind == "color":
        return picture.color
    return picture.shape


# --------------------------------------------------------------------------- tasks

# task -> (question kind, answer script, offset of its pictures in the fixed pool)
TASKS: dict[str, tuple[str, str, int]] = {
    "toy_vqa_count_ja_fitness": ("count", "ja", 0),
    "toy_vqa_count_ja_heldout": ("count", "ja", 1),
    "toy_vqa_count_en": ("count", "ascii", 1),  # the held-out pictures, ASCII answers
    "toy_vqa_color_en": ("color", "ascii", 2),
}
"""The toy VQA tasks: question kind, answer script and which picture split they read."""


def _eval_pictures() -> list[list[Picture]]:
    """Three disjoint splits of distinct pictures, balanced over counts."""
    rng = random.Random(SPLIT_SEED)
    seen: set[Picture] = set()
    splits: list[list[Picture]] = []
    for _ in range(3):
        split: list[Picture] = []
        while len(split) < SPLIT_SIZE:
            count = len(split) % MAX_COUNT + 1
            cells = tuple(sorted(rng.sample(range(GRID * GRID), count)))
            pic = Picture(rng.choice(list(COLORS)), rng.choice(SHAPES), cells)
            if pic not in seen:
                seen.add(pic)
                split.append(pic)
        rng.shuffle(split)
        splits.append(split)
    return splits


def task_docs(task: str) -> list[dict[str, str]]:
    """The documents of one toy VQA task: ``image`` (file name), ``question``,
    ``answer``.

    Raises:
        ValueError: for an unknown task.
    """
    if task not in TASKS:
        raise ValueError(
            f"unknown toy VQA task {task!r}; expected one of {sorted(TASKS)}"
        )
    kind, script, split = TASKS[task]
    return [
        {
            "image": f"images/{pic.name}.png",
            "question": IMAGE_TOKEN + question(kind),
            "answer": answer(pic, kind, script),
        }
        for pic in _eval_pictures()[split]
    ]


def write_task_data(directory: str | Path) -> list[Path]:
    """Writes ``<task>.jsonl`` and the PNG images of every toy VQA task
    (regenerates ``evals/toy_ja_vqa/data``)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for split in _eval_pictures():
        for pic in split:
            draw(pic).save(directory / "images" / f"{pic.name}.png", optimize=True)
    out = []
    for task in TASKS:
        path = directory / f"{task}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            for row in task_docs(task):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.append(path)
    return out


# --------------------------------------------------------------------------- model


def _tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    return tokenizer


def _processor(tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by "default"
    )


def _vision_config(hidden: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
    )


def _llava_config(text_config):
    from transformers import LlavaConfig

    text_config.vocab_size = IMAGE_TOKEN_ID + 1
    return LlavaConfig(
        vision_config=_vision_config(),
        text_config=text_config,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def toy_vlm_config() -> dict[str, Any]:
    """The ``config.json`` the toy VLM will have (for ``--dry-run`` before a build)."""
    from mergekit_evolve.toy.zoo import DEMO

    config = _llava_config(DEMO.llama_config()).to_dict()
    config["architectures"] = ["LlavaForConditionalGeneration"]
    return config


def _save(model, tokenizer, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    _processor(tokenizer).save_pretrained(path)
    return path


def make_tiny_random_llava(
    path: str | Path,
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 32,
    next_resolution: bool = False,
) -> Path:
    """Saves an untrained tiny LLaVA (or LLaVA-NeXT) with the toy tokenizer and
    processor, for fast tests of splitting, merging and loading.

    Args:
        path: Output directory (created).
        seed: Seed of every weight.
        num_layers: Text decoder layers.
        hidden_size: Text hidden size (4 heads, MLP ``2 * hidden_size``).
        next_resolution: Save a ``LlavaNextForConditionalGeneration`` (any-resolution
            tiles of 32 px, ``image_newline``) with a ``LlavaNextProcessor``.

    Returns:
        ``path``.
    """
    import torch
    import transformers

    from mergekit_evolve.toy.zoo import toy_llama_config

    text_config = toy_llama_config(num_layers, hidden_size, 2 * hidden_size, 4)
    config = _llava_config(text_config)
    tokenizer = _tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not next_resolution:
            model = transformers.LlavaForConditionalGeneration(config)
            return _save(model, tokenizer, Path(path))
        pinpoints = [[32, 64], [64, 32], [64, 64]]
        next_config = transformers.LlavaNextConfig(
            vision_config=config.vision_config,
            text_config=config.text_config,
            image_token_index=IMAGE_TOKEN_ID,
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        model = transformers.LlavaNextForConditionalGeneration(next_config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    images = transformers.LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints,
    )
    transformers.LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- training


def _encode(tokens: list[list[int]], answer_starts: list[int], length: int):
    import torch

    ids = torch.full((len(tokens), length), VOCAB["<pad>"], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (toks, start) in enumerate(zip(tokens, answer_starts, strict=True)):
        ids[i, : len(toks)] = torch.tensor(toks)
        labels[i, start : len(toks)] = ids[i, start : len(toks)]
    return ids, labels


def _text_ids(text: str) -> list[int]:
    return [VOCAB[c] for c in text]


def _train(
    vlm, pictures: list[Picture], features: torch.Tensor, rng: random.Random
) -> None:
    """Projector and LM trained on VQA plus base replay; the tower stays frozen."""
    import torch

    from mergekit_evolve.toy.data import split_pairs
    from mergekit_evolve.toy.zoo import _base_examples

    pairs = split_pairs()["add_train"]
    lm, head, projector = (
        vlm.model.language_model,
        vlm.lm_head,
        vlm.model.multi_modal_projector,
    )
    embed = lm.get_input_embeddings()
    params = [
        {"params": list(projector.parameters()), "lr": LR_PROJECTOR},
        {"params": [*lm.parameters(), *head.parameters()], "lr": LR_LM},
    ]
    opt = torch.optim.AdamW(params, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, STEPS // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / STEPS))
        ),
    )
    kinds, weights = list(QUESTION_MIX), list(QUESTION_MIX.values())
    n_vqa = round(BATCH * (1 - REPLAY_SHARE))
    length = NUM_IMAGE_TOKENS + 14  # longest: 'shape?' + 'yellow\n' after the image
    vlm.train()
    start = time.perf_counter()
    for step in range(STEPS):
        # VQA rows: image tokens (placeholders), question, answer, newline.
        index = [rng.randrange(len(pictures)) for _ in range(n_vqa)]
        tokens, starts = [], []
        for i in index:
            kind = rng.choices(kinds, weights)[0]
            prompt = [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS + _text_ids(question(kind))
            tokens.append(prompt + _text_ids(answer(pictures[i], kind) + "\n"))
            starts.append(len(prompt))
        for q, a in _base_examples(rng, pairs, BATCH - n_vqa):
            tokens.append(_text_ids(q + a))
            starts.append(len(q))
        ids, labels = _encode(tokens, starts, length)
        embeds = embed(ids)
        image = projector(features[index])  # (n_vqa, 16, hidden)
        embeds = torch.cat(
            [
                torch.cat([image, embeds[:n_vqa, NUM_IMAGE_TOKENS:]], dim=1),
                embeds[n_vqa:],
            ]
        )
        hidden = lm(inputs_embeds=embeds).last_hidden_state
        logits = head(hidden)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == STEPS:
            logger.info(
                "toy vlm: step %d/%d loss %.4f (%.0fs)",
                step + 1,
                STEPS,
                loss.item(),
                time.perf_counter() - start,
            )
    vlm.eval()


def _tower_features(vlm, processor, pictures: list[Picture]) -> torch.Tensor:
    """The frozen tower's patch features, as LLaVA selects them (layer -1, class token
    dropped), computed once for the whole training pool."""
    import torch

    pixels = processor.image_processor(
        [draw(p) for p in pictures], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        out = vlm.model.vision_tower(pixels, output_hidden_states=True)
        return out.hidden_states[-1][:, 1:].detach()


def _build(directory: Path, zoo_dir: Path, seed: int) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM.from_pretrained(
        str(zoo_dir / "base"), dtype=torch.float32
    )
    # The added <image> row is never read as an input (LLaVA puts image features at
    # those positions); its head row starts at the mean of the others.
    base.resize_token_embeddings(IMAGE_TOKEN_ID + 1, mean_resizing=False)
    with torch.no_grad():
        for matrix in (
            base.get_input_embeddings().weight,
            base.get_output_embeddings().weight,
        ):
            matrix[IMAGE_TOKEN_ID] = matrix[:IMAGE_TOKEN_ID].mean(0)
    config = _llava_config(base.config)
    vlm = transformers.LlavaForConditionalGeneration(config)
    vlm.model.language_model.load_state_dict(base.model.state_dict())
    vlm.lm_head.load_state_dict(base.lm_head.state_dict())
    vlm.model.vision_tower.requires_grad_(False)
    tokenizer = _tokenizer()
    processor = _processor(tokenizer)

    rng = random.Random(seed)
    excluded = {p for split in _eval_pictures() for p in split}
    pool: list[Picture] = []
    while len(pool) < TRAIN_POOL:
        pic = _random_picture(rng)
        if pic not in excluded:
            pool.append(pic)
    features = _tower_features(vlm, processor, pool)
    _train(vlm, pool, features, rng)
    _save(vlm, tokenizer, directory / "vlm")


def build_toy_vlm(
    directory: str | Path, zoo_dir: str | Path, seed: int = 0, force: bool = False
) -> Path:
    """Trains (or reuses) the toy LLaVA from the toy zoo's base LM.

    Cached like the zoo: ``<directory>/toy_vlm.json`` records the seed, version and
    the zoo it was built from; a build happens in a temporary folder moved into place.

    Args:
        directory: Folder that holds (or will hold) ``vlm/``.
        zoo_dir: The toy zoo (built with ``build_zoo``).
        seed: Seed of initialization and training order.
        force: Rebuild even when a matching build exists.

    Returns:
        The model folder (``LlavaForConditionalGeneration``, processor, chat template).
    """
    directory, zoo_dir = Path(directory).resolve(), Path(zoo_dir).resolve()
    target = directory / "vlm"
    zoo_meta = (
        json.loads((zoo_dir / "zoo.json").read_text())
        if (zoo_dir / "zoo.json").is_file()
        else {}
    )
    meta = {
        "seed": seed,
        "toy_vlm_version": TOY_VLM_VERSION,
        "zoo": {k: zoo_meta.get(k) for k in ("seed", "zoo_version")},
    }
    if not force and is_built(
        directory, "toy_vlm.json", meta, [target / "config.json"]
    ):
        logger.info("toy vlm: reusing %s", target)
        return target
    # One thread: these matrices are tiny, and on a shared machine a second thread
    # spin-waits for its share (5x slower per step when contended).
    build_atomically(
        directory,
        "toy_vlm.json",
        meta,
        lambda tmp: _build(tmp, zoo_dir, seed),
        threads=1,
        required=None if force else [target / "config.json"],
    )
    return target
