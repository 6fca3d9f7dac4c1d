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


def read_yaml(path: Path) -> Any:
    """The parsed content of a YAML file.

    Raises:
        ConfigError: the file is missing or is not YAML.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        first_line = str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {first_line}") from None


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
    from .legacy import convert_if_legacy

    path = Path(path)
    data = read_yaml(path)
    base_dir = path.resolve().parent
    data = convert_if_legacy(data, source=str(path), base_dir=base_dir)
    return parse_config(data, source=str(path), base_dir=base_dir)
