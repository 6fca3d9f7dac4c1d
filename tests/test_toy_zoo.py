"""The toy zoo builder: specs, determinism across thread counts, interrupted builds,
frozen parameters. Small specs train a few steps (seconds); the real zoos' properties
are in tests/test_toy_worlds.py (slow)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mergekit_evolve.toy import zoo
from mergekit_evolve.toy.zoo import (
    ZOO_SPECS,
    ZOO_VERSION,
    ExpertSpec,
    ZooSpec,
    build_zoo,
    get_spec,
    zoo_model_configs,
)

# Trains in a second or two: enough steps for every parameter to move.
SMALL = ZooSpec(
    hidden_size=32,
    num_layers=2,
    intermediate_size=64,
    num_heads=2,
    base_steps=4,
    experts=(
        ExpertSpec("math", "-", "ascii", 3, 3e-3),
        ExpertSpec("ja", "+", "ja", 3, 3e-3),
    ),
    batch_size=8,
)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _same_bits(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1), b[k].view(-1))
        for k in a
    )


def test_build_is_bit_identical_whatever_the_callers_thread_count(tmp_path):
    import torch

    saved = torch.get_num_threads()
    try:
        built = {}
        for threads in (2, 1):
            torch.set_num_threads(threads)
            built[threads] = build_zoo(tmp_path / f"t{threads}", spec=SMALL)
            # The caller's setting is restored after the build.
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    for name in SMALL.model_names:
        one, two = _tensors(built[1][name]), _tensors(built[2][name])
        assert _same_bits(one, two), name
    # The experts did train: they differ from the base.
    assert not _same_bits(_tensors(built[1]["base"]), _tensors(built[1]["math"]))


def test_manifest_records_seed_version_and_spec_and_reuse_follows_it(tmp_path):
    paths = build_zoo(tmp_path / "z", spec=SMALL, seed=1)
    record = json.loads((tmp_path / "z" / "zoo.json").read_text())
    assert record["seed"] == 1 and record["zoo_version"] == ZOO_VERSION
    assert record["spec"] == SMALL.record()
    assert record["spec"]["experts"][0]["name"] == "math"
    before = (paths["math"] / "model.safetensors").stat().st_mtime_ns
    build_zoo(tmp_path / "z", spec=SMALL, seed=1)  # same: reused
    assert (paths["math"] / "model.safetensors").stat().st_mtime_ns == before
    longer = dataclasses.replace(SMALL, base_steps=5)
    build_zoo(tmp_path / "z", spec=longer, seed=1)  # another spec: rebuilt
    assert json.loads((tmp_path / "z" / "zoo.json").read_text())["spec"] == (
        longer.record()
    )


def _interrupt_on_second_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the base is saved, while the first expert is being written."""
    calls = []
    real = zoo._save

    def save(model, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, path)

    monkeypatch.setattr(zoo, "_save", save)


def test_interrupted_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    _interrupt_on_second_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", spec=SMALL)
    # Only the (empty) lock file that builds of this folder take turns on.
    assert [p.name for p in tmp_path.iterdir()] == [".zoo.lock"]


