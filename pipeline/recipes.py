"""Reading YAML recipes into typed dataclasses: ``base:`` inheritance, ``--set`` overrides, key checks.

Generic machinery behind :func:`pipeline.config.load_config`:

* :func:`read_recipe` follows ``base: other.yaml`` links (relative to the recipe's folder) and merges
  dictionaries recursively, so an ablation recipe states only what differs;
* :func:`apply_overrides` applies ``section.key=value`` strings, parsing each value with
  ``yaml.safe_load`` (``optim.lr=2e-5``, ``data.orders=[ti,it]``, ``model.tokenizer=null``);
* :func:`resolve_path` finds a file a recipe names (the working directory first, then the repository);
* :func:`build_dataclass` turns the dictionary into the annotated dataclasses, refusing unknown keys
  with a "did you mean" suggestion (difflib) and values of the wrong type.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> Path:
    """A path as given (absolute, or relative to the working directory), else relative to the repository."""
    p = Path(path)
    if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists():
        return p
    return REPO_ROOT / p


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and the fix."""


Proportion = typing.NewType("Proportion", float)
"""A sampling weight: a number, ``"12.5%"`` or ``"1/3"`` (see :func:`parse_proportion`)."""


def resolve_recipe(path_or_name: str | os.PathLike, recipes_dir: Path) -> Path:
    """A recipe path, or the name of a recipe in ``recipes_dir`` (``tiny_pt`` or ``tiny_pt.yaml``)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    for candidate in (recipes_dir / path, recipes_dir / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in recipes_dir.glob("*.yaml"))
    close = difflib.get_close_matches(path.stem, shipped, n=1)
    hint = f"did you mean `{close[0]}`?" if close else f"shipped recipes: {', '.join(shipped)}"
    raise ConfigError(f"recipe {str(path_or_name)!r} not found (neither a file nor a recipe in "
                      f"{recipes_dir}); {hint}")


def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw recipe dictionary with its ``base:`` chain merged in (this file's keys win)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"recipe {path} extends itself through `base:` ({' -> '.join(map(str, _seen))})")
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found (named by `base:` in {_seen[-1] if _seen else 'the command'})")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model, data, optim, train)")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return merge(read_recipe(path.parent / base, _seen + (path,)), raw)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dictionary merge: mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; each value is parsed with ``yaml.safe_load``."""
    raw = merge(raw, {})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=2e-5)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None
        *parents, leaf = key.strip().split(".")
        node = raw
        for part in parents:
            node[part] = merge(node[part], {}) if isinstance(node.get(part), dict) else node.get(part, {})
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: `{part}` is a value, not a section")
        node[leaf] = value
    return raw


# --------------------------------------------------------------------------- typed building


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
    return keys


def _unknown_key(root: type, cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean `{prefix}{close[0]}`?"
    else:  # maybe the right key in another section (``train.lr`` -> ``optim.lr``)
        everywhere = _all_keys(root)
        elsewhere = [k for k in everywhere if k.rsplit(".", 1)[-1] == key]
        elsewhere = elsewhere or difflib.get_close_matches(prefix + key, everywhere, n=1)
        hint = f"did you mean `{elsewhere[0]}`?" if elsewhere else f"known keys here: {', '.join(names)}"
    return ConfigError(f"config key `{prefix}{key}` unknown; {hint}")


def build_dataclass(cls: type, raw: Any, prefix: str = "", root: type | None = None) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, checking keys and converting values by annotation."""
    root = root or cls
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"config `{where}` must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key(root, cls, str(key), prefix)
    kwargs = {key: _coerce(hints[key], value, prefix + key, root) for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config `{where}`: {e}") from None


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(hint: Any, value: Any, key: str, root: type) -> Any:
    """Check/convert ``value`` to the annotated type; YAML's ``1e-4`` (read as a string) becomes a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, root)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".", root)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config `{key}` must be a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"config `{key}` must have {len(args)} values, got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]", root) for i, (a, v) in enumerate(zip(args, value)))
        return [_coerce(args[0], v, f"{key}[{i}]", root) for i, v in enumerate(value)]
    if hint is Proportion:
        return parse_proportion(value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config `{key}` must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int)
                                           or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"config `{key}` must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config `{key}` must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config `{key}` must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")  # a bug, not user input


def parse_proportion(value: Any, key: str) -> float:
    """A sampling weight: a number, ``"12.5%"`` or ``"1/3"``; must be finite and >= 0."""
    text = str(value).strip()
    try:
        if isinstance(value, bool):
            raise ValueError
        if text.endswith("%"):
            number = float(text[:-1]) / 100
        elif "/" in text:
            num, den = text.split("/")
            number = float(num) / float(den)
        else:
            number = float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"`{key}`: proportion {value!r} does not parse; write a number (0.103), "
                          "a percentage (10.3%) or a fraction (1/3)") from None
    if not 0 <= number < float("inf"):
        raise ConfigError(f"`{key}`: proportion {value!r} must be a finite number >= 0")
    return number
