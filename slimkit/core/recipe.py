"""Recipes: an ordered list of technique steps, as data.

A recipe is what `slimkit run recipe.yaml` reproduces and what every artifact
records. YAML, JSON, Python and the CLI all build the same typed object:

    model: smollm2-135m        # optional: the CLI argument wins
    seed: 0                    # the Context's seed, for every step
    data: my_corpus.txt        # optional: what calibrating steps read (its calibration split); default pydoc
    steps:
      - method: wanda          # a registered technique (see `slimkit.core.registry`)
        sparsity: 0.5
      - method: int8-dynamic

Each step's keys are checked against its technique's config dataclass: an
unknown key or a value of the wrong type is an error that names the key's path
(`steps[1].group_size`) and the keys that would be valid. Range checks are the
config's own `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from slimkit.core import registry
from slimkit.core.data import calibration_source
from slimkit.core.errors import SlimkitError

_TOP_KEYS = {"model", "seed", "data", "steps", "name"}
WRITES = ("checkpoint_dir", "log_dir", "cache_teacher")  # config fields naming a place a step writes to


@dataclass(frozen=True)
class Step:
    method: str
    config: object  # an instance of the technique's config class

    def to_dict(self) -> dict:
        return {"method": self.method, **_plain(dataclasses.asdict(self.config))}


@dataclass(frozen=True)
class Recipe:
    steps: tuple[Step, ...] = ()
    model: str | None = None
    seed: int = 0
    name: str | None = None
    data: str | None = None  # calibration text for every step, as --data takes it (None: the embedded corpus)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_dict(cls, data: object, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise SlimkitError(f"{where} must be a mapping with 'steps', got {type(data).__name__}")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise SlimkitError(f"{where}: unknown key '{sorted(unknown)[0]}'; valid keys are {', '.join(sorted(_TOP_KEYS))}")
        steps = data.get("steps", [])
        if not isinstance(steps, list):
            raise SlimkitError(f"{where}.steps must be a list of steps, got {type(steps).__name__}")
        model = _typed(data.get("model"), str | None, f"{where}.model")
        seed = _typed(data.get("seed", 0), int, f"{where}.seed")
        name = _typed(data.get("name"), str | None, f"{where}.name")
        text = _typed(data.get("data"), str | None, f"{where}.data")
        return cls(tuple(_step(s, f"{where}.steps[{i}]") for i, s in enumerate(steps)), model, seed, name, text)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise SlimkitError(f"no such recipe file: {path}; check the path")
        import yaml

        is_json = path.suffix.lower() == ".json"
        try:
            data = json.loads(path.read_text()) if is_json else yaml.safe_load(path.read_text())
        except (ValueError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SlimkitError(f"{path} is not valid {'JSON' if is_json else 'YAML'} ({first}): fix the syntax") from exc
        return cls.from_dict(data, where=path.name)

    @classmethod
    def of(cls, *steps: tuple[str, dict] | str, model: str | None = None, seed: int = 0) -> "Recipe":
        """Recipe.of(("wanda", {"sparsity": 0.5}), "int8-dynamic")"""
        items = [{"method": s} if isinstance(s, str) else {"method": s[0], **s[1]} for s in steps]
        return cls.from_dict({"steps": items, "model": model, "seed": seed})

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict:
        out: dict = {"steps": [s.to_dict() for s in self.steps], "seed": self.seed}
        if self.model is not None:
            out["model"] = self.model
        if self.name is not None:
            out["name"] = self.name
        if self.data is not None:
            out["data"] = self.data
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else self.to_yaml())
        return path

    @property
    def label(self) -> str:
        """A short human name: 'wanda(sparsity=0.5) -> int8-dynamic'."""
        if not self.steps:
            return "original"
        parts = []
        for s in self.steps:
            changed = {k: v for k, v in dataclasses.asdict(s.config).items() if v != _default(s.config, k)}
            args = ", ".join(f"{k}={v}" for k, v in changed.items())
            parts.append(f"{s.method}({args})" if args else s.method)
        return " -> ".join(parts)

    def confined(self, out: str | Path) -> "Recipe":
        """This recipe with every place a step writes to (`WRITES`) moved inside `out`.

        Such paths must be relative and stay inside `out` once resolved (no
        `..`, absolute path or symlink leading out of it), so a recipe from
        elsewhere cannot write outside the output directory.
        """
        root = Path(out).expanduser().resolve()
        steps = []
        for i, step in enumerate(self.steps):
            moved = {}
            for name in WRITES:
                value = getattr(step.config, name, None)
                if value is None:
                    continue
                target = (root / value).resolve()
                if Path(value).is_absolute() or target == root or not target.is_relative_to(root):
                    raise SlimkitError(f"steps[{i}].{name}: '{value}' is not inside the output directory {out}: "
                                       f"give a relative path below it, e.g. {name}: {name.removesuffix('_dir')}")
                moved[name] = str(target)
            steps.append(Step(step.method, dataclasses.replace(step.config, **moved)) if moved else step)
        return dataclasses.replace(self, steps=tuple(steps))

    def written(self, out: str | Path) -> list[str]:
        """The top-level entries of `out` that this (confined) recipe's steps write to."""
        root = Path(out).expanduser().resolve()
        paths = [Path(v).resolve() for s in self.steps for n in WRITES if (v := getattr(s.config, n, None)) is not None]
        return sorted({p.relative_to(root).parts[0] for p in paths if p.is_relative_to(root)})

    # ------------------------------------------------------------------ running

    def context(self, on_step=None) -> registry.Context:
        """The Context every step receives: this recipe's seed and calibration text."""
        return registry.Context(calibration_source(self.data), self.seed, on_step=on_step)

    def apply(self, model, on_step=None):
        """Run the steps in order on a loaded model (each returns a new one); returns the last."""
        ctx = self.context(on_step)
        ctx.seed_everything()
        current = model
        for step in self.steps:
            current = registry.get(step.method).apply(current, step.config, ctx)
        return current


def _step(data: object, where: str) -> Step:
    if not isinstance(data, dict):
        raise SlimkitError(f"{where} must be a mapping with a 'method' key, got {type(data).__name__}")
    if "method" not in data:
        raise SlimkitError(f"{where} has no 'method': name a technique (see `slimkit quantize --list`)")
    method = _typed(data["method"], str, f"{where}.method")
    try:
        technique = registry.get(method)
    except SlimkitError as exc:
        raise SlimkitError(f"{where}.method: {exc}") from None
    cls = technique.config_cls
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key == "method":
            continue
        if key not in names:
            raise SlimkitError(f"{where}.{key}: unknown key for '{method}'; valid keys are {', '.join(names) or '(none)'}")
        kwargs[key] = _typed(value, hints[key], f"{where}.{key}")
    try:
        return Step(method, cls(**kwargs))
    except SlimkitError as exc:
        raise SlimkitError(f"{where}: {exc}") from None


def _typed(value, hint, where: str):
    """Check (and lightly coerce: int -> float, list -> tuple) a value against a type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _typed(value, option, where)
            except SlimkitError as exc:
                errors.append(exc)
        raise errors[0]
    if hint is typing.Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SlimkitError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else typing.Any
        items = [_typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise SlimkitError(f"{where}: expected one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SlimkitError(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type):
        if isinstance(value, bool) and hint is not bool:
            raise SlimkitError(f"{where}: expected {hint.__name__}, got a boolean {value!r}")
        if not isinstance(value, hint):
            raise SlimkitError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _default(config, key):
    f = next(f for f in dataclasses.fields(config) if f.name == key)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
