from dataclasses import dataclass

import pytest

from slimkit.core import registry
from slimkit.core.errors import SlimkitError


@dataclass(frozen=True)
class _Cfg:
    level: int = 1


def test_register_and_get(monkeypatch):
    monkeypatch.setattr(registry, "TECHNIQUES", {})
    registry.register("demo-method", "quantize", _Cfg, "a demo")(lambda model, config: model)
    t = registry.get("demo-method", "quantize")
    assert t.config_cls is _Cfg and t.apply("m", _Cfg()) == "m"
    assert [x.name for x in registry.techniques("quantize")] == ["demo-method"]
    with pytest.raises(SlimkitError, match="did you mean 'demo-method'"):
        registry.get("demo-metod")
    with pytest.raises(SlimkitError, match="unknown prune method"):
        registry.get("demo-method", "prune")
    with pytest.raises(ValueError, match="twice"):
        registry.register("demo-method", "quantize", _Cfg, "again")(lambda m, c: m)
