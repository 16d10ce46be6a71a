# %% [markdown]
# # Lab bpe: byte pair encoding from scratch (the book's bonus to chapter 2)
#
# Chapter 2 uses tiktoken as a black box. Here we open it: text becomes bytes, the most frequent
# adjacent pair is merged into a new token again and again, and the merges learned on
# the-verdict.txt give the book's 742 merges and ids. Then OpenAI's own GPT-2 files load into the
# same code and give tiktoken's ids. Each step is derived inline, then checked against
# `gptflax.bpe`. GPTFLAX_QUICK=1 skips the timing of the slow, book-style training loop.

# %%
print("\n# Bonus §1.1 Bits and bytes: any text is a sequence of bytes, so 256 base tokens cover it")
import time
from collections import Counter
from itertools import pairwise

from labkit import QUICK, run_dir

from gptflax import bpe, files
from gptflax.tokenizer import gpt2_tokenizer

RUNS = run_dir("labbpe")  # runs/labbpe, or runs/quick/labbpe in quick mode

sample = "This is some text"
print("bytes of", repr(sample), "->", list(sample.encode("utf-8")))
print("an emoji needs several:", list("🙂".encode())[:4], "- still ids 0-255")
raw_text = files.resolve("the-verdict.txt").read_text(encoding="utf-8")
spam_text = files.resolve("sms_spam_collection/SMSSpamCollection.tsv").read_text("utf-8")
print(f"the-verdict: {len(raw_text):,} characters, all ASCII: {raw_text.isascii()}")

# %%
print("\n# Bonus §1.2-1.3 Pieces and pairs: count adjacent pairs inside words, never across them")
# The book's pre-tokenizer: a word keeps one leading space, written "Ġ" (GPT-2's symbol for it).
pieces = Counter(bpe.BPETokenizerSimple().pretokenize(raw_text))
print(f"{sum(pieces.values()):,} pieces, {len(pieces):,} distinct; first:", list(pieces)[:8])
pair_counts = Counter()
for piece, n in pieces.items():
    for pair in pairwise(piece.replace(" ", bpe.SPACE_MARK)):
        pair_counts[pair] += n
print("most frequent pairs:", pair_counts.most_common(4))

# %%
print('\n# Bonus §1.4 One merge: replace every ("Ġ", "t") by a new token "Ġt", left to right')
first_pair = max(pair_counts.items(), key=lambda kv: kv[1])[0]  # ties: first seen, as the book
word = list(" that".replace(" ", bpe.SPACE_MARK))
merged = bpe.merge_pair(word, first_pair, "".join(first_pair))
print(f"merge {first_pair}: {word} -> {merged}")

# %%
print("\n# Bonus §2 Training the book's way: recount every pair after every merge")
# Ids: 0-255 the bytes, 256 "Ġ", 257 <|endoftext|>, then one new id per merge up to vocab_size.
base = {b: chr(b) for b in range(256)} | {256: bpe.SPACE_MARK, 257: bpe.EOT}
symbol_of = bpe.STYLES["book"][1]  # byte -> symbol: chr(b), and "Ġ" for the space
inverse = {s: i for i, s in base.items()}
words = [[inverse[symbol_of[b]] for b in p.encode()] for p in pieces]


def train_by_recounting(words, freqs, first_id, vocab_size, max_merges=None):
    """The bonus chapter's loop: a full Counter of all pairs before each merge."""
    words, merges = [list(w) for w in words], {}
    for new_id in range(first_id, vocab_size)[:max_merges]:
        counts = Counter()
        for word, n in zip(words, freqs, strict=True):
            for pair in pairwise(word):
                counts[pair] += n
        if not counts:
            break
        pair = max(counts.items(), key=lambda kv: kv[1])[0]
        merges[pair] = new_id
        words = [bpe.merge_pair(w, pair, new_id) for w in words]
    return merges


