import numpy as np
import pytest

from mtnlg.data.indexed import HEADER_SIZE, IndexedDataset, IndexedWriter
from mtnlg.errors import DataError


def _write(prefix, docs, vocab=1000, eod=0):
    with IndexedWriter(prefix, vocab, eod) as w:
        for d in docs:
            w.add_document(d)
    return IndexedDataset(prefix)


def test_round_trip_and_zero_copy(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1000, size=n) for n in (5, 1, 300, 17)]
    ds = _write(tmp_path / "d", docs)
    assert len(ds) == 4 and ds.num_tokens == 323 and ds.dtype == np.uint16 and ds.vocab_size == 1000
    for a, b in zip(docs, (ds[i] for i in range(4))):
        np.testing.assert_array_equal(a, b)
    view = ds[2]
    assert not view.flags.owndata and np.shares_memory(view, ds.tokens)  # a view of the memory map
    np.testing.assert_array_equal(ds.get(2, 10, 5), docs[2][10:15])
    ds.verify()
    assert ds.summary()["documents"] == 4


def test_large_vocab_uses_uint32(tmp_path):
    ds = _write(tmp_path / "big", [np.array([70000, 3, 65536])], vocab=70001)
    assert ds.dtype == np.uint32 and ds[0].tolist() == [70000, 3, 65536]
    ds.verify()


@pytest.mark.parametrize("damage", ["idx_truncated", "idx_magic", "idx_body", "idx_empty", "bin_truncated",
                                    "bin_extra", "bin_missing"])
def test_corrupt_files_raise_data_error_naming_the_file(tmp_path, damage):
    prefix = tmp_path / "c"
    _write(prefix, [np.arange(1, 50), np.arange(3, 9)])
    idx, bin_ = tmp_path / "c.idx", tmp_path / "c.bin"
    raw_idx, raw_bin = idx.read_bytes(), bin_.read_bytes()
    target = idx if damage.startswith("idx") else bin_
    if damage == "idx_truncated":
        idx.write_bytes(raw_idx[:-5])
    elif damage == "idx_magic":
        idx.write_bytes(b"X" + raw_idx[1:])
    elif damage == "idx_body":
        idx.write_bytes(raw_idx[:HEADER_SIZE] + bytes([raw_idx[HEADER_SIZE] ^ 1]) + raw_idx[HEADER_SIZE + 1:])
    elif damage == "idx_empty":
        idx.write_bytes(b"")
    elif damage == "bin_truncated":
        bin_.write_bytes(raw_bin[:-2])
    elif damage == "bin_extra":
        bin_.write_bytes(raw_bin + b"\0\0")
    elif damage == "bin_missing":
        bin_.unlink()
    with pytest.raises(DataError) as e:
        IndexedDataset(prefix)
    assert str(target) in str(e.value)


def test_flipped_token_is_caught_by_verify(tmp_path):
    prefix = tmp_path / "v"
    _write(prefix, [np.arange(1, 50)])
    raw = bytearray((tmp_path / "v.bin").read_bytes())
    raw[10] ^= 0x40
    (tmp_path / "v.bin").write_bytes(bytes(raw))
    ds = IndexedDataset(prefix)  # sizes still agree: opening is cheap and succeeds
    with pytest.raises(DataError, match=str(tmp_path / "v.bin")):
        ds.verify()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedWriter(tmp_path / "f", 100) as w:
            w.add_document([1, 2])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
