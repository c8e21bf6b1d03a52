"""engine.data against the bundled README numbers, scikit-learn, and real files written per test."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from engine import data
from engine.data import DataError, available_datasets, load_dataset, mnist_like

# From assets/data/debd/README.md (vars, train, test).
DEBD_SIZES = {
    "nltcs": (16, 16181, 3236),
    "plants": (69, 17412, 3482),
    "baudio": (100, 15000, 3000),
    "jester": (100, 9000, 4116),
    "bnetflix": (100, 15000, 3000),
    "accidents": (111, 12758, 2551),
    "pumsb_star": (163, 12262, 2452),
    "dna": (180, 1600, 1186),
    "bbc": (1058, 1670, 330),
}


def test_available_datasets_lists_debd_and_digits():
    assert available_datasets() == [*DEBD_SIZES, "digits"]


def test_nltcs_matches_readme():
    ds = load_dataset("nltcs")
    assert (ds.name, ds.kind, ds.num_vars, ds.num_cats) == ("nltcs", "binary", 16, 2)
    assert ds.train.shape == (16181, 16) and ds.test.shape == (3236, 16)
    assert ds.train.dtype == torch.int64
    assert set(ds.train.unique().tolist()) == {0, 1}


@pytest.mark.parametrize("name", list(DEBD_SIZES))
def test_debd_sizes_match_readme(name):
    num_vars, num_train, num_test = DEBD_SIZES[name]
    ds = load_dataset(name)
    assert ds.num_vars == num_vars
    assert ds.train.shape == (num_train, num_vars)
    assert ds.test.shape == (num_test, num_vars)
    assert ds.valid.shape[1] == num_vars and ds.valid.shape[0] > 0
    assert int(max(t.max() for t in (ds.train, ds.valid, ds.test))) == 1


def test_debd_unpacking_matches_bitwise_reference():
    """Unpack nltcs by hand, bit by bit, most significant first, and compare."""
    with np.load(data.DEBD_DIR / "nltcs.npz") as z:
        packed = z["train"]
    bits = [(packed[:, j // 8] >> (7 - j % 8)) & 1 for j in range(16)]
    assert torch.equal(load_dataset("nltcs").train, torch.from_numpy(np.stack(bits, 1).astype(np.int64)))


def test_debd_name_is_case_insensitive():
    assert load_dataset("NLTCS").num_vars == 16


def test_digits_split_shapes_and_content():
    ds = load_dataset("digits", valid_fraction=0.1, test_fraction=0.2, seed=3)
    assert (ds.kind, ds.num_vars, ds.num_cats) == ("categorical", 64, 17)
    assert ds.valid.shape == (180, 64) and ds.test.shape == (359, 64) and ds.train.shape == (1258, 64)
    merged = torch.cat([ds.train, ds.valid, ds.test])
    reference = torch.from_numpy(load_digits().data.astype(np.int64))
    assert torch.equal(_sorted_rows(merged), _sorted_rows(reference))


def test_digits_split_is_deterministic_in_seed():
    a, b, c = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order, so two shufflings of one dataset compare equal."""
    keys = np.lexsort(x.numpy().T[::-1])
    return x[torch.from_numpy(keys)]


def test_npy_integral_becomes_categorical_and_splits(tmp_path):
    array = np.random.default_rng(0).integers(0, 5, size=(100, 7))
    path = tmp_path / "counts.npy"
    np.save(path, array)
    ds = load_dataset(path, valid_fraction=0.2, test_fraction=0.1, seed=1)
    assert (ds.name, ds.kind, ds.num_vars, ds.num_cats) == ("counts", "categorical", 7, 5)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (70, 20, 10)
    assert torch.equal(
        _sorted_rows(torch.cat([ds.train, ds.valid, ds.test])), _sorted_rows(torch.tensor(array))
    )


def test_npy_float_with_whole_numbers_is_discrete(tmp_path):
    path = tmp_path / "b.npy"
    np.save(path, np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]] * 5))
    ds = load_dataset(str(path))
    assert (ds.kind, ds.num_cats, ds.train.dtype) == ("binary", 2, torch.int64)


