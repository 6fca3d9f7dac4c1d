"""Template mode: only the marked values of a mergekit YAML are genes, every mergekit
method works, bad templates are one-line errors, and a run's best.yml is the user's
file with the markers filled in and otherwise unchanged."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, tiny_config
from mergekit import merge_methods
from mergekit.merge_methods.base import ParameterScope

from mergekit_evolve.errors import ConfigError, InvalidGenomeError
from mergekit_evolve.loading import load_config, parse_config
from mergekit_evolve.sources import SourceSet, load_sources
from mergekit_evolve.spaces import SPACES, make_space
from mergekit_evolve.spaces.markers import format_number
from mergekit_evolve.spaces.param import method_spec
from mergekit_evolve.spaces.template import TemplateSpace, TemplateSpaceConfig

NUMBER = r"(-?\d+(?:\.\d+)?)"
FLOW_MARKER = re.compile(r"\{evolve: \[[^\]]*\](?:, (?:init|count): [^,}]*)*\}")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def space_for(text: str, base_dir: Path | None = None, **options) -> TemplateSpace:
    config = TemplateSpaceConfig.model_validate(
        {"recipe": text, **options},
        context={"base_dir": str(base_dir)} if base_dir else {},
    )
    return TemplateSpace(config, SourceSet(models=()))


@pytest.fixture
def recipe(tiny_models) -> str:
    """Every marker form: flow and block style, per-filter and per-layer list items,
    a gradient (count), an init, an anchor with an alias, comments, other settings."""
    a, b, base = tiny_models["a"], tiny_models["b"], tiny_models["base"]
    return f"""\
# my hand-tuned merge
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: [{{filter: self_attn, value: {{evolve: [0, 1]}}}}, {{value: [0.5, {{evolve: [0,1]}}, 1.0]}}]
      density: &d {{evolve: [0.1, 1.0], init: 0.7}}   # shared with b
  - model: {b}
    parameters:
      weight:
        evolve: [0.0, 2.0]
        count: 3
      density: *d
parameters:
  lambda:
    evolve: [0.5, 1.5]
  normalize: true
  int8_mask: true
