"""The GGUF reader: llama.cpp's own writer makes the file; the metadata and the tensors read back
equal what was written (and what the `gguf` package's reader reads); a cut file is one line."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from gptflax.gguf import GGUFError, read_gguf

pytestmark = pytest.mark.labllama


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "t.gguf"
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((6, 64)).astype(np.float32),
        "b.weight": rng.standard_normal((4, 96)).astype(np.float32),
        "c.norm": rng.standard_normal(64).astype(np.float32),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_token_list(["<s>", "a", "ab", "日本"])
    writer.add_token_scores([-1.0, -2.0, -3.5, -4.0])
    writer.add_add_bos_token(True)
    writer.add_string("general.name", "tiny")
    writer.add_tensor("a.weight", tensors["a.weight"])
    writer.add_tensor(
        "b.weight", gguf.quants.quantize(tensors["b.weight"], Q.Q8_0), raw_dtype=Q.Q8_0
    )
    writer.add_tensor("c.norm", tensors["c.norm"].astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, tensors


def test_metadata_and_tensors_read_back_as_written(written):
    path, tensors = written
    file = read_gguf(path)
    meta = file.metadata
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["llama.block_count"] == 3 and meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.tokens"] == ["<s>", "a", "ab", "日本"]
    assert meta["tokenizer.ggml.scores"] == [-1.0, -2.0, -3.5, -4.0]
    assert set(file.tensors) == set(tensors)
    np.testing.assert_array_equal(file.dequantize("a.weight"), tensors["a.weight"])
    q8 = gguf.quants.dequantize(gguf.quants.quantize(tensors["b.weight"], Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(file.dequantize("b.weight"), q8)
    np.testing.assert_array_equal(file.dequantize("c.norm"), tensors["c.norm"].astype(np.float16))
    reference = gguf.GGUFReader(str(path))  # llama.cpp's reader agrees, tensor by tensor
    for t in reference.tensors:
        np.testing.assert_array_equal(
            gguf.quants.dequantize(t.data, t.tensor_type), file.dequantize(t.name)
        )


@pytest.mark.parametrize("keep", [0, 3, 10, 30, 200, 400, -200, -1])
def test_a_file_cut_anywhere_is_one_line_that_says_so(written, tmp_path, keep):
    path, _ = written
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(GGUFError) as err:
        read_gguf(cut)
    message = str(err.value)
    assert "\n" not in message and str(cut) in message
    assert any(w in message for w in ("too short", "cut short", "ends at byte", "not a GGUF"))


def test_not_a_gguf_file_and_a_missing_one(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match=r"not a GGUF file \(it starts with b'PK"):
        read_gguf(tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="cannot read"):
        read_gguf(tmp_path / "missing.gguf")
