"""The model families and what runs any of them: `forward(params, tokens, cfg)` and the rest of
`gptflax.models.transformer`, over the family that `cfg`'s type names (`registry`)."""

from gptflax.config import Gemma3Config, GPTConfig, LlamaConfig, QwenConfig
from gptflax.models import gemma3, gpt, llama, qwen
from gptflax.models.registry import (
    config_from_dict,
    config_to_dict,
    family,
    family_name,
    register,
)
from gptflax.models.transformer import (
    check_context,
    forward,
    head,
    head_kernel,
    hidden,
    hidden_cached,
    hidden_packed,
    init_cache,
    run_blocks,
)

register("gpt", GPTConfig, gpt)
register("llama", LlamaConfig, llama)
register("gemma3", Gemma3Config, gemma3)
register("qwen", QwenConfig, qwen)


def init_params(key, cfg) -> dict:
    """Fresh params of `cfg`'s family."""
    return family(cfg).init_params(key, cfg)


__all__ = [
    "check_context", "config_from_dict", "config_to_dict", "family", "family_name", "forward",
    "head", "head_kernel", "hidden", "hidden_cached", "hidden_packed", "init_cache", "init_params",
    "register", "run_blocks",
]  # fmt: skip
