# %% [markdown]
# # Lab 2: working with text data (chapter 2)
#
# From raw text to the (B, T, D) input embeddings a GPT consumes: split the-verdict.txt into
# tokens, map them to ids with the book's simple tokenizers and with GPT-2's BPE, cut sliding
# input/target windows, batch them, and look the ids up in token and positional embeddings.

# %%
print('\n# §2.1 The text: Edith Wharton\'s "The Verdict", resolved from cache, mirror or the web')
import jax
import jax.numpy as jnp
import numpy as np

from gptflax import files, nn
from gptflax.data import create_dataloader_v1, sliding_windows
from gptflax.tokenizer import (
    EOT,
    UNK,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    gpt2_tokenizer,
    split_text,
    text_to_token_ids,
)

np.set_printoptions(precision=4, suppress=True)  # 4 digits, as the book prints

path = files.resolve("the-verdict.txt")
raw_text = path.read_text(encoding="utf-8")
print(f"{path}: {len(raw_text):,} characters")
print(raw_text[:99])

# %%
print("\n# §2.2 Tokenizing text: split on whitespace and punctuation, keep the punctuation")
preprocessed = split_text(raw_text)
print(len(preprocessed), "tokens:", preprocessed[:30])

# %%
print("\n# §2.3 Token ids: a vocabulary of the sorted distinct tokens")
vocab = build_vocab(raw_text)
print("vocabulary size:", len(vocab))
print(list(vocab.items())[:8])
tokenizer_v1 = SimpleTokenizerV1(vocab)
text_v1 = """"It's the last he painted, you know,"
       Mrs. Gisburn said with pardonable pride."""
ids_v1 = tokenizer_v1.encode(text_v1)
print(ids_v1)
print(tokenizer_v1.decode(ids_v1))
try:
    tokenizer_v1.encode("Hello, do you like tea?")
except KeyError as e:
    print("V1 cannot encode a word it has never seen:", e)

# %%
print("\n# §2.4 Special context tokens: <|unk|> for unknown words, <|endoftext|> between texts")
vocab_v2 = build_vocab(raw_text, special_tokens=(EOT, UNK))
print("vocabulary size with special tokens:", len(vocab_v2), list(vocab_v2.items())[-5:])
tokenizer_v2 = SimpleTokenizerV2(vocab_v2)
text_v2 = f" {EOT} ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))
ids_v2 = tokenizer_v2.encode(text_v2)
print(text_v2)
print(ids_v2)
print(tokenizer_v2.decode(ids_v2))

# %%
print("\n# §2.5 Byte pair encoding: GPT-2's tokenizer, built from the local ranks file")
tokenizer = gpt2_tokenizer()
bpe_text = f"Hello, do you like tea? {EOT} In the sunlit terraces of someunknownPlace."
bpe_ids = text_to_token_ids(bpe_text, tokenizer)
print(bpe_ids)
print(tokenizer.decode(bpe_ids))
unknown_ids = tokenizer.encode("Akwirw ier")  # BPE splits unknown words into known pieces
print(unknown_ids, [tokenizer.decode([i]) for i in unknown_ids])

# %%
print("\n# §2.6 Data sampling with a sliding window: the target is the input shifted by one")
enc_text = text_to_token_ids(raw_text, tokenizer)
print("BPE tokens in the-verdict:", len(enc_text))
enc_sample = enc_text[50:]
context_size = 4
x, y = enc_sample[:context_size], enc_sample[1 : context_size + 1]
print(f"x: {x}\ny:      {y}")
for i in range(1, context_size + 1):
    print(tokenizer.decode(enc_sample[:i]), "---->", tokenizer.decode([enc_sample[i]]))

inputs, targets = sliding_windows(enc_text, max_length=4, stride=1)
print("windows of 4 with stride 1:", inputs.shape)
loader = create_dataloader_v1(raw_text, batch_size=1, max_length=4, stride=1, shuffle=False)
batches = iter(loader)
first_batch, second_batch = next(batches), next(batches)
print("first batch:", first_batch)
print("second batch:", second_batch)
loader8 = create_dataloader_v1(raw_text, batch_size=8, max_length=4, stride=4, shuffle=False)
batch_inputs, batch_targets = next(iter(loader8))
print("inputs:\n", batch_inputs, "\ntargets:\n", batch_targets)

