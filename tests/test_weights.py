"""GPT-2 weights (Book §5.5): a checkpoint in Hugging Face's format and key names, written here,
loads into params whose logits equal an independent forward pass over the file's own tensors."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from gptflax import files, models
from gptflax.config import GPTConfig
from gptflax.weights.gpt2 import gpt2_config, load_gpt2, load_gpt2_file

pytestmark = pytest.mark.lab5

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)


def hf_gpt2_tensors(cfg: GPTConfig, seed=0, prefix="") -> dict:
    """Random tensors with GPT-2's key names and Conv1D (in, out) layouts."""
    rng = np.random.default_rng(seed)
    d, t = cfg.emb_dim, {}

    def put(name, *shape, scale=0.2):
        t[prefix + name] = (rng.standard_normal(shape) * scale).astype(np.float32)

    put("wte.weight", cfg.vocab_size, d)
    put("wpe.weight", cfg.context_length, d)
    for i in range(cfg.n_layers):
        h = f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            put(f"{h}.{ln}.weight", d, scale=1.0)
            put(f"{h}.{ln}.bias", d)
        put(f"{h}.attn.c_attn.weight", d, 3 * d)
        put(f"{h}.attn.c_attn.bias", 3 * d)
        put(f"{h}.attn.c_proj.weight", d, d)
        put(f"{h}.attn.c_proj.bias", d)
        put(f"{h}.mlp.c_fc.weight", d, 4 * d)
        put(f"{h}.mlp.c_fc.bias", 4 * d)
        put(f"{h}.mlp.c_proj.weight", 4 * d, d)
        put(f"{h}.mlp.c_proj.bias", d)
        t[f"{prefix}{h}.attn.bias"] = np.tril(
            np.ones((1, 1, cfg.context_length, cfg.context_length), np.float32)
        )
    put("ln_f.weight", d, scale=1.0)
    put("ln_f.bias", d)
    return t


def reference_gpt2_logits(t: dict, tokens: np.ndarray, cfg: GPTConfig) -> np.ndarray:
    """GPT-2's forward pass in float64 numpy, straight from the file's tensors."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    d, n_heads = cfg.emb_dim, cfg.n_heads

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def conv(x, name):
        return x @ t[f"{name}.weight"] + t[f"{name}.bias"]

    b, n = tokens.shape
    x = t["wte.weight"][tokens] + t["wpe.weight"][:n]
    for i in range(cfg.n_layers):
        h = f"h.{i}"
        q, k, v = np.split(conv(ln(x, f"{h}.ln_1"), f"{h}.attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(b, n, n_heads, d // n_heads).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // n_heads)
        scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + conv(a, f"{h}.attn.c_proj")
        f = conv(ln(x, f"{h}.ln_2"), f"{h}.mlp.c_fc")
        f = 0.5 * f * (1 + np.tanh(np.sqrt(2 / np.pi) * (f + 0.044715 * f**3)))
        x = x + conv(f, f"{h}.mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_loaded_params_give_the_reference_logits(tmp_path, prefix):
    tensors = hf_gpt2_tensors(CFG, prefix=prefix)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    params = load_gpt2_file(tmp_path / "model.safetensors", CFG)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12))
    expected = reference_gpt2_logits(
        {k.removeprefix(prefix): v for k, v in tensors.items()}, tokens, CFG
    )
    np.testing.assert_allclose(models.forward(params, tokens, CFG), expected, rtol=2e-4, atol=2e-4)


def test_load_gpt2_resolves_the_file_through_files(tmp_path, monkeypatch):
    cfg = gpt2_config("124M")
    assert cfg.qkv_bias and cfg.context_length == 1024 and cfg.emb_dim == 768
    small = {"gpt2/124M/model.safetensors": files.DataFile("gpt2/124M/model.safetensors", ())}
    monkeypatch.setattr(files, "FILES", {**files.FILES, **small})
    monkeypatch.setattr("gptflax.weights.gpt2.gpt2_config", lambda size: CFG)
    (tmp_path / "gpt2" / "124M").mkdir(parents=True)
    save_file(hf_gpt2_tensors(CFG), str(tmp_path / "gpt2" / "124M" / "model.safetensors"))
    loaded_cfg, params = load_gpt2("124M", cache_dir=tmp_path, mirrors=[])
    assert loaded_cfg == CFG and params["trf_blocks"]["att"]["W_query"]["bias"].shape == (2, 32)


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(files.DataFileError) as err:
        load_gpt2("355M", cache_dir=tmp_path, mirrors=[], download=False)
    assert "huggingface.co/openai-community/gpt2-medium" in str(err.value)
    assert str(tmp_path / "gpt2" / "355M" / "model.safetensors") in str(err.value)
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        load_gpt2("7B")


def test_damaged_or_mismatched_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_gpt2_file(bad, CFG)
    tensors = hf_gpt2_tensors(CFG)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="wte.weight: shape"):
        load_gpt2_file(tmp_path / "m.safetensors", CFG.replace(emb_dim=64, n_heads=4))
    del tensors["h.1.mlp.c_fc.bias"]
    save_file(tensors, str(tmp_path / "m2.safetensors"))
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.bias"):
        load_gpt2_file(tmp_path / "m2.safetensors", CFG)
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_gpt2_file(tmp_path / "m.safetensors", CFG.replace(qkv_bias=False))