t0 = time.perf_counter()
book_merges = train_by_recounting(words, list(pieces.values()), 258, 1000)
t_recount = time.perf_counter() - t0
tokenizer = bpe.BPETokenizerSimple()
t0 = time.perf_counter()
tokenizer.train(raw_text, vocab_size=1000, allowed_special={bpe.EOT})
t_library = time.perf_counter() - t0
print(f"recounting: {len(book_merges)} merges in {t_recount:.2f} s")
print(
    f"gptflax.bpe (pair counts updated locally): {len(tokenizer.bpe_merges)} merges in "
    f"{t_library:.2f} s, {t_recount / t_library:.0f}x faster, same merges: "
    f"{book_merges == tokenizer.bpe_merges}"
)
print("last merges:", [tokenizer.vocab[i] for i in range(995, 1000)])

# %%
print("\n# Training on half a megabyte: the SMS Spam Collection, 1,000 merges")
spam_tok = bpe.BPETokenizerSimple()
t0 = time.perf_counter()
spam_tok.train(spam_text, vocab_size=258 + 1000)
t_spam = time.perf_counter() - t0
print(f"{len(spam_text.encode()):,} bytes, {len(spam_tok.bpe_merges)} merges in {t_spam:.1f} s")
if not QUICK:  # the book's loop on the same text, 10 merges timed and extrapolated
    spam_pieces = Counter(spam_tok.pretokenize(spam_text))
    spam_words = [spam_tok.symbol_ids(p) for p in spam_pieces]
    t0 = time.perf_counter()
    train_by_recounting(spam_words, list(spam_pieces.values()), 258, 1258, max_merges=10)
    t_ten = time.perf_counter() - t0
    print(
        f"recounting would take about {t_ten * 100:.0f} s for 1,000 merges "
        f"({t_ten * 100 / t_spam:.0f}x)"
    )

# %%
print("\n# Bonus §3.1 Encoding: the book's left-to-right sweep, and merges in the order learned")
jack = "Jack embraced beauty through art and life."


def encode_by_sweeping(tok, piece):
    """The book's encode: a piece in the vocabulary as a whole is one token; else sweep left to
    right, merging any learned pair, until a sweep changes nothing (its tokenize_with_bpe)."""
    if (whole := piece.replace(" ", bpe.SPACE_MARK)) in tok.inverse_vocab:
        return [tok.inverse_vocab[whole]]
    ids = tok.symbol_ids(piece)
    while True:
        out, i = [], 0
        while i < len(ids):
            if i + 1 < len(ids) and (ids[i], ids[i + 1]) in tok.bpe_merges:
                out.append(tok.bpe_merges[ids[i], ids[i + 1]])
                i += 2
            else:
                out.append(ids[i])
                i += 1
        if out == ids:
            return ids
        ids = out


swept = [i for p in tokenizer.pretokenize(jack) for i in encode_by_sweeping(tokenizer, p)]
ranked = tokenizer.encode(jack)
print("the book's sweep:   ", swept, [tokenizer.vocab[i] for i in swept[4:8]])
print("in learned order:   ", ranked, [tokenizer.vocab[i] for i in ranked[4:8]])
# Which one is BPE? Training left each piece of the-verdict in some final segmentation:
# learn_merges merges `words` in place, so they hold it now.
segmented = [list(w) for w in words]
bpe.learn_merges(segmented, list(pieces.values()), 258, 1000)
pairs = list(zip(pieces, segmented, strict=True))
by_rank = sum(tokenizer.tokenize_with_bpe(p) == s for p, s in pairs)
by_sweep = sum(encode_by_sweeping(tokenizer, p) == s for p, s in pairs)
print(
    f"training's own segmentation of the {len(pieces):,} pieces: learned order reproduces "
    f"{by_rank:,}, the sweep {by_sweep:,}"
)

# %%
print("\n# Bonus §3.1-3.2 Decoding, saving and loading")
print(repr(tokenizer.decode(ranked)), repr(tokenizer.decode(swept)))
tokenizer.save_vocab_and_merges(f"{RUNS}/vocab.json", f"{RUNS}/bpe_merges.json")
reloaded = bpe.BPETokenizerSimple()
reloaded.load_vocab_and_merges(f"{RUNS}/vocab.json", f"{RUNS}/bpe_merges.json")
print("after saving and loading:", reloaded.encode(jack) == ranked, repr(reloaded.decode(ranked)))