def test_npy_non_integral_is_continuous(tmp_path):
    array = np.random.default_rng(0).normal(size=(50, 3))
    path = tmp_path / "gauss.npy"
    np.save(path, array)
    ds = load_dataset(path, valid_fraction=0.0, test_fraction=0.0)
    assert (ds.kind, ds.num_cats, ds.train.dtype) == ("continuous", None, torch.float32)
    assert ds.valid.shape == (0, 3) and ds.train.shape == (50, 3)


def test_npz_with_splits_keeps_them(tmp_path):
    rng = np.random.default_rng(0)
    splits = {
        k: rng.integers(0, 2, size=(n, 11)).astype(np.uint8)
        for k, n in [("train", 9), ("valid", 4), ("test", 5)]
    }
    path = tmp_path / "mine.npz"
    np.savez(path, num_vars=np.int64(11), **{k: np.packbits(v, axis=1) for k, v in splits.items()})
    ds = load_dataset(path)
    assert (ds.kind, ds.num_vars) == ("binary", 11)
    for key, expected in splits.items():
        assert torch.equal(getattr(ds, key), torch.from_numpy(expected.astype(np.int64)))


def test_npz_unpacked_splits_and_single_array(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "plain.npz"
    np.savez(
        path,
        train=rng.integers(0, 3, (8, 4)),
        valid=rng.integers(0, 3, (2, 4)),
        test=rng.integers(0, 3, (2, 4)),
    )
    assert load_dataset(path).num_cats == 3
    single = tmp_path / "one.npz"
    np.savez(single, x=rng.normal(size=(20, 2)))
    assert load_dataset(single).train.shape == (16, 2)


def test_csv_with_and_without_header(tmp_path):
    rows = "1,2,3\n0,4,1\n2,2,2\n3,0,0\n"
    plain, headed = tmp_path / "plain.csv", tmp_path / "headed.csv"
    plain.write_text(rows)
    headed.write_text("a,b,c\n" + rows)
    a = load_dataset(plain, valid_fraction=0.0, test_fraction=0.0)
    b = load_dataset(headed, valid_fraction=0.0, test_fraction=0.0)
    assert (a.kind, a.num_vars, a.num_cats) == ("categorical", 3, 5)
    assert torch.equal(a.train, b.train) and a.train.shape == (4, 3)
    real = tmp_path / "real.csv"
    real.write_text("x,y\n0.5,1\n1.5,2\n")
    assert load_dataset(real, valid_fraction=0.0, test_fraction=0.0).kind == "continuous"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nan.csv", "1,2\nnan,3\n", "NaN or infinite"),
        ("inf.csv", "1,2\ninf,3\n", "NaN or infinite"),
        ("missing.csv", "1,2\n,3\n", "every cell must be a number"),
        ("words.csv", "a,b\nx,y\n", "every cell must be a number"),
        ("empty.csv", "", "empty"),
        ("header_only.csv", "a,b\n", "empty data"),
        ("neg.csv", "1,2\n-1,3\n", "non-negative"),
    ],
)
def test_csv_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(path, valid_fraction=0.0, test_fraction=0.0)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([[1.0, np.inf]] * 4), "NaN or infinite"),
        (np.array([[1, -2]] * 4), "non-negative"),
        (np.arange(10), "2-D"),
        (np.zeros((2, 3, 4)), "2-D"),
        (np.zeros((0, 3)), "empty data"),
        (np.zeros((4, 0)), "empty data"),
        (np.array([["a", "b"]] * 4), "must be numbers"),
        (np.array([[0, 1 << 20]] * 4), "categories; the limit"),
    ],
)
def test_npy_errors(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=message):
        load_dataset(path, valid_fraction=0.0, test_fraction=0.0)


def test_pickled_object_array_is_rejected_without_unpickling(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([[_Tripwire()]], dtype=object), allow_pickle=True)
    np.load(path, allow_pickle=True)  # the tripwire works: unpickling fires it
    assert _UNPICKLED.pop()
    with pytest.raises(DataError, match="pickle"):
        load_dataset(path)
    npz = tmp_path / "objects.npz"
    np.savez(
        npz, train=np.array([[_Tripwire()]], dtype=object), valid=np.zeros((1, 1)), test=np.zeros((1, 1))
    )
    with pytest.raises(DataError, match="pickle"):
        load_dataset(npz)
    assert not _UNPICKLED