# %%
print("\n# §2.7 Token embeddings: a lookup table, equal to one-hot vectors times a weight matrix")
small = nn.init_embedding(jax.random.key(123), num=6, dim=3)
input_ids = jnp.array([2, 3, 5, 1])
looked_up = nn.embedding(small, input_ids)  # (4, 3)
via_one_hot = jax.nn.one_hot(input_ids, 6) @ small["embedding"]  # (4, 6) @ (6, 3)
print(looked_up)
print("lookup equals one-hot @ weights:", bool(jnp.allclose(looked_up, via_one_hot)))

# %%
print("\n# §2.8 Encoding word positions: add an absolute positional embedding to each token")
vocab_size, output_dim, max_length = 50257, 256, 4
key_tok, key_pos = jax.random.split(jax.random.key(123))
token_embedding_layer = nn.init_embedding(key_tok, vocab_size, output_dim)
pos_embedding_layer = nn.init_embedding(key_pos, max_length, output_dim)
token_embeddings = nn.embedding(token_embedding_layer, jax.device_put(batch_inputs))  # (8, 4, 256)
pos_embeddings = nn.embedding(pos_embedding_layer, jnp.arange(max_length))  # (4, 256)
input_embeddings = token_embeddings + pos_embeddings  # broadcast over the batch: (8, 4, 256)
print(token_embeddings.shape, pos_embeddings.shape, input_embeddings.shape)

# %%
print("\n# Checks: the book's numbers")
assert len(raw_text) == 20_479
assert len(preprocessed) == 4_690
assert len(vocab) == 1_130 and len(vocab_v2) == 1_132
# fmt: off
assert ids_v1 == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754,
                  793, 7]
# fmt: on
# The book's decoded text: punctuation re-attached, but "It' s" shows the split is not invertible.
assert tokenizer_v1.decode(ids_v1) == (
    '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
)
assert tokenizer_v1.encode(tokenizer_v1.decode(ids_v1)) == ids_v1  # ids round-trip exactly
assert ids_v2 == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
assert tokenizer_v2.decode(ids_v2) == (
    "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
)
# fmt: off
assert bpe_ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812,
                   2114, 286, 617, 34680, 27271, 13]
# fmt: on
assert tokenizer.decode(bpe_ids) == bpe_text
assert unknown_ids == [33901, 86, 343, 86, 220, 959]
assert tokenizer.decode(unknown_ids) == "Akwirw ier"
assert len(enc_text) == 5_145
assert x == [290, 4920, 2241, 287] and y == [4920, 2241, 287, 257]
assert first_batch[0].tolist() == [[40, 367, 2885, 1464]]
assert first_batch[1].tolist() == [[367, 2885, 1464, 1807]]
assert second_batch[0].tolist() == [[367, 2885, 1464, 1807]]
assert second_batch[1].tolist() == [[2885, 1464, 1807, 3619]]
# fmt: off
assert batch_inputs.tolist() == [[40, 367, 2885, 1464], [1807, 3619, 402, 271],
                                 [10899, 2138, 257, 7026], [15632, 438, 2016, 257],
                                 [922, 5891, 1576, 438], [568, 340, 373, 645],
                                 [1049, 5975, 284, 502], [284, 3285, 326, 11]]
# fmt: on
assert np.array_equal(batch_inputs[:, 1:], batch_targets[:, :-1])  # targets = inputs shifted
assert np.array_equal(batch_inputs[1:, 0], batch_targets[:-1, -1])  # stride 4: no overlap, no gap
assert bool(jnp.allclose(looked_up, via_one_hot))
assert token_embeddings.shape == input_embeddings.shape == (8, 4, 256)
assert pos_embeddings.shape == (4, 256)
print("lab 2: all checks passed")
