"""Model families: one module of pure functions per architecture, found from the config's type.

A family module provides only what differs between architectures, the functions and the table
named in `INTERFACE`, over a params dict whose transformer blocks are stacked under "trf_blocks";
its output head is `out_head`, or the token embedding when the params have none. Everything
derivable (`hidden`, `forward`, the KV cache, the cached layer loop, the context check) is written
once, in `gptflax.models.transformer`, and the rest of the library calls those, never asking which
family it holds. A new family is one module and a frozen-dataclass config
(`gptflax.config.Architecture`), joined by `register`; decorate the config's class with
`jax.tree_util.register_static` so that it passes through `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

INTERFACE = {
    "init_params": "(key, cfg) -> params",
    "embed": "(params, tokens (B, T), cfg, *, positions (B or 1, T), key=None) -> (B, T, D)",
    "block": "(params of one layer, x (B, T, D), cfg, *, layer, positions, cache=None, key=None)"
    " -> ((B, T, D), the layer's updated cache or None)",
    "final_norm": "(params, x (B, T, D), cfg) -> (B, T, D)",
    "LOGICAL_AXES": "{path suffix: names of its axes}, for gptflax.parallel's sharding rules",
}

_MODULES: dict[type, ModuleType] = {}
_CONFIGS: dict[str, type] = {}  # family name -> config class, for configs read back from JSON


def register(name: str, config_type: type, module: ModuleType) -> None:
    """Make `module` the family of configs of `config_type`, saved under `name` in checkpoints."""

    def provided(name: str) -> bool:  # a function, or (upper-case names) a table
        value = getattr(module, name, None)
        return isinstance(value, dict) if name.isupper() else callable(value)

    if missing := [name for name in INTERFACE if not provided(name)]:
        raise TypeError(f"family {name!r} ({module.__name__}) lacks {', '.join(missing)}")
    _MODULES[config_type] = module
    _CONFIGS[name] = config_type


def family(cfg) -> ModuleType:
    """The module of pure functions for this config's model family."""
    try:
        return _MODULES[type(cfg)]
    except KeyError:
        raise TypeError(
            f"no model family is registered for {type(cfg).__name__}: "
            "call gptflax.models.register(name, config_type, module) first"
        ) from None


def family_name(cfg) -> str:
    """The name the config's family was registered under."""
    family(cfg)  # a clear error for a config of no registered family
    return next(n for n, t in _CONFIGS.items() if t is type(cfg))


def config_to_dict(cfg) -> dict:
    """A JSON-ready record of a config, naming its family."""
    return {"family": family_name(cfg), **dataclasses.asdict(cfg)}


def config_from_dict(record: dict):
    """The config that `config_to_dict` recorded (a record without a family is a GPT's)."""
    fields = dict(record)
    name = fields.pop("family", "gpt")
    if name not in _CONFIGS:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_CONFIGS)}")
    return _CONFIGS[name](**fields)
