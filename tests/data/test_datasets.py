import json

import numpy as np
import pytest
import torch

from mtnlg.config import Config
from mtnlg.data.datasets import (BatchSampler, BlendedDataset, GPTDataset, build_datasets, prepare_tokenizer,
                                 split_documents)
from mtnlg.data.indexed import IndexedDataset, IndexedWriter, tokenizer_path
from mtnlg.errors import ConfigError, DataError


def _prefix(path, docs, vocab=1000, eod=0):
    with IndexedWriter(path, vocab, eod) as w:
        for d in docs:
            w.add_document(list(d) + [eod])
    return path


def _cfg(**data):
    cfg = Config()
    cfg.model.vocab_size = 1000
    cfg.train.seq_len = 16
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg.validate()


def test_samples_are_packed_across_document_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=n) for n in rng.integers(1, 30, size=20)]
    ds = IndexedDataset(_prefix(tmp_path / "p", docs))
    order = np.array([3, 0, 7, 1, 2, 4, 5, 6, *range(8, 20)])
    gpt = GPTDataset(ds, order, seq_len=8)
    stream = np.concatenate([np.append(docs[k], 0) for k in order])
    assert len(gpt) == (stream.size - 1) // 8
    for i in range(len(gpt)):
        item = gpt[i]
        assert item.dtype == torch.long and item.shape == (9,)
        np.testing.assert_array_equal(item.numpy(), stream[i * 8:i * 8 + 9])  # EOD between documents


