"""From a YAML file to a validated :class:`~mergekit_evolve.config.RunConfig`.

Reading happens in three steps, each in one place:

1. the file is read as UTF-8 text and parsed with ``yaml.safe_load``;
2. hooks rewrite the mapping: a config of mergekit's deprecated ``mergekit-evolve``
   (a top-level ``genome:``) is converted (:mod:`.legacy`), and a ``template`` space
   without ``sources`` gets them from the models its template names;
3. :func:`~mergekit_evolve.config.validate_config` validates it.

Every problem is one :class:`~mergekit_evolve.errors.ConfigError` line naming the
file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain
    PyYAML keeps the last one silently, so a typo'd second block wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                earlier = first_line.get(key)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            line = key_node.start_mark.line + 1
            if earlier is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} on line {line} (first on line {earlier})",
                    key_node.start_mark,
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The parsed content of a YAML file (``yaml.safe_load`` rules, and no key twice).

    Raises:
        ConfigError: the file is missing, not UTF-8 text, or not YAML.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not UTF-8 text (save it as UTF-8; binary files and UTF-16 "
            "are not configs)"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror or e}") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: not a text file (it holds NUL bytes)")
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        first_line = str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None)
        if problem and mark is not None:
            first_line = f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
        raise ConfigError(f"{path}: not valid YAML: {first_line}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None


def parse_config(data: Any, source: str, base_dir: str | Path | None) -> RunConfig:
    """Validates a config mapping after the template hook (a ``template`` space may
    omit ``sources``).

    Raises:
        ConfigError: one line naming the field and what was expected.
    """
    from .config import validate_config
    from .spaces.template import with_template_sources

    if isinstance(data, dict):
        data = with_template_sources(data, source, base_dir)
    return validate_config(data, source, base_dir)


def load_config(path: str | Path) -> RunConfig:
    """Reads and validates a run config YAML (ours, or a legacy ``mergekit-evolve``
    config with a top-level ``genome:``, converted first; see :mod:`.legacy`).

    Raises:
        ConfigError: the file is missing, is not YAML, or does not validate.
    """
    path = Path(path)
    data = read_yaml(path)  # before any heavy import: a typo answers at once
    from .legacy import convert_if_legacy

    base_dir = path.resolve().parent
    data = convert_if_legacy(data, source=str(path), base_dir=base_dir)
    return parse_config(data, source=str(path), base_dir=base_dir)
