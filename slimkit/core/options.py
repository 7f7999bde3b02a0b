"""Technique configs from options: keyword options (Python), KEY=VALUE pairs (the CLI's
`-o`), checked against the config's fields, so every front end builds the same object.

Values of `-o` are read by the type of the field's default: true/false for booleans,
integers (or `none`), numbers, comma-separated lists for name patterns. A method that
takes other methods (`mixed`: fields `low` and `low_options`) takes their options as
`-o low.group_size=64`, read by the types of the method named in `-o low=...` (or its
default).
"""

from __future__ import annotations

from dataclasses import fields

from slimkit.core import registry
from slimkit.core.errors import SlimkitError


def make_config(method: str, options: dict, stage: str | None = None):
    """The validated Config of `method` from keyword options (lists become tuples)."""
    technique = registry.get(method, stage)
    known = {f.name for f in fields(technique.config_cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SlimkitError(
            f"unknown option(s) {', '.join(unknown)} for {technique.stage} method '{method}': "
            f"its options are {', '.join(sorted(known)) or 'none'}"
        )
    return technique.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def parse_options(method: str, pairs: list[str], stage: str | None = None) -> dict:
    """CLI `-o KEY=VALUE` pairs -> typed options of `method`'s Config."""
    technique = registry.get(method, stage)
    config_fields = [f for f in fields(technique.config_cls) if f.init]
    defaults = {f.name: f.default for f in config_fields}
    types = {f.name: str(f.type) for f in config_fields}
    options: dict = {}
    nested = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SlimkitError(f"option '{pair}' is not KEY=VALUE: write e.g. -o group_size=64")
        outer, dot, inner = key.partition(".")
        if dot and f"{outer}_options" in defaults:
            nested.append((outer, inner, value.strip()))
            continue
        if key not in defaults:
            raise SlimkitError(f"unknown option '{key}' for {technique.stage} method '{method}': "
                               f"its options are {', '.join(sorted(defaults)) or 'none'}")
        if types[key].startswith("dict"):
            raise SlimkitError(f"option {key} takes the options of another method: write -o {key.removesuffix('_options')}.OPTION=VALUE, "
                               f"e.g. -o {key.removesuffix('_options')}.group_size=64")
        options[key] = _parse_value(key, value.strip(), defaults[key], types[key])
    for outer, inner, value in nested:
        sub_method = options.get(outer, defaults[outer])
        if sub_method == "none":
            raise SlimkitError(f"option {outer}.{inner}: {outer}=none takes no options")
        options.setdefault(f"{outer}_options", {}).update(parse_options(sub_method, [f"{inner}={value}"], stage))
    return options


def _parse_value(key: str, value: str, default, type_name: str):
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SlimkitError(f"option {key} takes true or false, got '{value}'")
        return value.lower() in ("true", "1", "yes")
    if isinstance(default, tuple) or type_name.startswith("tuple"):
        if default is None and value.lower() == "none":
            return None
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if "float" in type_name:
        if "None" in type_name and value.lower() == "none":
            return None
        try:
            return float(value)
        except ValueError:
            raise SlimkitError(f"option {key} takes a number, got '{value}'") from None
    if isinstance(default, int) or default is None:
        optional = default is None or "None" in type_name  # e.g. group_size: int | None = 64
        if optional and value.lower() == "none":
            return None
        try:
            return int(value)
        except ValueError:
            raise SlimkitError(f"option {key} takes an integer{' or none' if optional else ''}, got '{value}'") from None
    return value


def apply(model, method: str, options: dict, ctx: registry.Context, stage: str | None = None):
    """Run the registered `method` on a loaded `model` with keyword `options`: the one way
    the public calls, recipes and the search reach a technique."""
    technique = registry.get(method, stage)
    config = make_config(method, options, stage)
    ctx.seed_everything()
    return technique.apply(model, config, ctx)
