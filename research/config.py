"""Configs: ``configs/NAME.py`` files defining ``get_config(arg)``, picked as ``NAME.py:k=v,…``.

In ``path.py:k=v,…`` a key without a dot selects a variant that ``get_config`` declares through
``parse_arg``; a dotted key (``freeze.depth=2``) overrides that field of the returned config.
Values are Python literals (``0.1``, ``True``, ``(5, 6)``, ``'adamw'``) or bare strings.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from pathlib import Path

import ml_collections

from research.errors import ConfigError


def split_pairs(arg: str | None) -> list[tuple[str, object]]:
    """``"a=1,b=(2,3),c=x"`` → ``[("a", 1), ("b", (2, 3)), ("c", "x")]``.

    Commas split pairs outside brackets and quoted strings (a quote's backslash escapes count,
    as in Python); an unclosed quote or an unbalanced bracket is refused."""
    if not arg:
        return []
    pairs = []
    for item in _top_level_items(arg):
        if item.strip():
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"config argument {item!r} is not key=value.")
            pairs.append((key.strip(), _literal(value.strip())))
    return pairs


_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _top_level_items(arg: str) -> list[str]:
    """``arg`` split at the commas outside brackets and quotes."""
    items, start, open_brackets, quote, i = [], 0, [], None, 0
    while i < len(arg):
        char = arg[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in _CLOSING:
            open_brackets.append(char)
        elif char in _CLOSING.values():
            if not open_brackets or _CLOSING[open_brackets.pop()] != char:
                raise ConfigError(f"config argument {arg!r}: {char!r} at character {i + 1} closes "
                                  "no bracket; balance the brackets or quote the value.")
        elif char == "," and not open_brackets:
            items.append(arg[start:i])
            start = i + 1
        i += 1
    if quote or open_brackets:
        what = f"the quote {quote}" if quote else f"the bracket {open_brackets[-1]!r}"
        raise ConfigError(f"config argument {arg!r}: {what} is never closed; close it (quote a "
                          "value holding brackets or commas: key='a,(b').")
    return items + [arg[start:]]


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_arg(arg: str | None, **variants) -> ml_collections.ConfigDict:
    """Variant values for ``get_config``: the defaults ``variants`` updated from ``arg``."""
    chosen = ml_collections.ConfigDict(variants)
    for key, value in split_pairs(arg):
        if "." in key:
            continue  # a field override, applied by ``load``
        if key not in variants:
            raise ConfigError(f"unknown config variant {key!r}; this config's variants are "
                              f"{sorted(variants) or 'none'}. To set a field write section.key=value.")
        chosen[key] = type(variants[key])(value) if variants[key] is not None else value
    return chosen


def load(spec: str) -> ml_collections.ConfigDict:
    """Load ``path/to/config.py[:k=v,…]``: variants go to ``get_config``, fields are overridden."""
    path, _, arg = spec.partition(":")
    config = _module(Path(path)).get_config(arg or None)
    for key, value in split_pairs(arg):
        if "." in key:
            override(config, key, value)
    return config


def _module(path: Path):
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; configs live in configs/*.py.")
    spec = importlib.util.spec_from_file_location(f"transferlab_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg=None).")
    return module


def override(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    """Set ``config.a.b = value``, refusing keys the config does not have."""
    *parents, leaf = dotted.split(".")
    node = config
    for i, name in enumerate(parents + [leaf]):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(name, known, n=3)
            where = ".".join(parents[:i]) or "the config"
            hint = f" Did you mean {', '.join(close)}?" if close else f" Keys there: {known}."
            raise ConfigError(f"unknown config key {dotted!r}: {where} has no {name!r}.{hint}")
        if i < len(parents):
            node = node[name]
    current = node[leaf]
    if isinstance(current, tuple) and value is not None and not isinstance(value, tuple):
        value = (value,)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"config key {dotted!r} holds a {type(current).__name__}; "
                          f"{value!r} does not fit ({e}).") from None
