"""Typed configs: YAML file → `key=value` overrides → nested dataclasses, with clear errors.

A config file may name a `base:` file (relative to itself) whose values it overrides, so realistic
configs state only what differs from a shared recipe. The resolved config is saved in the run folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from facemae_dist.errors import FacemaeError

T = TypeVar("T")

# each trainer's config class: its command, its configs/ folder, and the top-level sections only it
# has (an unknown one of those means the file was written for the other trainer)
_TRAINERS = {
    "PretrainConfig": ("facemae pretrain", "configs/mae", ("irm", "model")),
    "RecogConfig": ("facemae train", "configs/recog", ("backbone", "eval", "head")),
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a dict, merged over its `base:` chain (each base relative to its file)."""
    path = Path(path)
    if path.resolve() in [p.resolve() for p in _chain]:
        cycle = " → ".join(str(p) for p in (*_chain, path))
        raise FacemaeError(
            f"config base: files form a cycle ({cycle}): remove one of these base: lines"
        )
    if not path.is_file():
        # a base: target: name the file whose base: line points here, not only the missing one
        if _chain:
            what = f"{_chain[-1]}: base: {path}"
            fix = (
                "make that base: line name an existing .yaml file "
                f"(relative to {_chain[-1].name}'s folder)"
            )
        else:
            what, fix = f"config {path}", "pass a .yaml file (see configs/)"
        kind = "is a folder, not a file" if path.is_dir() else "not found"
        raise FacemaeError(f"{what} {kind}: {fix}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        # PyYAML's message spans lines (context, snippet, caret): keep the position and the problem
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise FacemaeError(f"{path}: invalid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise FacemaeError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise FacemaeError(
            f"{path}: base: must be a file name (relative to {path.parent}), got {base!r}"
        )
    return _merge(load_yaml(path.parent / base, (*_chain, path)), data) if base else data


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """`optim.base_lr=1e-3 data.global_batch=64` → nested dict updates (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FacemaeError(f"override {item!r}: expected section.key=value, e.g. run.epochs=10")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FacemaeError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else None
    return data


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        args = tuple(a for a in args if a is not type(None))
        return None if value is None else _convert(args[0], value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise FacemaeError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: (beta1, beta2)
            if len(value) != len(args):
                raise FacemaeError(f"{where}: expected {len(args)} values, got {value!r}")
        else:  # list[T] or tuple[T, ...]
            args = (args[0] if args else Any,) * len(value)
        items = enumerate(zip(args, value, strict=True))
        return origin(_convert(t, v, f"{where}[{i}]") for i, (t, v) in items)
    if origin is dict:
        if not isinstance(value, dict):
            raise FacemaeError(f"{where}: expected a mapping (key: value), got {value!r}")
        key_tp, value_tp = args or (Any, Any)
        return {
            _convert(key_tp, k, where): _convert(value_tp, v, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp in (int, float) and isinstance(value, bool):  # bool is an int subclass: not a count
        raise FacemaeError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is float:
        try:  # YAML 1.1 reads "5e-3" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise FacemaeError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise FacemaeError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys are an error that lists the valid ones."""
    if not isinstance(data, dict):
        raise FacemaeError(f"{where or 'config'}: expected a section (mapping), got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hint = "" if where else _other_trainer_hint(cls, unknown[0])
        raise FacemaeError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}{hint}; "
            f"valid keys here: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _convert(hints[name], value, f"{where}.{name}" if where else name)
        for name, value in data.items()
    }
    return cls(**kwargs)


def read_json(path: str | Path, what: str, fix: str) -> Any:
    """The JSON in `path` (an export's model.json, a plan), or a FacemaeError naming `what` and `fix`."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FacemaeError(f"{what}: {path} is not valid JSON ({exc}); {fix}") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: readers and a resume after a kill see
    the old file or the new one, never half of one (the temporary name is per process, so ranks
    writing the same file do not collide)."""
    import os

    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_json_kind(meta: Any) -> str | None:
    """What an export's model.json describes: "facemae" (`facemae pretrain`), "recognizer"
    (`facemae train`), or None."""
    if isinstance(meta, dict) and "name" in meta and "kwargs" in meta:
        return "facemae"
    if isinstance(meta, dict) and "backbone" in meta and "embedding_size" in meta:
        return "recognizer"
    return None


def _other_trainer_hint(cls: type, key: str) -> str:
    """A hint that the file is for the other trainer when top-level `key` is a section only that
    trainer's config has (irm for pretrain, head for train), else ""."""
    for name, (command, _, sections) in _TRAINERS.items():
        if name != cls.__name__ and key in sections:
            return f" (this looks like a `{command}` config)"
    return ""


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    data = load_yaml(path)
    # an empty file leaves data.train unset, which would surface later as "no shard manifest at
    # manifest.json": say here that the file set nothing
    if not data and not any(o.startswith("data.train=") for o in overrides):
        folder = _TRAINERS.get(cls.__name__, ("", "configs", ()))[1]
        raise FacemaeError(
            f"config file {path} is empty (data.train is not set): pass a config from {folder}/, "
            "or set data.train=SHARDS/train"
        )
    return from_dict(cls, apply_overrides(data, overrides))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