_UNPICKLED: list[bool] = []


def _fire() -> None:
    _UNPICKLED.append(True)


class _Tripwire:
    """Records, in _UNPICKLED, every time a pickled instance is loaded."""

    def __reduce__(self):
        return (_fire, ())


def test_unknown_name_lists_known_datasets():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist'.*nltcs.*digits"):
        load_dataset("mnist")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nope.npy")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2\n")
    with pytest.raises(DataError, match=r"unknown file extension '\.txt'"):
        load_dataset(path)


def test_too_large_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.npy"
    with open(path, "wb") as f:
        f.truncate(data.MAX_FILE_BYTES + 1)  # sparse: no disk is used
    with pytest.raises(DataError, match="GiB; the limit is 1.00 GiB"):
        load_dataset(path)


def test_corrupt_npy_and_npz(tmp_path):
    for name in ("junk.npy", "junk.npz"):
        path = tmp_path / name
        path.write_bytes(b"not numpy at all")
        with pytest.raises(DataError, match="not a valid"):
            load_dataset(path)


def test_npz_with_wrong_keys_or_widths(tmp_path):
    path = tmp_path / "keys.npz"
    np.savez(path, a=np.zeros((3, 2)), b=np.zeros((3, 2)))
    with pytest.raises(DataError, match="expected 'train', 'valid' and 'test'"):
        load_dataset(path)
    np.savez(path, train=np.zeros((3, 2)), valid=np.zeros((3, 3)), test=np.zeros((3, 2)))
    with pytest.raises(DataError, match="disagree on the number of variables"):
        load_dataset(path)
    np.savez(
        path,
        num_vars=np.int64(20),
        train=np.zeros((3, 3), np.uint8),
        valid=np.zeros((1, 3), np.uint8),
        test=np.zeros((1, 5), np.uint8),
    )
    with pytest.raises(DataError, match=r"'test' has shape \(1, 5\)"):
        load_dataset(path)


@pytest.mark.parametrize(("valid", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0)])
def test_bad_fractions(valid, test):
    with pytest.raises(DataError, match="valid_fraction and test_fraction"):
        load_dataset("digits", valid_fraction=valid, test_fraction=test)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_mnist_like_is_deterministic_and_structured():
    x = mnist_like(2000, seed=5)
    assert x.shape == (2000, 784) and x.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) == 255
    assert torch.equal(x, mnist_like(2000, seed=5)) and not torch.equal(x, mnist_like(2000, seed=6))
    assert 0.5 < float((x == 0).float().mean()) < 0.95  # mostly background, like MNIST
    image = x.float().reshape(-1, 28, 28)
    neighbours = torch.corrcoef(torch.stack([image[:, 14, 10:18].flatten(), image[:, 14, 11:19].flatten()]))
    assert float(neighbours[0, 1]) > 0.5  # adjacent pixels correlate; uniform noise would give ~0


def test_mnist_like_other_shapes():
    x = mnist_like(10, num_vars=13, num_cats=4)
    assert x.shape == (10, 13) and int(x.max()) <= 3
    assert mnist_like(0).shape == (0, 784)
    with pytest.raises(DataError):
        mnist_like(5, num_cats=1)


def test_assets_are_bundled():
    for name in DEBD_SIZES:
        assert (data.DEBD_DIR / f"{name}.npz").is_file()
    assert (data.DEBD_DIR / "README.md").is_file()
    circuits = Path(data.ASSETS_DIR) / "circuits"
    assert (circuits / "nltcs.clt.psdd").is_file() and (circuits / "README.md").is_file()
    assert zipfile.is_zipfile(data.DEBD_DIR / "nltcs.npz")


def test_npz_that_decompresses_past_the_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros((1000, 100), np.uint8))  # ~100 kB unpacked, ~1 kB on disk
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 50_000)
    assert path.stat().st_size < data.MAX_FILE_BYTES
    with pytest.raises(DataError, match="decompresses to"):
        load_dataset(path)
