"""Model families: one module of pure functions per architecture, found from the config's type.

A family module (`gptflax.gpt`, or a toy one in the tests) provides the functions and the table
named in `INTERFACE`, over a params dict whose transformer blocks are stacked under "trf_blocks".
Decoding, the losses, the training loop, checkpoints, sharding, the classification head, freezing
and LoRA call them through `family(cfg)` and never ask which family they hold. A new family is one
module and a frozen-dataclass config, joined by `register`. The config passes through `jax.jit` as
a static value, so decorate its class with `jax.tree_util.register_static`, as `GPTConfig` is.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from gptflax import gpt, llama
from gptflax.config import GPTConfig, LlamaConfig

INTERFACE = {
    "init_params": "(key, cfg) -> params",
    "embed": "(params, tokens (B, T), cfg, *, key=None) -> (B, T, D)",
    "run_blocks": "(params['trf_blocks'], x (B, T, D), cfg, *, key=None) -> (B, T, D)",
    "final_norm": "(params, x (B, T, D), cfg) -> (B, T, D)",
    "head": "(params, h (B, T, D)) -> (B, T, V)",
    "hidden": "(params, tokens, cfg, *, key=None) -> (B, T, D): final_norm(run_blocks(embed))",
    "forward": "(params, tokens, cfg, *, key=None) -> (B, T, V): head(hidden)",
    "init_cache": "(cfg, batch_size, length, dtype) -> an empty KV cache of `length` positions",
    "hidden_cached": "(params, tokens (B, S), cache, start (B,), cfg) -> ((B, S, D), cache)",
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
            "call gptflax.families.register(name, config_type, module) first"
        ) from None


def config_to_dict(cfg) -> dict:
    """A JSON-ready record of a config, naming its family."""
    family(cfg)  # a clear error for a config of no registered family
    name = next(n for n, t in _CONFIGS.items() if t is type(cfg))
    return {"family": name, **dataclasses.asdict(cfg)}


def config_from_dict(record: dict):
    """The config that `config_to_dict` recorded (a record without a family is a GPT's)."""
    fields = dict(record)
    name = fields.pop("family", "gpt")
    if name not in _CONFIGS:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_CONFIGS)}")
    return _CONFIGS[name](**fields)


register("gpt", GPTConfig, gpt)
register("llama", LlamaConfig, llama)