dtype: float32
tokenizer_source: base
chat_template: "{{{{ messages }}}}"
"""  # noqa: E501 (the template's flow-style line is test data)


def test_only_markers_are_genes_and_the_rest_of_the_text_is_kept(recipe):
    space = space_for(recipe)
    assert space.gene_names() == [
        "models[a].parameters.weight[self_attn].value",
        "models[a].parameters.weight[1].value[1]",
        # the alias *d is the same gene, not a second one
        "models[a].parameters.density",
        "models[b].parameters.weight@0",
        "models[b].parameters.weight@1",
        "models[b].parameters.weight@2",
        "parameters.lambda",
    ]
    x0 = space.x0(0.5)
    assert x0[2] == pytest.approx((0.7 - 0.1) / 0.9)  # init, mapped into the unit cube
    assert x0[[0, 1, 3, 6]] == pytest.approx([0.5] * 4)
    x = np.linspace(0.05, 0.95, space.dim)
    values = space.values(x)
    text = space.recipe_yaml(x, space.decode(x))
    assert "evolve" not in text
    # Everything outside the markers is byte for byte the template.
    pattern = re.escape(recipe)
    for marker in FLOW_MARKER.findall(recipe):
        pattern = pattern.replace(re.escape(marker), NUMBER, 1)
    pattern = pattern.replace(
        re.escape("\n        evolve: [0.0, 2.0]\n        count: 3"),
        r"\n        (\[[^\]]*\])",
        1,
    )
    pattern = pattern.replace(
        re.escape("\n    evolve: [0.5, 1.5]"), r"\n    " + NUMBER, 1
    )
    match = re.fullmatch(pattern, text)
    assert match, text
    filled = match.groups()
    assert [float(v) for v in filled[:3]] == pytest.approx(values[:3], abs=1e-6)
    assert json.loads(filled[3]) == pytest.approx(values[3:6], abs=1e-6)
    assert float(filled[4]) == pytest.approx(values[6], abs=1e-6)
    # The decoded configuration is that text, with the alias resolved to the same value.
    merged = space.decode(x).model_dump(mode="json", exclude_none=True)
    assert merged["models"][1]["parameters"]["density"] == pytest.approx(
        values[2], abs=1e-6
    )
    assert (
        merged["chat_template"] == "{{ messages }}"
        and merged["tokenizer_source"] == "base"
    )


def test_numbers_round_trip_as_floats():
    for value in (0.0, 1e-9, 1e-7, -0.5, 2.0, 0.1234567):
        text = format_number(value)
        assert isinstance(yaml.safe_load(f"v: {text}")["v"], float), text
        assert float(text) == pytest.approx(value, abs=1e-6)


def test_space_is_registered_and_made_from_a_run_config(tiny_models, tmp_path, recipe):
    assert "template" in SPACES
    data = tiny_config(
        tiny_models, tmp_path / "run", space={"type": "template", "recipe": recipe}
    )
    config = parse_config(data, "c.yml", tmp_path)
    space = make_space(config.space, load_sources(config.sources))
    assert isinstance(space, TemplateSpace) and space.dim == 7
    assert list(space.baselines()) == ["template_init"]


def test_recipe_may_be_an_inline_mapping(tiny_models):
    mapping = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(tiny_models["a"]),
                "parameters": {"weight": {"evolve": [0, 1]}},
            },
            {
                "model": str(tiny_models["b"]),
                "parameters": {"weight": {"evolve": [0, 1]}},
            },
        ],
    }
    config = TemplateSpaceConfig.model_validate({"recipe": mapping})
    space = TemplateSpace(config, SourceSet(models=()))
    weights = [
        m.parameters["weight"] for m in space.decode(np.array([0.25, 0.75])).models
    ]
    assert weights == [0.25, 0.75]


def _method_template(method: str, models: dict[str, Path]) -> str | None:
    """A template for ``method`` with markers on its required numeric parameters."""
    spec = method_spec(method)
    numeric = [p for p in spec.parameters if p.value_type is not bool]
    if not numeric:
        return None
    marked = [p for p in numeric if p.required] or numeric[:1]

    def marker(p) -> str:
        return (
            f"{p.name}: {{evolve: [1, 9]}}"
            if p.value_type is int
            else f"{p.name}: {{evolve: [0.1, 0.9]}}"
        )

    per_model = [marker(p) for p in marked if p.scope != ParameterScope.SHARED]
    shared = [marker(p) for p in marked if p.scope == ParameterScope.SHARED]
    lines = [f"merge_method: {method}"]
    if spec.contract.base.value != "ignored":
        lines.append(f"base_model: {models['base']}")
    if method == "passthrough":
        lines += [
            "slices:",
            "  - sources:",
            f"      - model: {models['a']}",
            "        layer_range: [0, 2]",
            "        parameters:",
            "          scale: [{filter: o_proj, value: {evolve: [0.5, 1.5]}}, "
            "{value: 1.0}]",
        ]
    else:
        lines.append("models:")
        two_inputs = method in ("slerp", "nearswap")  # base + exactly one other model
        for name in ["a"] if two_inputs else ["a", "b"]:
            lines.append(f"  - model: {models[name]}")
            if per_model:
                lines.append("    parameters: {" + ", ".join(per_model) + "}")
        if shared:
            lines.append("parameters: {" + ", ".join(shared) + "}")
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def builder(tiny_models):
    from mergekit_evolve.builder import Builder

    return Builder(dtype="float32", tokenizer_path=str(tiny_models["base"]))


@pytest.mark.parametrize("method", sorted(merge_methods.registry._METHODS))
def test_every_mergekit_method_validates_and_builds(method, tiny_models, builder):
    text = _method_template(method, tiny_models)
    if text is None:  # model_stock, arcee_fusion: nothing numeric to mark
        with pytest.raises(ValueError, match="has no numeric parameter"):
            space_for(
                f"merge_method: {method}\nbase_model: {tiny_models['base']}\nmodels:\n"
                f"  - model: {tiny_models['a']}\n"
                "    parameters: {weight: {evolve: [0, 1]}}\n"
            )
        return
    space = space_for(text)
    config = space.decode(np.full(space.dim, 0.3))
    assert config.merge_method == method
    built = builder.build(config)  # mergekit accepts the filled values (ints stay ints)
    assert built.model is not None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("merge_method: ties", "merge_method: tiez"),
            r"space\.recipe: recipe: merge_method: "
            r"unknown mergekit merge method 'tiez'",
        ),
        (
            ("lambda:\n    evolve: [0.5, 1.5]", "lambda:\n    evolve: [1.5, 0.5]"),
            r"line 17: bounds are inverted",
        ),
        (
            ("init: 0.7", "init: 7"),
            r"line 8: init must be a number within \[0.1, 1.0\]",
        ),
        (("count: 3", "count: 0"), r"line 12: count must be an integer >= 1"),
        (("init: 0.7", "step: 0.7"), r"line 8: unknown key 'step' in a search marker"),
        (
            ("evolve: [0.0, 2.0]", "evolve: [0.0]"),
            r"line 12: expected evolve: \[min, max\] with two numbers",
        ),
        (
            ("dtype: float32", "dtype: {evolve: [0, 1]}"),
            r"markers set parameter values .*found one at dtype",
        ),
        (
            ("lambda:", "lamda:"),
            r"line 17: parameters.lamda: ties has no numeric parameter 'lamda'",
        ),
        (("models:", "modelz:"), r"space\.recipe: recipe: "),
    ],
)
def test_bad_templates_are_one_line_errors_naming_the_field(
    change, expected, recipe, tiny_models, tmp_path
):
    old, new = change
    assert old in recipe
    data = tiny_config(
        tiny_models,
        tmp_path / "run",
        space={"type": "template", "recipe": recipe.replace(old, new, 1)},
    )
    with pytest.raises(ConfigError, match=expected) as info:
        parse_config(data, "c.yml", tmp_path)
    assert "\n" not in str(info.value) and str(info.value).startswith("c.yml: space.")


def test_template_without_markers_or_file_is_an_error(
    tiny_models, tmp_path, write_config
):
    no_marker = tmp_path / "plain.yml"
    no_marker.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
    )
    data = {
        k: v
        for k, v in tiny_config(tiny_models, tmp_path / "run").items()
        if k != "sources"
    }
    for template, expected in [
        (no_marker, "has no search marker"),
        (tmp_path / "missing.yml", "not found"),
    ]:
        data["space"] = {"type": "template", "template": str(template)}
        with pytest.raises(ConfigError, match=rf"space\.template: .*{expected}"):
            load_config(write_config(data))


def test_relative_paths_resolve_against_the_template_and_best_yaml_runs_anywhere(
    tiny_models, tmp_path, monkeypatch
):
    folder = tmp_path / "recipes"
    folder.mkdir()
    rel = {n: os.path.relpath(p, folder) for n, p in tiny_models.items()}
    text = (
        f"merge_method: linear\nmodels:\n  - model: {rel['a']}\n"
        "    parameters: {weight: {evolve: [0, 1]}}\n"
        f"  - model: {rel['b']}\n"
        "    parameters: {weight: {evolve: [0, 1]}}\ndtype: float32\n"
    )
    (folder / "merge.yml").write_text(text)
    monkeypatch.chdir(tiny_models["a"])  # the working directory must not matter
    config = TemplateSpaceConfig.model_validate(
        {"template": "recipes/merge.yml"}, context={"base_dir": str(tmp_path)}
    )
    space = TemplateSpace(config, SourceSet(models=()))
    x = np.array([0.2, 0.6])
    built_from = [Path(m.model.model.path) for m in space.decode(x).models]
    assert built_from == [tiny_models["a"].resolve(), tiny_models["b"].resolve()]
    absolute = space.recipe_yaml(x, space.decode(x))
    assert (
        f"model: {tiny_models['a'].resolve()}\n" in absolute
        and rel["a"] not in absolute
    )
    kept = TemplateSpace(
        config.model_copy(update={"keep_relative_paths": True}), SourceSet(models=())
    )
    assert kept.recipe_yaml(x, None) == text.replace(
        "{evolve: [0, 1]}", "0.2", 1
    ).replace("{evolve: [0, 1]}", "0.6", 1)
    # A run config with no sources block gets the template's models as sources.
    run = {
        k: v
        for k, v in tiny_config(tiny_models, tmp_path / "run").items()
        if k != "sources"
    }
    run["space"] = {"type": "template", "template": "recipes/merge.yml"}
    loaded = parse_config(run, "c.yml", tmp_path)
    assert [(m.name, Path(m.path)) for m in loaded.sources.models] == [
        ("a", tiny_models["a"].resolve()),
        ("b", tiny_models["b"].resolve()),
    ]
    assert loaded.space.recipe == text  # the run keeps the exact text it searched


def test_a_value_mergekit_rejects_is_an_invalid_genome(tiny_models):
    space = space_for(
        f"merge_method: linear\nmodels:\n  - model: {tiny_models['a']}\n"
        f"    parameters: {{weight: {{evolve: [0, 1]}}}}\n"
    )
    # Corrupt the parsed text so that filling it yields no valid configuration.
    space.template.text = space.template.text.replace(
        "merge_method: linear", "merge_method: lineax"
    )
    with pytest.raises(InvalidGenomeError):
        space.decode(np.array([0.5]))


def test_toy_template_run_writes_the_template_with_markers_filled(
    toy_zoo, tmp_path, monkeypatch
):
    """configs/toy_template.yml on the toy zoo: best.yml is the template file, changed
    only at the markers (and its relative model paths, made absolute so that
    mergekit-yaml runs it from the run directory)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_evolve.loop import Evolution

    config = load_config(REPO / "configs" / "toy_template.yml").with_overrides(
        **{
            "output.dir": str(tmp_path / "run"),
            "optimizer.max_evals": 8,
            "fitness.limit": 20,
            "heldout.tasks": [],
            "output.save_final": False,
            "output.plots": False,
        }
    )
    assert config.space.type == "template" and [
        m.name for m in config.sources.models
    ] == ["base", "math", "ja"]
    summary = Evolution(config).run()
    template = (REPO / "configs" / "toy_template.merge.yml").read_text(encoding="utf-8")
    header, best = (
        (tmp_path / "run" / "best.yml").read_text(encoding="utf-8").split("\n", 1)
    )
    assert header == "# rebuild: mergekit-yaml best.yml OUT --random-seed 0"

    # An independent check: the template text with each marker (and each relative
    # model path) replaced by a capture group must match best.yml exactly.
    pattern = re.escape(template)
    for marker in FLOW_MARKER.findall(template):
        capture = r"(\[[^\]]*\])" if "count:" in marker else NUMBER
        pattern = pattern.replace(re.escape(marker), capture, 1)
    for name in ("base", "math", "ja"):
        pattern = pattern.replace(
            re.escape(f"../.cache/toy_zoo/{name}"),
            re.escape(str(toy_zoo[name].resolve())),
            1,
        )
    match = re.fullmatch(pattern, best)
    assert match, best
    filled = []
    for group in match.groups():
        filled += json.loads(group) if group.startswith("[") else [float(group)]
    genes = list(summary["best_genes"].values())
    assert len(filled) == len(genes) == 8
    assert filled == pytest.approx(genes, abs=1e-6)

    # With keep_relative_paths the text differs from the template at the markers only.
    space = make_space(
        config.space.model_copy(update={"keep_relative_paths": True}),
        load_sources(config.sources),
    )
    genome = np.asarray(
        json.loads(
            (tmp_path / "run" / "history.jsonl")
            .read_text()
            .splitlines()[summary["fitness"]["best_index"]]
        )["genome"]
    )
    only_markers = space.recipe_yaml(genome, space.decode(genome))
    assert (
        only_markers.splitlines()[4:7] == template.splitlines()[4:7]
    )  # relative paths as written
    assert [
        a == b
        for a, b in zip(only_markers.splitlines(), template.splitlines(), strict=True)
    ].count(False) == 4

    # best.yml runs with mergekit (as mergekit-yaml would) from another directory.
    monkeypatch.chdir(tmp_path)
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(best))
    run_merge(
        merge_config,
        str(tmp_path / "merged"),
        options=MergeOptions(write_model_card=False, quiet=True),
    )
    assert (tmp_path / "merged" / "config.json").is_file()
