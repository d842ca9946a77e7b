"""A user's own data: folder:PATH image trees, npz:FILE arrays, register_dataset from Python and
torchvision:NAME, trained through the CLI and the API; the folder cache; every bad input is one
line ``error: ...``, exit status 2, and nothing written.

Nothing touches the network: torchvision's files (USPS, EMNIST) are written in their real
formats by cifarlab.data.fixtures, and downloads run with sockets that refuse to connect.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cifarlab.data.custom as custom
import cifarlab.data.folder as folder
import cifarlab.data.torchvision_sets as tvsets
from cifarlab.cli import main
from cifarlab.config import make_config
from cifarlab.data import (available_datasets, build_loaders, dataset_info, fixtures, load_arrays, load_custom,
                           register_dataset, unregister_dataset)
from cifarlab.data.custom import as_images, as_labels, fit_size, pixel_stats
from cifarlab.errors import ConfigError, DatasetError

MODEL = ["--model", "resnet20"]  # global average pooling: trains on 8 x 8 images
QUICK = ["--epochs", "1", "--batch-size", "16", "--device", "cpu", "--progress", "off"]


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch, tmp_path):
    """No registered names or memoised data leak between tests; the user cache is in tmp."""
    monkeypatch.setattr(custom, "_REGISTERED", {})
    monkeypatch.setattr(custom, "_MEMO", custom.OrderedDict())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def save(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt)


def make_tree(root: Path, classes=("cat", "dog", "emu"), n_train=12, n_test=4, n_val=0, size=(8, 8), seed=0,
              colour=False) -> Path:
    """root/{train,test[,val]}/<class>/<i>.png: random pixels with a class-dependent brightness."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test), ("val", n_val)):
        for k, c in enumerate(classes):
            for i in range(n):
                shape = (*size, 3) if colour else size
                a = np.clip(rng.integers(0, 120, shape) + 60 * k, 0, 255).astype(np.uint8)
                save(root / split / c / f"{i:03d}.png", a)
    return root


def read_back(root: Path, split: str) -> np.ndarray:
    """The split's pixels as the test reads them itself (PIL, sorted class folders and files)."""
    files = sorted(p for c in sorted((root / split).iterdir()) for p in sorted(c.iterdir()))
    return np.stack([np.asarray(Image.open(p)) for p in files])


def cache_files(data_root: Path) -> list[Path]:
    return sorted((data_root / ".cifarlab_cache").glob("*.pt")) if (data_root / ".cifarlab_cache").is_dir() else []


def train_cli(tmp_path, dataset, *extra, run="run"):
    return main(["train", *MODEL, "--dataset", dataset, *QUICK, "--data-root", str(tmp_path / "data"),
                 "--run-dir", str(tmp_path / run), *extra])