def test_interrupted_rebuild_keeps_the_previous_zoo(tmp_path, monkeypatch):
    paths = build_zoo(tmp_path / "zoo", spec=SMALL)
    before = _tensors(paths["ja"])
    _interrupt_on_second_save(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(tmp_path / "zoo", spec=SMALL, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".zoo.lock", "zoo"]
    assert _same_bits(_tensors(paths["ja"]), before)
    assert json.loads((tmp_path / "zoo" / "zoo.json").read_text())["spec"] == (
        SMALL.record()
    )


def test_layers_only_experts_keep_embeddings_norm_and_head(tmp_path):
    import torch

    spec = dataclasses.replace(SMALL, expert_trains="layers")
    paths = build_zoo(tmp_path / "z", spec=spec)
    base = _tensors(paths["base"])
    frozen = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    for name in ("math", "ja"):
        expert = _tensors(paths[name])
        for key in base:
            same = torch.equal(base[key], expert[key])
            # Frozen tensors are the base's bit for bit; every layer tensor moved.
            assert same == (key in frozen), (name, key)


def test_marked_spec_trains_on_marked_prompts(monkeypatch):
    import random

    from mergekit_evolve.toy.data import split_pairs

    spec = dataclasses.replace(SMALL, marked=True)
    pairs = split_pairs()["add_train"]
    prompts = [q for q, _ in zoo._base_examples(random.Random(0), pairs, 200, spec)]
    arithmetic = [q for q in prompts if not q.endswith(">")]
    assert {q[-2:] for q in arithmetic} == {"a=", "j="}
    sample = zoo._task_examples("-", "ja", split_pairs()["sub_train"], marked=True)
    assert all(q.endswith("j=") for q, _ in sample(random.Random(0), 20))
    # An expert that follows the marker answers each prompt in the form it asks.
    sample = zoo._task_examples("+", "ja", pairs, marked=True, both_forms=True)
    examples = sample(random.Random(0), 50)
    assert {q[-2:] for q, _ in examples} == {"a=", "j="}
    for q, a in examples:
        assert a[0].isdigit() == q.endswith("a="), (q, a)
    with pytest.raises(ValueError, match="marked"):
        zoo._task_examples("+", "ja", pairs, marked=False, both_forms=True)


def test_mixed_expert_answers_keep_their_script_in_the_majority():
    import random

    from mergekit_evolve.toy.data import JA_DIGITS, split_pairs

    pairs = split_pairs()["sub_train"]

    def digits(script: str, mix: float) -> tuple[int, int]:
        sample = zoo._task_examples("-", script, pairs, marked=False, mix=mix)
        text = "".join(a for _, a in sample(random.Random(0), 300))
        return sum(c.isdigit() for c in text), sum(c in JA_DIGITS for c in text)

    ascii_count, ja_count = digits("ascii", 0.0)
    assert ascii_count > 0 and ja_count == 0
    ascii_count, ja_count = digits("ja", 0.0)
    assert ascii_count == 0 and ja_count > 0
    ascii_count, ja_count = digits("ascii", 0.3)
    assert 0.2 < ja_count / (ascii_count + ja_count) < 0.4
    ascii_count, ja_count = digits("ja", 0.3)
    assert 0.2 < ascii_count / (ascii_count + ja_count) < 0.4


def test_registered_specs_and_planned_configs(tmp_path):
    assert {"demo", "splice", "pareto", "demo_hd32"} <= set(ZOO_SPECS)
    assert get_spec("splice") is ZOO_SPECS["splice"]
    assert get_spec(SMALL) is SMALL
    with pytest.raises(ValueError, match="unknown toy zoo 'nope'"):
        get_spec("nope")
    assert ZOO_SPECS["splice"].expert_trains == "layers"
    assert ZOO_SPECS["pareto"].marked
    hd32 = ZOO_SPECS["demo_hd32"]
    assert hd32.hidden_size // hd32.num_heads == 32
    planned = zoo_model_configs(tmp_path, "splice")
    assert sorted(Path(p).name for p in planned) == ["base", "ja", "math"]
    config = next(iter(planned.values()))
    assert config["num_hidden_layers"] == ZOO_SPECS["splice"].num_layers
    assert config["architectures"] == ["LlamaForCausalLM"]
    # The planned config is what a build writes (checked on the small spec).
    built = build_zoo(tmp_path / "small", spec=SMALL)
    written = json.loads((built["base"] / "config.json").read_text())
    expected = zoo_model_configs(tmp_path / "small", SMALL)[str(built["base"])]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
        assert written[key] == expected[key], key


def test_progress_bar_and_stage_logs(tmp_path, caplog, capsys):
    import logging

    with caplog.at_level(logging.INFO, logger="mergekit_evolve.toy"):
        build_zoo(tmp_path / "z", spec=SMALL, progress=True)
    messages = [r.getMessage() for r in caplog.records]
    for stage in ("base", "math", "ja"):
        assert any(f"training {stage}" in m for m in messages), stage
    assert f"{SMALL.total_steps}/{SMALL.total_steps}" in capsys.readouterr().err


def _numeral_share(examples) -> float:
    from mergekit_evolve.toy.data import JA_DIGITS

    text = "".join(a for _, a in examples)
    ja = sum(c in JA_DIGITS for c in text)
    return ja / (ja + sum(c.isdigit() for c in text))


def test_marker_ja_probs_lean_each_markers_answers_towards_its_script():
    import random

    from mergekit_evolve.toy.data import split_pairs

    spec = dataclasses.replace(SMALL, marked=True, marker_ja_probs=(0.1, 0.4))
    pairs = split_pairs()["add_train"]
    examples = zoo._base_examples(random.Random(0), pairs, 2000, spec)
    by_marker = {m: [e for e in examples if e[0].endswith(f"{m}=")] for m in ("a", "j")}
    assert 0.07 < _numeral_share(by_marker["a"]) < 0.13
    assert 0.36 < _numeral_share(by_marker["j"]) < 0.44
    # A base_style expert writes its own operator the same way after each marker.
    sample = zoo._task_examples(
        "-", "ascii", split_pairs()["sub_train"], True, base_style=spec
    )
    examples = sample(random.Random(0), 2000)
    assert {q[-2:] for q, _ in examples} == {"a=", "j="}
    assert all("-" in q for q, _ in examples)
    shares = [
        _numeral_share([e for e in examples if e[0].endswith(f"{m}=")])
        for m in ("a", "j")
    ]
    assert 0.07 < shares[0] < 0.13 and 0.36 < shares[1] < 0.44, shares
    with pytest.raises(ValueError, match="marked"):
        zoo._task_examples("-", "ascii", pairs, False, base_style=spec)


def test_replay_mixes_the_bases_examples_into_an_experts_batches():
    import random

    from mergekit_evolve.toy.data import split_pairs

    spec = dataclasses.replace(SMALL, marked=True, marker_ja_probs=(0.1, 0.4))
    pools = split_pairs()
    sample = zoo._with_replay(
        zoo._task_examples("-", "ascii", pools["sub_train"], True, base_style=spec),
        lambda r, n: zoo._base_examples(r, pools["add_train"], n, spec),
        0.3,
    )
    examples = sample(random.Random(0), 1000)
    assert len(examples) == 1000
    replayed = sum("-" not in q for q, _ in examples) / len(examples)
    assert 0.25 < replayed < 0.35


def test_new_spec_fields_are_checked_and_recorded_only_when_set():
    with pytest.raises(ValueError, match="marked"):
        dataclasses.replace(SMALL, marker_ja_probs=(0.1, 0.4))
    expert = ExpertSpec("math", "-", "ascii", 3, 3e-3, base_style=True)
    with pytest.raises(ValueError, match="base_style needs marker_ja_probs"):
        dataclasses.replace(SMALL, marked=True, experts=(expert,))
    # Zoos cached before these fields existed keep matching their record.
    for name in ("demo", "splice", "demo_hd32"):
        record = ZOO_SPECS[name].record()
        assert "marker_ja_probs" not in record, name
        for expert_record in record["experts"]:
            assert "base_style" not in expert_record and "replay" not in expert_record
    record = ZOO_SPECS["pareto"].record()
    assert record["marker_ja_probs"] == [0.1, 0.4]
    assert record["experts"][0]["replay"] > 0 and record["experts"][0]["base_style"]