def test_a_window_is_consecutive_samples_read_as_one_sequence(tmp_path):
    """window(i, span): the span * seq_len + 1 tokens from sample i's start (wrapping round the stream),
    so its inputs and targets are exactly those of samples i .. i + span - 1; a blend reads within the part."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 1000, size=n) for n in rng.integers(1, 30, size=20)]
    ds = IndexedDataset(_prefix(tmp_path / "p", docs))
    gpt = GPTDataset(ds, np.arange(20), seq_len=8)
    stream = np.concatenate([np.append(d, 0) for d in docs])
    n = len(gpt)
    for i in range(n):
        w = gpt.window(i, 3)
        assert w.shape == (25,) and torch.equal(gpt.window(i, 1), gpt[i])
        np.testing.assert_array_equal(w.numpy(), np.resize(np.roll(stream, -i * 8), 25))  # cyclic
        if i + 3 <= n:
            assert torch.equal(w[:-1], torch.cat([gpt[j][:-1] for j in range(i, i + 3)]))
            assert torch.equal(w[1:], torch.cat([gpt[j][1:] for j in range(i, i + 3)]))
    other = GPTDataset(IndexedDataset(_prefix(tmp_path / "q", [[7] * 40])), np.arange(1), seq_len=8)
    blend = BlendedDataset([gpt, other], [0.5, 0.5])
    for i in range(10):
        part = blend.datasets[int(blend.dataset_index[i])]
        assert torch.equal(blend.window(i, 2), part.window(int(blend.sample_index[i]), 2))


def test_split_shorter_than_a_sequence_wraps(tmp_path):
    ds = IndexedDataset(_prefix(tmp_path / "s", [[5, 6], [7]]))
    gpt = GPTDataset(ds, np.array([1, 0]), seq_len=8)
    assert len(gpt) == 1 and gpt[0].tolist() == [7, 0, 5, 6, 0, 7, 0, 5, 6]


def test_splits_are_disjoint_and_cover_everything():
    for n, split in [(1000, "98,1,1"), (409, "90,5,5"), (7, "1,1,1"), (3, "90,5,5"), (50, "100,0,0")]:
        parts = split_documents(n, split, seed=1)
        all_ids = np.concatenate(list(parts.values()))
        assert sorted(all_ids.tolist()) == list(range(n))  # disjoint and covering
        weights = [float(w) for w in split.split(",")]
        for (name, ids), w in zip(parts.items(), weights):
            assert (len(ids) > 0) == (w > 0), (n, split, name)
    assert [len(v) for v in split_documents(1000, "98,1,1", seed=1).values()] == [980, 10, 10]
    assert not np.array_equal(split_documents(100, "90,5,5", 1)["valid"], split_documents(100, "90,5,5", 2)["valid"])
    with pytest.raises(DataError, match="needs at least 3"):
        split_documents(2, "90,5,5", seed=1)
    with pytest.raises(ConfigError):
        split_documents(10, "90,5", seed=1)


def test_blend_proportions_within_two_percent(tmp_path, poem_tok):
    rng = np.random.default_rng(1)
    a = _prefix(tmp_path / "a", [rng.integers(10, 500, size=100) for _ in range(200)])
    b = _prefix(tmp_path / "b", [rng.integers(500, 1000, size=100) for _ in range(200)])
    for p in (a, b):
        poem_tok.hf.save(str(tokenizer_path(p)))
    cfg = _cfg(paths=[0.7, str(a), 0.3, str(b)])
    tok = prepare_tokenizer(cfg, None)  # found next to the first prefix
    sets = build_datasets(cfg, tok)
    train = sets["train"]
    assert isinstance(train, BlendedDataset) and len(sets["valid"]) > 0 and len(sets["test"]) > 0
    sampler = BatchSampler(len(train), seed=3)
    from_b = 0
    for _ in range(10_000 // 100):
        for i in sampler.next_batch(100):
            from_b += int(train[i].max() >= 500)  # prefix a holds ids < 500 (and EOD 0), b ids >= 500
    assert abs(from_b / 10_000 - 0.3) < 0.02
    # The interleave itself is exact to about one sample at every prefix length.
    blend = BlendedDataset([sets["valid"], sets["test"]], [0.25, 0.75], size=4000)
    counts = np.cumsum(blend.dataset_index == 1)
    n = np.arange(1, 4001)
    assert np.abs(counts - 0.75 * n).max() <= 1.0


def test_sampler_restored_continues_with_identical_samples():
    ref = BatchSampler(50, seed=11)
    sizes = [8, 8, 12, 16, 16, 16, 24, 24]  # a batch-size ramp, crossing epoch boundaries
    batches = [ref.next_batch(g) for g in sizes]
    for cut in (1, 3, 5):
        s = BatchSampler(50, seed=11)
        for g in sizes[:cut]:
            s.next_batch(g)
        state = json.loads(json.dumps(s.state_dict()))  # a checkpoint round trip
        restored = BatchSampler(50, seed=11)
        restored.load_state_dict(state)
        assert [restored.next_batch(g) for g in sizes[cut:]] == batches[cut:]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:50]) == list(range(50))  # an epoch visits every sample once
    assert flat[:50] != list(range(50)) and flat[50:100] != flat[:50]  # shuffled, differently per epoch
    with pytest.raises(DataError, match="num_samples"):
        BatchSampler(51, seed=11).load_state_dict(state)


def test_a_packed_batch_draws_one_index_per_long_sequence_and_counts_its_tokens():
    """next_batch(8, span=4): 2 indices (each the first of 4 samples read as one), the next 2 of the
    permutation; ``consumed`` grows by 8 samples' worth of tokens; ranks split the 2 long sequences."""
    ref, packed = BatchSampler(50, seed=3), BatchSampler(50, seed=3)
    for g, span in [(8, 1), (8, 4), (8, 1), (12, 4), (16, 2)]:
        before = packed.consumed
        got = packed.next_batch(g, span)
        assert got == ref.next_batch(g // span) and packed.consumed == before + g
    ranks = [BatchSampler(50, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    assert [i for r in ranks for i in r.next_batch(8, span=4)] == BatchSampler(50, seed=3).next_batch(8, 4)
    with pytest.raises(ConfigError, match="multiple of 4"):
        BatchSampler(50, seed=3).next_batch(6, span=4)
    with pytest.raises(ConfigError, match="data-parallel size 2"):
        ranks[0].next_batch(4, span=4)  # one long sequence for two ranks


def test_data_parallel_ranks_are_disjoint_and_union_is_the_single_process_batch():
    single = BatchSampler(37, seed=5)
    ranks = [BatchSampler(37, seed=5, dp_rank=r, dp_size=4) for r in range(4)]
    seen = set()
    for step, g in enumerate((8, 8, 16, 20, 12)):
        full = single.next_batch(g)
        parts = [r.next_batch(g) for r in ranks]
        assert all(len(p) == g // 4 for p in parts)
        assert sum(parts, []) == full
        if step < 3:  # within the first epoch (32 of 37 samples): no sample is given twice, to any rank
            assert not seen & set(full) and len(set(full)) == g
            seen |= set(full)
    with pytest.raises(ConfigError, match="multiple"):
        ranks[0].next_batch(6)


def test_build_datasets_on_the_builtin_corpus(tmp_path, private_cache):
    cfg = _cfg()
    cfg.data.corpus = "poems"
    cfg.model.vocab_size = 600
    tok = prepare_tokenizer(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    assert 300 < tok.vocab_size <= 600
    again = prepare_tokenizer(cfg, None)  # cached: same file, no retraining
    assert again.hf.to_str() == tok.hf.to_str()
    assert len(list((private_cache / "tokenizers").iterdir())) == 1
    sets = build_datasets(cfg, tok)
    assert set(sets) == {"train", "valid", "test"}
    assert all(len(d) >= 1 for d in sets.values()) and len(sets["train"]) > 10 * len(sets["valid"])
    docs = [set(d.documents.tolist()) for d in sets.values()]
    assert not (docs[0] & docs[1] or docs[0] & docs[2] or docs[1] & docs[2])
    text = tok.decode(sets["valid"][0].tolist())
    from mtnlg.data.corpora import load_corpus

    assert any(text.split("<|endoftext|>")[0] in d for d in load_corpus("poems"))
    assert len(list((private_cache / "data").glob("poems-*.bin"))) == 1
    build_datasets(cfg, tok)  # reuses the cached prefix
    assert len(list((private_cache / "data").glob("poems-*.bin"))) == 1


def test_mismatched_tokenizer_is_rejected(tmp_path, poem_tok):
    p = _prefix(tmp_path / "m", [[1, 2, 3]] * 5, vocab=2000)
    cfg = _cfg(paths=[str(p)])
    with pytest.raises(DataError, match="data.tokenizer"):
        prepare_tokenizer(cfg, None)
    with pytest.raises(DataError, match="2000-token"):
        build_datasets(cfg, poem_tok)
    cfg.model.vocab_size = 500
    poem_tok.save(tmp_path / "tok")
    cfg.data.tokenizer = str(tmp_path / "tok")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        prepare_tokenizer(cfg, None)


def test_blended_builtin_corpora_split_each_part_and_evaluate_every_token_once(tmp_path, private_cache):
    from mtnlg.data.datasets import BlendedDataset, GPTDataset, eval_sequences, pad_sequences

    cfg = _cfg()
    cfg.data.corpus = "poems:0.5,zh:0.5"
    cfg.model.vocab_size = 400
    cfg.train.seq_len = 64
    tok = prepare_tokenizer(cfg, None)
    sets = build_datasets(cfg, tok)
    assert isinstance(sets["train"], BlendedDataset)
    picks = sets["train"].dataset_index[:1000]
    assert abs((picks == 0).mean() - 0.5) < 0.01  # the weights, not the sizes (zh is 20 times larger)
    for name in ("valid", "test"):
        parts = sets[name].datasets
        pieces = eval_sequences(sets[name])
        # every target token of every part exactly once: the pieces overlap by one token per cut
        assert sum(p.numel() - 1 for p in pieces) == sum(d.num_tokens - 1 for d in parts)
        assert all(p.numel() <= 65 for p in pieces)
        stream = torch.from_numpy(parts[0].stream())
        first = [p for p in pieces[:len(parts[0].whole())]]
        assert torch.equal(torch.cat([first[0]] + [p[1:] for p in first[1:]]), stream)
    x, y = pad_sequences([torch.tensor([5, 6, 7]), torch.tensor([8, 9])], 4)
    assert x.tolist() == [[5, 6, 7], [8, 9, 0]] and y.tolist() == [[6, 7, -100], [9, -100, -100]]
    assert isinstance(sets["valid"].datasets[0], GPTDataset)


def test_training_verifies_token_files_when_it_starts(tmp_path, poem_tok):
    prefix = tmp_path / "d"
    with IndexedWriter(prefix, poem_tok.vocab_size, poem_tok.eod_id) as w:
        for _ in range(20):
            w.add_document(np.array(poem_tok.encode("床前明月光，疑是地上霜。") + [poem_tok.eod_id]))
    poem_tok.hf.save(str(tokenizer_path(prefix)))
    cfg = _cfg(paths=[str(prefix)])
    build_datasets(cfg, poem_tok)  # intact: fine
    data = bytearray((tmp_path / "d.bin").read_bytes())
    data[7] ^= 0x10  # one flipped bit
    (tmp_path / "d.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"d\.bin is corrupt \(checksum"):
        build_datasets(cfg, poem_tok)
    # an id outside the vocabulary (with a matching checksum) is named too, not an IndexError later
    with IndexedWriter(tmp_path / "big", 70000, 0) as w:
        w.add_document(np.array([1, 69999, 2]))
    ds = IndexedDataset(tmp_path / "big")
    ds.vocab_size = 1000  # as a file whose header and tokens disagree
    with pytest.raises(DataError, match="token id 69999, outside its 1000-token vocabulary"):
        ds.verify()