# -- folder:PATH ---------------------------------------------------------------------------------------
def test_folder_tree_trains_through_the_cli_and_records_its_normalisation(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    assert train_cli(tmp_path, f"folder:{tree}") == 0
    assert "test accuracy" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["finished"] and summary["epochs_completed"] == 1 and summary["dataset"] == f"folder:{tree}"
    assert summary["train_images"] == 32  # 36 train images less the seeded 10% held out (4)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    pixels = read_back(tree, "train") / 255.0  # measured independently of the package
    assert saved["norm_mean"] == pytest.approx([pixels.mean()], abs=1e-6)
    assert saved["norm_std"] == pytest.approx([pixels.std()], abs=1e-6)
    assert len(cache_files(tmp_path / "data")) == 1
    # the recorded constants are what the run normalised with: resume-style reuse of config.yaml works
    cfg = make_config(saved)
    assert cfg.norm_mean == saved["norm_mean"]


def test_folder_facts_labels_and_arrays(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=("b_dog", "a_cat"), n_train=3, n_test=2)
    data = load_custom(f"folder:{tree}", tmp_path / "data")
    info = data.info
    assert info.classes == ["a_cat", "b_dog"] and info.num_classes == 2  # sorted folder names
    assert (info.in_channels, info.image_size, info.hflip) == (1, (8, 8), True)
    x, y = data.train
    assert x.dtype == torch.uint8 and tuple(x.shape) == (6, 1, 8, 8)
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(x[:, 0], torch.from_numpy(read_back(tree, "train")))
    assert torch.equal(data.test[0][:, 0], torch.from_numpy(read_back(tree, "test")))
    assert data.val is None
    assert dataset_info(f"folder:{tree}", data_root=tmp_path / "data") == info


def test_mean_and_std_hand_computed_and_a_constant_channel_is_not_divided_by_zero(tmp_path):
    # train: one pure red image and one pure blue one -> mean (0.5, 0, 0.5), std (0.5, -, 0.5)
    for c, rgb in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
        save(tmp_path / "t" / "train" / c / "0.png", np.full((4, 4, 3), rgb, np.uint8))
        save(tmp_path / "t" / "test" / c / "0.png", np.full((4, 4, 3), rgb, np.uint8))
    info = load_custom(f"folder:{tmp_path / 't'}", tmp_path / "data").info
    assert info.in_channels == 3
    assert info.mean == (0.5, 0.0, 0.5) and info.std == (0.5, 1.0, 0.5)


def test_grey_and_colour_images_mix_into_three_channels_and_jpeg_is_read(tmp_path):
    t = tmp_path / "t"
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    save(t / "train" / "a" / "g.png", grey)
    save(t / "train" / "b" / "c.jpg", np.full((8, 8, 3), (200, 100, 50), np.uint8), "JPEG")
    save(t / "test" / "a" / "g.png", grey)
    data = load_custom(f"folder:{t}", tmp_path / "data")
    x, y = data.train
    assert data.info.in_channels == 3 and tuple(x.shape) == (2, 3, 8, 8)
    assert all(torch.equal(x[0, ch], torch.from_numpy(grey)) for ch in range(3))  # grey repeated
    assert (x[1].float().mean((1, 2)) - torch.tensor([200.0, 100.0, 50.0])).abs().max() < 4  # JPEG is lossy


def test_image_size_resizes_and_differing_sizes_need_it(tmp_path):
    t = tmp_path / "t"
    save(t / "train" / "a" / "wide.png", np.full((8, 12), 40, np.uint8))
    save(t / "train" / "b" / "square.png", np.full((10, 10), 90, np.uint8))
    save(t / "test" / "a" / "x.png", np.full((8, 8), 40, np.uint8))
    with pytest.raises(DatasetError) as err:
        load_custom(f"folder:{t}", tmp_path / "data")
    msg = str(err.value)
    assert "differ in size" in msg and "wide.png is 12x8" in msg and "square.png is 10x10" in msg
    assert "--image-size" in msg and "\n" not in msg
    data = load_custom(f"folder:{t}", tmp_path / "data", image_size=6)
    assert data.info.image_size == (6, 6) and tuple(data.train[0].shape) == (2, 1, 6, 6)
    assert data.train[0][0].unique().tolist() == [40] and data.train[0][1].unique().tolist() == [90]


def test_fit_size_keeps_the_centre_of_the_longer_side():
    # a 2 x 4 image whose middle two columns are 200: scaled to height 2 it needs no scaling,
    # so the 2 x 2 centre crop is exactly the middle columns
    x = torch.tensor([[[[0, 200, 200, 0], [0, 200, 200, 0]]]], dtype=torch.uint8)
    assert fit_size(x, 2).tolist() == [[[[200, 200], [200, 200]]]]
    assert fit_size(x, 1).shape == (1, 1, 1, 1)


def test_cache_is_used_on_the_second_run_and_invalidated_by_a_change(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree", n_train=4, n_test=2)
    first = load_custom(f"folder:{tree}", tmp_path / "data")
    (cache,) = cache_files(tmp_path / "data")
    stamp = cache.stat().st_mtime_ns
    custom._MEMO.clear()  # a new process: only the cache file is left
    real_decode = folder.decode_image

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache holds it")

    monkeypatch.setattr(folder, "decode_image", no_decoding)
    assert train_cli(tmp_path, f"folder:{tree}") == 0  # the CLI run reads the cache too
    custom._MEMO.clear()
    again = load_custom(f"folder:{tree}", tmp_path / "data")
    assert cache.stat().st_mtime_ns == stamp and cache_files(tmp_path / "data") == [cache]
    assert torch.equal(again.train[0], first.train[0]) and again.info == first.info
    # a new file changes the key: decoded again, and a second cache file appears
    monkeypatch.setattr(folder, "decode_image", real_decode)
    custom._MEMO.clear()
    save(tree / "train" / "cat" / "extra.png", np.zeros((8, 8), np.uint8))
    assert len(load_custom(f"folder:{tree}", tmp_path / "data").train[0]) == len(first.train[0]) + 1
    assert len(cache_files(tmp_path / "data")) == 2


def test_a_val_folder_is_the_validation_split(tmp_path):
    tree = make_tree(tmp_path / "tree", n_train=6, n_test=2, n_val=2)
    cfg = make_config(dataset=f"folder:{tree}", data_root=str(tmp_path / "data"), batch_size=4)
    bundle = build_loaders(cfg, "cpu")
    assert bundle.sizes == {"train": 18, "val": 6, "test": 6}
    assert torch.equal(bundle.val.images, load_custom(f"folder:{tree}", tmp_path / "data").val[0])
    assert build_loaders(make_config(cfg.to_dict() | {"val_fraction": 0.0}), "cpu").val is None
    assert build_loaders(make_config(cfg.to_dict() | {"train_subset": 5}), "cpu").sizes["train"] == 5
    plain = make_tree(tmp_path / "plain", n_train=10, n_test=2)  # no val/: the seeded 10% split
    sizes = build_loaders(make_config(cfg.to_dict() | {"dataset": f"folder:{plain}"}), "cpu").sizes
    assert sizes == {"train": 27, "val": 3, "test": 6}


def test_flips_on_by_default_off_with_no_hflip(tmp_path):
    from cifarlab.cli import build_parser, config_from_args

    tree = make_tree(tmp_path / "tree", n_train=2, n_test=1)
    base = dict(dataset=f"folder:{tree}", data_root=str(tmp_path / "data"), batch_size=4)
    assert build_loaders(make_config(base), "cpu").train.flip is True
    assert build_loaders(make_config(base, hflip=False), "cpu").train.flip is False
    args = build_parser().parse_args(["train", "--dataset", f"folder:{tree}", "--no-hflip"])
    assert config_from_args(args).hflip is False
    register_dataset("digits", (np.zeros((4, 4, 4), np.uint8), [0, 1, 0, 1]), (np.zeros((2, 4, 4), np.uint8), [0, 1]),
                     hflip=False)
    assert build_loaders(make_config(dataset="digits", batch_size=2), "cpu").train.flip is False


# -- npz:FILE ------------------------------------------------------------------------------------------
def write_npz(path: Path, n_train=24, n_test=8, k=3, seed=0, **override) -> dict:
    rng = np.random.default_rng(seed)
    arrays = dict(x_train=rng.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8), y_train=np.arange(n_train) % k,
                  x_test=rng.integers(0, 256, (n_test, 8, 8, 3), dtype=np.uint8), y_test=np.arange(n_test) % k,
                  classes=np.array([f"c{i}" for i in range(k)]))
    arrays.update(override)
    arrays = {key: v for key, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_file_trains_through_the_cli(tmp_path):
    arrays = write_npz(tmp_path / "set.npz")
    assert train_cli(tmp_path, f"npz:{tmp_path / 'set.npz'}") == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    data = load_custom(f"npz:{tmp_path / 'set.npz'}", tmp_path / "data")
    assert data.info.classes == ["c0", "c1", "c2"] and data.info.in_channels == 3
    assert torch.equal(data.train[0], torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["norm_mean"] == pytest.approx((arrays["x_train"] / 255.0).mean((0, 1, 2)).tolist(), abs=1e-6)


def test_npz_float_images_without_channels_or_classes(tmp_path):
    x = np.linspace(0, 1, 6 * 5 * 5).reshape(6, 5, 5).astype(np.float32)
    np.savez(tmp_path / "f.npz", x_train=x, y_train=[0, 1, 2, 0, 1, 2], x_test=x[:2], y_test=[2, 1])
    data = load_custom(f"npz:{tmp_path / 'f.npz'}")
    assert data.info.classes == ["0", "1", "2"] and data.info.in_channels == 1
    assert torch.equal(data.train[0][:, 0], torch.from_numpy(np.round(x.astype(np.float64) * 255).astype(np.uint8)))
    assert load_arrays(f"npz:{tmp_path / 'f.npz'}", train=False)[1].tolist() == [2, 1]


def test_array_layouts_dtypes_and_labels():
    nhwc = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(as_images(nhwc, "x"), nchw) and torch.equal(as_images(nchw, "x"), nchw)
    assert as_images(np.zeros((2, 4, 5), np.uint8), "x").shape == (2, 1, 4, 5)
    assert as_images(np.full((1, 2, 2), 0.5), "x").unique().tolist() == [128]  # round(127.5)
    assert as_images(np.full((1, 2, 2), 7, np.int64), "x").dtype == torch.uint8
    with pytest.raises(DatasetError, match=r"float images must lie in \[0, 1\]"):
        as_images(np.full((1, 2, 2), 255.0), "x")
    with pytest.raises(DatasetError, match="must be N x H x W"):
        as_images(np.zeros((2, 3)), "x")
    assert as_labels(np.array([[1], [0]]), "y").tolist() == [1, 0]
    with pytest.raises(DatasetError, match="must be integers"):
        as_labels(np.array([0.5, 1.0]), "y")
    mean, std = pixel_stats(torch.tensor([[[[0, 255]]], [[[255, 255]]]], dtype=torch.uint8))
    assert mean == (0.75,) and std == pytest.approx((np.sqrt(0.75 * 0.25),), abs=1e-6)


# -- register_dataset ----------------------------------------------------------------------------------
def tiny_arrays(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)  # float tensors, torch's N x C x H x W
    y = torch.arange(n) % 2
    return x, y


def test_register_dataset_then_trainer_config_and_listing(tmp_path, capsys):
    from cifarlab.train import Trainer

    x, y = tiny_arrays()
    info = register_dataset("blobs", train=(x, y), test=(x[:10], y[:10]), classes=["left", "right"])
    assert (info.num_classes, info.in_channels, info.image_size) == (2, 3, (8, 8))
    assert "blobs" in available_datasets()
    cfg = make_config(model="resnet20", dataset="blobs", epochs=1, batch_size=16, device="cpu", progress="off",
                      run_dir=str(tmp_path / "run"))
    summary = Trainer(cfg).fit()
    assert summary["finished"] and summary["dataset"] == "blobs" and summary["train_images"] == 36
    assert cfg.norm_mean is None  # the caller's config is not modified...
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["norm_mean"] == list(info.mean)  # ...the run's config.yaml records the constants
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "blobs" in out and "registered" in out and "folder:PATH" in out and "npz:FILE" in out
    assert build_loaders(make_config(dataset="blobs", batch_size=4, image_size=4), "cpu").info.image_size == (4, 4)


def test_registering_twice_same_data_is_fine_different_data_is_an_error():
    x, y = tiny_arrays()
    first = register_dataset("twice", (x, y), (x, y))
    assert register_dataset("twice", (x.numpy(), y.numpy()), (x, y)) == first  # same pixels as arrays
    other, _ = tiny_arrays(seed=1)
    with pytest.raises(DatasetError) as err:
        register_dataset("twice", (other, y), (x, y))
    assert "already registered with different data" in str(err.value) and "\n" not in str(err.value)
    unregister_dataset("twice")
    register_dataset("twice", (other, y), (x, y))
    for bad in ("cifar10", "folder:x", "synthetic", "has space"):
        with pytest.raises(ConfigError):
            register_dataset(bad, (x, y), (x, y))


def test_given_mean_and_std_are_kept():
    x, y = tiny_arrays()
    info = register_dataset("fixed", (x, y), (x, y), mean=0.5, std=[0.1, 0.2, 0.3])
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.1, 0.2, 0.3)


# -- torchvision:NAME ----------------------------------------------------------------------------------
def test_torchvision_usps_from_its_real_files_trains_through_the_cli(tmp_path, offline):
    (train_x, train_y), (test_x, test_y) = fixtures.write_usps(tmp_path / "data", n_train=30, n_test=10)
    data = load_custom("torchvision:usps", tmp_path / "data")
    assert torch.equal(data.train[0], train_x) and torch.equal(data.train[1], train_y)
    assert torch.equal(data.test[0], test_x) and data.info.num_classes == 10 and data.info.hflip is False
    assert train_cli(tmp_path, "torchvision:USPS") == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["train_images"] == 27


def test_torchvision_emnist_needs_its_split_and_is_turned_upright(tmp_path):
    (train_x, train_y), _ = fixtures.write_emnist(tmp_path / "data", "letters")
    with pytest.raises(ConfigError, match="needs its split.*letters"):
        make_config(dataset="torchvision:EMNIST")
    data = load_custom("torchvision:emnist:letters", tmp_path / "data")
    assert torch.equal(data.train[0], train_x) and torch.equal(data.train[1], train_y)
    assert data.info.classes[1] == "a" and data.info.num_classes == 27


def test_torchvision_missing_files_are_one_error_without_and_with_download(tmp_path, offline, capsys):
    with pytest.raises(DatasetError) as err:
        load_custom("torchvision:USPS", tmp_path / "data", download=False)
    assert "not found" in str(err.value) and "download disabled" in str(err.value) and "\n" not in str(err.value)
    assert train_cli(tmp_path, "torchvision:QMNIST") == 2  # download allowed, network refused
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "download failed" in err and "QMNIST" in err
    assert not (tmp_path / "run").exists()


def test_torchvision_image_by_image_path_resizes_and_caches(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Pictures(torch.utils.data.Dataset):  # files of varying sizes, no array attribute
        opened = 0
        classes = ["small", "large"]

        def __init__(self, root, split="train", download=False):
            self.n = 6 if split == "train" else 2

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            Pictures.opened += 1
            return Image.fromarray(np.full((10 + i, 12, 3), 30 * i, np.uint8)), i % 2

    monkeypatch.setattr(tvd, "Pictures", Pictures, raising=False)
    monkeypatch.setitem(tvsets.TORCHVISION_SETS, "Pictures", tvsets.TVSet("split", "train", "test"))
    with pytest.raises(DatasetError, match="differ in size"):
        load_custom("torchvision:Pictures", tmp_path / "data")
    data = load_custom("torchvision:pictures", tmp_path / "data", image_size=8)
    assert data.info.image_size == (8, 8) and data.info.classes == ["small", "large"]
    assert data.train[0][3].unique().tolist() == [90]
    assert len(cache_files(tmp_path / "data")) == 1
    custom._MEMO.clear()
    opened = Pictures.opened
    again = load_custom("torchvision:pictures", tmp_path / "data", image_size=8)
    assert Pictures.opened == opened and torch.equal(again.train[0], data.train[0])  # from the cache


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------
def missing(tree: Path) -> str:
    import shutil

    shutil.rmtree(tree)
    return f"no such folder {tree}"


def corrupt(tree: Path) -> str:
    bad = tree / "train" / "cat" / "005.png"
    bad.write_bytes(b"this is not a png")
    return f"cannot read image {bad}"


def truncated(tree: Path) -> str:
    bad = tree / "train" / "dog" / "002.png"  # a real 8 x 8 PNG cut in half
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return f"cannot read image {bad}"


def no_images(tree: Path) -> str:
    for p in (tree / "train" / "emu").iterdir():
        p.unlink()
    (tree / "train" / "emu" / "notes.txt").write_text("no pictures here")
    return f"class folder {tree / 'train' / 'emu'} holds no images"


def no_class_folders(tree: Path) -> str:
    import shutil

    for c in ("cat", "dog", "emu"):
        for p in (tree / "train" / c).iterdir():
            p.rename(tree / "train" / f"{c}-{p.name}")
        shutil.rmtree(tree / "train" / c)
    return "no class folders in"


def extra_test_class(tree: Path) -> str:
    save(tree / "test" / "fox" / "0.png", np.zeros((8, 8), np.uint8))
    return "test class 'fox'"


FOLDER_CASES = {
    "missing folder": missing,
    "no class folders": no_class_folders,
    "class folder without images": no_images,
    "test class absent from train": extra_test_class,
    "corrupt image": corrupt,
    "truncated image": truncated,
}


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_bad_folder_is_one_error_line_and_nothing_is_written(tmp_path, capsys, case):
    tree = make_tree(tmp_path / "tree", n_train=8, n_test=2)
    expected = FOLDER_CASES[case](tree)
    assert train_cli(tmp_path, f"folder:{tree}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err
    assert not (tmp_path / "run").exists() and cache_files(tmp_path / "data") == []
    assert not (tmp_path / "user-cache").exists()


NPZ_CASES = {
    "mismatched lengths": (dict(y_train=np.arange(23) % 3), "train has 24 images but 23 labels"),
    "label above K-1": (dict(y_test=np.array([0, 1, 2, 3, 0, 1, 2, 0])),
                        "labels must lie in 0..2 (3 classes), found 0..3"),
    "negative label": (dict(y_train=np.arange(24) % 3 - 1, classes=None),
                       "labels must lie in 0..2 (3 classes), found -1..2"),
    "missing array": (dict(x_test=None), "lacks x_test"),
    "float out of range": (dict(x_train=np.full((24, 8, 8), 2.0)), "float images must lie in [0, 1]"),
    "shapes differ": (dict(x_test=np.zeros((8, 9, 9, 3), np.uint8)),
                      "test images are 3x9x9 but train images are 3x8x8"),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_bad_npz_is_one_error_line_and_nothing_is_written(tmp_path, capsys, case):
    override, expected = NPZ_CASES[case]
    write_npz(tmp_path / "bad.npz", **override)
    assert train_cli(tmp_path, f"npz:{tmp_path / 'bad.npz'}") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset,expected", [
    ("npz:/no/such/file.npz", "no such file /no/such/file.npz"),
    ("folder:", "is incomplete: use folder:PATH"),
    ("torchvision:ImageNet21k", "unknown torchvision dataset 'ImageNet21k'"),
    ("torchvision:MNIST:letters", "takes no ':letters'"),
    ("my_set", "unknown dataset 'my_set'"),
])
def test_bad_names_are_one_error_line(tmp_path, capsys, dataset, expected):
    assert train_cli(tmp_path, dataset) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_config_info_and_image_size_only_where_it_applies():
    from cifarlab.data import config_info

    x, y = tiny_arrays()
    register_dataset("small", (x, y), (x, y))
    info = config_info(make_config(dataset="small", image_size=4, norm_mean=[0.25]))
    assert info.image_size == (4, 4) and info.mean == (0.25,) * 3
    with pytest.raises(ConfigError, match="synthetic images are 32x32"):
        build_loaders(make_config(dataset="synthetic", image_size=16), "cpu")
    with pytest.raises(ConfigError, match="image_size must be a positive integer"):
        make_config(dataset="small", image_size=0)


def test_a_model_too_big_for_the_images_is_one_error_line(tmp_path, capsys):
    """LeNet-5's three 5x5 convs cannot run on 8x8 images: one line, no traceback, no run directory."""
    run = tmp_path / "run"
    code = main(["train", "--model", "lenet5", "--dataset", "synthetic:1x8x8", "--train-subset", "32",
                 "--test-subset", "16", "--epochs", "1", "--progress", "off", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: the model cannot take 1x8x8 images") and err.count("\n") == 1
    assert not run.exists()
