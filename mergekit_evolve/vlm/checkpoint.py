"""Safetensors checkpoint I/O for the VLM split: reading, renaming and writing tensors
shard by shard, and building a directory atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BuildError, ConfigError

if TYPE_CHECKING:
    import torch

MANIFEST = "split.json"
"""The cache manifest of a split or padded copy: its fingerprint and version."""
# Files of a model folder that are neither weights nor processor files (processor,
# tokenizer and chat template are the rest).
NOT_PROCESSOR = frozenset(
    {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        MANIFEST,
    }
)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in index order.

    Raises:
        ConfigError: the directory has no safetensors weights.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [model_dir / n for n in dict.fromkeys(names)]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConfigError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are supported)"
    )


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return list(handle.keys())


def read_shard(file: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file (all of them by default)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return {
            k: handle.get_tensor(k) for k in (handle.keys() if names is None else names)
        }


def read_tensors(model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Reads named tensors from a (possibly sharded) safetensors checkpoint."""
    wanted, out = set(names), {}
    for file in weight_files(model_dir):
        present = [k for k in _keys(file) if k in wanted]
        if present:
            out.update(read_shard(file, present))
    return out


def rename_tensor(name: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
    """``name`` with the first matching ``(old, new)`` prefix replaced; None when no
    prefix matches."""
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


class _ShardWriter:
    """Writes a checkpoint shard by shard (each source shard is read, mapped, written
    and freed: a 7B model never has to fit in memory at once)."""

    def __init__(self, out_dir: Path, count: int) -> None:
        self.out_dir, self.count = out_dir, max(count, 1)
        self.index: dict[str, str] = {}
        self.total = 0
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.written += 1
        name = (
            "model.safetensors"
            if self.count == 1
            else f"model-{self.written:05d}-of-{self.count:05d}.safetensors"
        )
        # safetensors refuses views of shared storage: save contiguous copies.
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(self.out_dir / name),
            metadata={"format": "pt"},
        )
        self.index.update({k: name for k in tensors})
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        if self.written != self.count:
            raise BuildError(f"wrote {self.written} shards, expected {self.count}")
        if self.count > 1:
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(
                    {"metadata": {"total_size": self.total}, "weight_map": self.index},
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )


def map_checkpoint(
    src_dir: Path,
    out_dir: Path,
    mapping: Callable[[str], str | None],
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> int:
    """Copies the tensors ``mapping`` keeps (under their new names) into ``out_dir``.

    Returns:
        The number of tensors written.
    """
    files = [(f, {k: mapping(k) for k in _keys(f)}) for f in weight_files(src_dir)]
    files = [
        (f, {k: n for k, n in names.items() if n is not None}) for f, names in files
    ]
    files = [(f, names) for f, names in files if names]
    writer = _ShardWriter(out_dir, len(files) + (1 if extra else 0))
    count = 0
    for file, names in files:
        tensors = read_shard(file, list(names))
        mapped = {
            names[k]: (transform(names[k], t) if transform else t)
            for k, t in tensors.items()
        }
        writer.write(mapped)
        count += len(mapped)
        del tensors, mapped
    if extra:
        writer.write(extra)
        count += len(extra)
    writer.close()
    return count


def copy_files(src_dir: Path, out_dir: Path, keep: Callable[[str], bool]) -> None:
    """Copies the files of ``src_dir`` whose names ``keep`` accepts."""
    for item in sorted(src_dir.iterdir()):
        if item.is_file() and keep(item.name):
            shutil.copy2(item, out_dir / item.name)


def is_weight_file(name: str) -> bool:
    """Whether a file name is a weight file or a weight index."""
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name.endswith(
        ".index.json"
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes ``data`` as indented JSON (used inside :func:`atomic_dir` builds and
    for cache manifests)."""
    path.write_text(
        json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n",
        encoding="utf-8",
    )


def atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Builds ``target`` in a temporary sibling and moves it into place, so an
    interrupted split never leaves a half-written cache entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_processor_file(name: str) -> bool:
    """Whether a file of a VLM folder belongs to its processor (tokenizer, image
    processor, chat template): neither weights nor config."""
    return name not in NOT_PROCESSOR and not is_weight_file(name)


def iter_vlm_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint by its saved name (for tests and inspection)."""
    for file in weight_files(model_dir):
        yield from read_shard(file).items()