# %%
print("\n# Bonus §3.3 GPT-2's own files")
# encoder.json (50,257 tokens) and vocab.bpe (50,000 merges).
gpt2 = bpe.gpt2_bpe()
tiktoken_gpt2 = gpt2_tokenizer()
edge_cases = {
    "This is some text": [1212, 318, 617, 2420],
    "Hello,": [15496, 11],
    "Implementations": [3546, 26908, 602],
    "Hello, world. Is this-- a test?": [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30],
    # fmt: off
    "asdf asdfasdf a!!, @aba 9asdf90asdfk": [
        292,
        7568,
        355,
        7568,
        292,
        7568,
        257,
        3228,
        11,
        2488,
        15498,
        860,
        292,
        7568,
        3829,
        292,
        7568,
        74,
    ],
    # fmt: on
}
for text, ids in edge_cases.items():
    same = (gpt2.encode(text) == ids, tiktoken_gpt2.encode(text) == ids)
    print(f"{text!r:40} the book's ids: ours {same[0]}, tiktoken {same[1]}")
for text in ["don't  stop\n\n  me 🙂 x=1234567;", "naïve café\tΩ≈ç"]:
    print(repr(text), gpt2.encode(text), gpt2.encode(text) == tiktoken_gpt2.encode(text))
try:
    gpt2.encode(f"a {bpe.EOT} b")
except ValueError as e:
    print("special tokens must be allowed:", e)
print("allowed:", gpt2.encode(f"a {bpe.EOT} b", allowed_special={bpe.EOT}))
verdict_ids = gpt2.encode(raw_text)
print(f"the-verdict: {len(verdict_ids):,} tokens")

# %%
print("\n# Speed: encoding the spam collection, side by side with tiktoken (Rust)")
gpt2_fresh = bpe.gpt2_bpe()  # an empty piece cache, so nothing is remembered from above
t0 = time.perf_counter()
ours = gpt2_fresh.encode(spam_text)
t_ours = time.perf_counter() - t0
t0 = time.perf_counter()
theirs = tiktoken_gpt2.encode(spam_text)
t_tiktoken = time.perf_counter() - t0
mb = len(spam_text.encode()) / 1e6
print(
    f"{len(ours):,} tokens: gptflax.bpe {mb / t_ours:.2f} MB/s, tiktoken "
    f"{mb / t_tiktoken:.2f} MB/s; tiktoken is {t_ours / t_tiktoken:.0f}x faster"
)

# %%
print("\n# Checks")
assert len(tokenizer.vocab) == 1000 and len(tokenizer.bpe_merges) == 742
assert book_merges == tokenizer.bpe_merges  # the recounting loop and local updates agree
assert not [t for t in tokenizer.vocab.values() if bpe.SPACE_MARK in t[1:]]  # marker leads only
assert swept == [74, 361, 310, 109, 98, 420, 397, 100, 300, 428, 116, 121, 519, 699, 299, 808, 534]
assert by_rank == len(pieces) and by_sweep < by_rank
assert tokenizer.decode(ranked) == tokenizer.decode(swept) == reloaded.decode(ranked) == jack
assert reloaded.encode(jack) == ranked
assert all(gpt2.encode(text) == ids for text, ids in edge_cases.items())
assert gpt2.encode("\n") == [198] and gpt2.encode(bpe.EOT, allowed_special={bpe.EOT}) == [50256]
assert len(verdict_ids) == 5_145 and verdict_ids == tiktoken_gpt2.encode(raw_text)
assert gpt2.decode(verdict_ids) == raw_text
assert ours == theirs
assert len(spam_tok.bpe_merges) == 1000 and t_spam < 30, t_spam
print("lab bpe: all checks passed")
