"""cifarlab.data: real-format parsing, file search and errors, splits, the device loader's
augmentation pinned by hand, per-epoch determinism, DDP sharding, the Flowers DataLoader path.

Nothing here touches the network: files are written by cifarlab.data.fixtures in the real
formats and read back through torchvision's parsers; downloads are disabled or stubbed.
"""
from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

import cifarlab.data.sources as sources
from cifarlab.config import make_config
from cifarlab.data import (DeviceLoader, available_datasets, build_loaders, crop_flip, dataset_info,
                           dataset_location, draw_params, fixtures, load_arrays, make_synthetic,
                           resolve_data_root, split_train_val, subset_indices, torchvision_dataset)
from cifarlab.data.augment import AugmentParams, apply_cutout, augment, norm_constants, normalize
from cifarlab.errors import ConfigError, DatasetError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def cfg_for(root, **kw):
    base = dict(dataset="cifar10", data_root=str(root), download=False, batch_size=8, eval_batch_size=16)
    base.update(kw)
    return make_config(base)


# -- parsers on generated real-format files ------------------------------------------------------
def test_cifar10_pickles_round_trip(tmp_path):
    (tx, ty), (sx, sy) = fixtures.write_cifar10(tmp_path, n_train=23, n_test=7, seed=3)
    x, y = load_arrays("cifar10", tmp_path, train=True, download=False)
    assert x.dtype == torch.uint8 and x.shape == (23, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(x, tx) and torch.equal(y, ty)
    x, y = load_arrays("cifar10", tmp_path, train=False, download=False)
    assert torch.equal(x, sx) and torch.equal(y, sy)
    # the PIL dataset for the classic loop reads the same pixels (H x W x C)
    ds = torchvision_dataset("cifar10", tmp_path, train=True)
    img, label = ds[5]
    assert label == int(ty[5]) and torch.equal(torch.from_numpy(np.array(img)), tx[5].permute(1, 2, 0))
    assert ds.classes[0] == "airplane"


def test_cifar_decoded_arrays_are_cached_and_invalidated(tmp_path):
    fixtures.write_cifar10(tmp_path, n_train=10, n_test=5, seed=0)
    load_arrays("cifar10", tmp_path, train=False, download=False)
    assert (tmp_path / ".cifarlab_cache" / "cifar10-test.pt").is_file()
    # new files with the same names: the cache must not serve the old pixels
    (_, _), (sx, sy) = fixtures.write_cifar10(tmp_path, n_train=10, n_test=6, seed=1)
    x, y = load_arrays("cifar10", tmp_path, train=False, download=False)
    assert torch.equal(x, sx) and torch.equal(y, sy)


def test_cifar100_pickles_round_trip(tmp_path):
    (tx, ty), (sx, sy) = fixtures.write_cifar100(tmp_path, n_train=30, n_test=12, seed=1)
    x, y = load_arrays("cifar100", tmp_path, train=True, download=False)
    assert torch.equal(x, tx) and torch.equal(y, ty) and int(y.max()) < 100
    x, y = load_arrays("cifar100", tmp_path, train=False, download=False)
    assert torch.equal(x, sx) and torch.equal(y, sy)


@pytest.mark.parametrize("name", ["mnist", "fashion", "kmnist"])
def test_idx_files_round_trip(tmp_path, name, monkeypatch):
    monkeypatch.setitem(sources.SYSTEM_LOCATIONS, "fashion", [tmp_path / "nowhere"])
    (tx, ty), (sx, sy) = fixtures.write_mnist_like(tmp_path, name, n_train=17, n_test=9, seed=2)
    x, y = load_arrays(name, tmp_path, train=True, download=False)
    assert x.shape == (17, 1, 28, 28) and torch.equal(x, tx) and torch.equal(y, ty)
    x, y = load_arrays(name, tmp_path, train=False, download=False)
    assert torch.equal(x, sx) and torch.equal(y, sy)


def test_idx_hand_encoded_header():
    # magic 0x00000803 (ubyte, 3 dims), then 2, 1, 2 big-endian, then the bytes
    data = fixtures.idx_bytes(torch.tensor([[[7, 8]], [[9, 10]]], dtype=torch.uint8).numpy())
    assert data == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 7, 8, 9, 10])


def test_svhn_mat_round_trip_maps_label_10_to_0(tmp_path):
    (tx, ty), (sx, sy) = fixtures.write_svhn(tmp_path, n_train=25, n_test=11, seed=4)
    assert (ty == 0).any()  # stored as 10 in the file
    x, y = load_arrays("svhn", tmp_path, train=True, download=False)
    assert torch.equal(x, tx) and torch.equal(y, ty)
    x, y = load_arrays("svhn", tmp_path, train=False, download=False)
    assert torch.equal(x, sx) and torch.equal(y, sy)


# -- where files are searched, and the errors -------------------------------------------------------
def test_system_location_idx_gz_files_are_used_when_the_root_is_empty(tmp_path, monkeypatch):
    system = tmp_path / "usr-share"
    (tx, ty), _ = fixtures.write_idx(system, n_train=12, n_test=4, seed=5)  # Debian's flat .gz layout
    monkeypatch.setitem(sources.SYSTEM_LOCATIONS, "fashion", [system])
    root = tmp_path / "empty-root"
    x, y = load_arrays("fashion", root, train=True, download=False)
    assert torch.equal(x, tx) and torch.equal(y, ty)
    staged = root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert staged.is_file() and staged.stat().st_mode & 0o044 == 0o044  # decompressed once, readable by all
    assert dataset_location("fashion", root) == root / "FashionMNIST" / "raw"
    assert dataset_location("fashion", tmp_path / "other-root") == system
    assert dataset_location("mnist", tmp_path / "other-root") is None


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_found_with_an_empty_data_root(tmp_path):
    x, y = load_arrays("fashion", tmp_path, train=False, download=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert int(y[0]) == 9  # the first test image is an ankle boot
    ds = torchvision_dataset("fashion", tmp_path, train=False)
    assert len(ds) == 10000 and ds[0][1] == 9 and ds[0][0].size == (28, 28)


@pytest.mark.parametrize("name,hint", [("cifar10", "cifar-10-batches-py"), ("svhn", "svhn"),
                                       ("fashion", "apt-get install dataset-fashion-mnist"),
                                       ("kmnist", "KMNIST/raw")])
def test_missing_dataset_without_download_is_one_clear_error(tmp_path, monkeypatch, name, hint):
    monkeypatch.setitem(sources.SYSTEM_LOCATIONS, "fashion", [tmp_path / "no-system-copy"])
    with pytest.raises(DatasetError) as err:
        load_arrays(name, tmp_path / "root", train=True, download=False)
    msg = str(err.value)
    assert "\n" not in msg and repr(name) in msg and hint in msg
    assert str(tmp_path / "root") in msg and "download disabled" in msg
    if name == "fashion":
        assert str(tmp_path / "no-system-copy") in msg  # the system place is named too


def test_download_network_error_becomes_dataset_error(tmp_path, monkeypatch):
    def offline(name, root, split, transform, download):
        assert download
        raise RuntimeError("Error downloading x.gz:\nTried http://mirror/, got:\n<urlopen error unreachable>\n")

    monkeypatch.setattr(sources, "_construct", offline)
    with pytest.raises(DatasetError) as err:
        load_arrays("mnist", tmp_path, train=True, download=True)
    msg = str(err.value)
    assert "\n" not in msg and "download failed" in msg and "urlopen error unreachable" in msg
    monkeypatch.setattr(sources, "_construct", lambda *a, **k: (_ for _ in ()).throw(URLError("no route")))
    with pytest.raises(DatasetError, match="no route"):
        load_arrays("cifar10", tmp_path, train=True, download=True)


def test_damaged_file_is_a_dataset_error(tmp_path):
    fixtures.write_cifar10(tmp_path, n_train=10, n_test=5)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="cannot read dataset 'cifar10'"):
        load_arrays("cifar10", tmp_path, train=False, download=False)


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        dataset_info("imagenet")
    assert all(n in str(err.value) for n in available_datasets())
    assert set(available_datasets()) == {"cifar10", "cifar100", "fashion", "kmnist", "mnist", "svhn",
                                         "flowers102", "synthetic"}


def test_data_root_env_overrides_only_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path))
    assert resolve_data_root("data") == tmp_path and resolve_data_root(None) == tmp_path
    assert resolve_data_root("elsewhere") == Path("elsewhere")
    monkeypatch.delenv("CIFARLAB_DATA")
    monkeypatch.delenv("CIFARLAB_ROOT", raising=False)
    root = tmp_path / "project"  # a checkout: grid/ and log/ mark its root
    for sub in ("grid", "log", "notebooks"):
        (root / sub).mkdir(parents=True)
    monkeypatch.chdir(root / "notebooks")  # where Jupyter starts a kernel: the default is still <root>/data
    assert resolve_data_root("data") == root / "data" and resolve_data_root(None) == root / "data"


def test_dataset_facts():
    c10 = dataset_info("cifar10")
    assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2023, 0.1994, 0.2010)
    assert (c10.num_classes, c10.in_channels, c10.image_size) == (10, 3, (32, 32))
    assert len(dataset_info("cifar100").classes) == 100 == len(set(dataset_info("cifar100").classes))
    assert dataset_info("fashion").in_channels == 1 and dataset_info("fashion").mean == (0.2860,)
    assert dataset_info("flowers102").image_size == (32, 32)
    assert dataset_info("flowers102", image_size=64).image_size == (64, 64)
    g = dataset_info("synthetic:1x28x28:5")
    assert (g.in_channels, g.image_size, g.num_classes, len(g.mean)) == (1, (28, 28), 5, 1)


# -- splits --------------------------------------------------------------------------------------
def test_validation_split_sizes_disjoint_and_seeded():
    tr, va = split_train_val(100, 0.1, seed=7)
    assert len(tr) == 90 and len(va) == 10
    assert set(tr.tolist()).isdisjoint(va.tolist()) and set(tr.tolist()) | set(va.tolist()) == set(range(100))
    tr2, va2 = split_train_val(100, 0.1, seed=7)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    _, va3 = split_train_val(100, 0.1, seed=8)
    assert not torch.equal(va, va3)
    assert len(split_train_val(100, 0.0, seed=7)[1]) == 0


def test_train_subset_keeps_the_first_of_the_remaining_permutation():
    full, va = split_train_val(100, 0.2, seed=3)
    sub, va_sub = split_train_val(100, 0.2, seed=3, train_subset=25)
    assert torch.equal(sub, full[:25]) and torch.equal(va, va_sub)  # validation unaffected
    assert torch.equal(subset_indices(50, 10), subset_indices(50, 10)) and len(subset_indices(50, 10)) == 10
    assert torch.equal(subset_indices(5, None), torch.arange(5))


def test_build_loaders_on_cifar_fixture(tmp_path):
    (tx, ty), (sx, sy) = fixtures.write_cifar10(tmp_path, n_train=40, n_test=12)
    data = build_loaders(cfg_for(tmp_path, val_fraction=0.25, train_subset=20, test_subset=5), "cpu")
    assert data.sizes == {"train": 20, "val": 10, "test": 5}
    assert data.train.num_samples == 20 and len(data.train) == 3 and data.val.num_samples == 10
    tr, va = split_train_val(40, 0.25, seed=0, train_subset=20)
    # validation batches: the held-out images, in order, normalised with CIFAR-10's constants
    x, y = next(iter(data.val))
    mean = torch.tensor(dataset_info("cifar10").mean).view(1, 3, 1, 1)
    std = torch.tensor(dataset_info("cifar10").std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (tx[va].float() / 255 - mean) / std)
    assert torch.equal(y, ty[va])
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    # training images come from the training subset only
    data.train.set_epoch(1)
    seen = torch.cat([yb for _, yb in data.train])
    assert sorted(seen.tolist()) == sorted(ty[tr].tolist())
    no_val = build_loaders(cfg_for(tmp_path, val_fraction=0.0), "cpu")
    assert no_val.val is None and no_val.sizes["train"] == 40


def test_digits_are_not_flipped_fashion_is(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.SYSTEM_LOCATIONS, "fashion", [tmp_path / "none"])
    for name in ("mnist", "fashion"):
        fixtures.write_mnist_like(tmp_path, name, n_train=20, n_test=4)
    assert build_loaders(cfg_for(tmp_path, dataset="mnist"), "cpu").train.flip is False
    fashion = build_loaders(cfg_for(tmp_path, dataset="fashion"), "cpu")
    assert fashion.train.flip is True and fashion.train.pad == 4
    assert build_loaders(cfg_for(tmp_path, dataset="fashion", augment=False), "cpu").train.augment is False


# -- augmentation, pinned by hand ---------------------------------------------------------------------
def test_crop_and_flip_hand_computed_2x2():
    x = torch.tensor([[[[1, 2], [3, 4]]]], dtype=torch.uint8).repeat(4, 1, 1, 1)
    offsets = torch.tensor([[0, 0], [2, 2], [0, 0], [1, 2]])
    flip = torch.tensor([False, False, True, True])
    out = crop_flip(x, offsets, flip, pad=1)  # padded: 4x4 with the image at rows/cols 1..2
    assert out[0, 0].tolist() == [[0, 0], [0, 1]]
    assert out[1, 0].tolist() == [[4, 0], [0, 0]]
    assert out[2, 0].tolist() == [[0, 0], [1, 0]]  # crop [[0,0],[0,1]] mirrored
    assert out[3, 0].tolist() == [[0, 2], [0, 4]]  # rows 1-2, cols 2-3: [[2, 0], [4, 0]], mirrored


def test_crop_equals_padded_slice_and_flip_mirrors():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    p = draw_params(6, g, (8, 8), pad=4, flip=True)
    out = crop_flip(x, p.offsets, p.flip, pad=4)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        dy, dx = p.offsets[i].tolist()
        window = padded[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], window.flip(2) if p.flip[i] else window)
    assert p.offsets.min() >= 0 and p.offsets.max() <= 8


def test_pixels_outside_the_image_are_zero_before_normalisation():
    x = torch.full((2, 1, 6, 6), 255, dtype=torch.uint8)
    out = crop_flip(x, torch.tensor([[0, 0], [8, 5]]), None, pad=4)
    assert (out[0, 0, :4] == 0).all() and (out[0, 0, :, :4] == 0).all() and (out[0, 0, 4:, 4:] == 255).all()
    assert (out[1, 0, 2:] == 0).all() and (out[1, 0, :2, 5:] == 0).all() and (out[1, 0, :2, :5] == 255).all()


def test_cutout_zeroes_exactly_one_square():
    x = torch.full((2, 3, 10, 10), 200, dtype=torch.uint8)
    out = apply_cutout(x, torch.tensor([[2, 3], [6, 6]]), size=4)
    expected = x.clone()
    expected[0, :, 2:6, 3:7] = 0
    expected[1, :, 6:10, 6:10] = 0
    assert torch.equal(out, expected)


def test_cutout_after_normalisation_equals_minus_mean_over_std():
    info = dataset_info("cifar10")
    x = torch.full((16, 3, 32, 32), 255, dtype=torch.uint8)
    loader = DeviceLoader(x, torch.zeros(16, dtype=torch.long), 16, info.mean, info.std, shuffle=True,
                          augment=True, pad=0, flip=True, cutout=8, seed=1)
    xb, _ = next(iter(loader))
    low = torch.tensor([-m / s for m, s in zip(info.mean, info.std)]).view(1, 3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(info.mean, info.std)]).view(1, 3, 1, 1)
    is_cut = torch.isclose(xb, low.expand_as(xb), atol=1e-5)
    assert (is_cut | torch.isclose(xb, high.expand_as(xb), atol=1e-5)).all()
    assert (is_cut.sum(dim=(2, 3)) == 64).all()  # an 8x8 square in every channel of every image


def test_loader_applies_exactly_the_epoch_plan():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(37)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = DeviceLoader(x, y, 10, mean, std, shuffle=True, augment=True, cutout=6, seed=3)
    loader.set_epoch(2)
    idx, params = loader.epoch_plan()
    assert all(t is not None and len(t) == 37 for t in (params.offsets, params.flip, params.cutout))
    got = list(loader)
    assert [len(b[1]) for b in got] == [10, 10, 10, 7] and len(loader) == 4
    expected = augment(x[idx], params, pad=4, cutout=6)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.cat([b[0] for b in got]), (expected.float() / 255 - m) / s)
    assert torch.equal(torch.cat([b[1] for b in got]), idx)


def test_draws_cover_all_crops_and_flip_about_half():
    p = draw_params(20000, torch.Generator().manual_seed(0), (32, 32), pad=4, flip=True, cutout=16)
    assert len({tuple(o) for o in p.offsets.tolist()}) == 81
    assert 0.47 < p.flip.float().mean().item() < 0.53
    # square kept inside a 32x32 image: every corner row and column 0..16 drawn
    assert p.cutout.amin(0).tolist() == [0, 0] and p.cutout.amax(0).tolist() == [16, 16]


def test_draw_params_defaults_and_switches():
    g = torch.Generator().manual_seed(1)
    p = draw_params(500, g, (8, 8))  # defaults: pad 4, flip, no cutout
    assert set(p.offsets.flatten().tolist()) == set(range(9)) and p.flip is not None and p.cutout is None
    assert draw_params(50, g, (8, 8), pad=0).offsets is None  # pad 0: no crop at all
    assert set(draw_params(200, g, (8, 8), pad=1).offsets.flatten().tolist()) == {0, 1, 2}
    assert draw_params(50, g, (8, 8), flip=False).flip is None
    c = draw_params(400, g, (5, 4), cutout=1).cutout  # a 1x1 square: any pixel of the 5x4 image
    assert set(c[:, 0].tolist()) == set(range(5)) and set(c[:, 1].tolist()) == set(range(4))
    for size in (4, 6):  # a square as large as the image (or larger) sits at (0, 0): everything is cut
        assert torch.equal(draw_params(50, g, (4, 4), cutout=size).cutout, torch.zeros(50, 2, dtype=torch.int64))


def test_augment_composes_crop_flip_cutout_by_hand():
    x = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3).repeat(2, 1, 1, 1)  # [[1,2,3],[4,5,6],[7,8,9]]
    params = AugmentParams(torch.tensor([[0, 0], [2, 1]]), torch.tensor([False, True]), torch.tensor([[1, 1], [0, 0]]))
    out = augment(x, params, pad=1, cutout=1)
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 0, 2], [0, 4, 5]]  # crop at (0, 0), pixel (1, 1) cut
    assert out[1, 0].tolist() == [[0, 5, 4], [9, 8, 7], [0, 0, 0]]  # crop at (2, 1), mirrored, (0, 0) cut
    # flip only (pad 0: no offsets drawn); no corners drawn: no cutout whatever the size
    flip_only = augment(x, AugmentParams(None, torch.tensor([True, False]), None), pad=0, cutout=2)
    assert flip_only[0, 0].tolist() == [[3, 2, 1], [6, 5, 4], [9, 8, 7]] and torch.equal(flip_only[1], x[1])
    # cutout only: nothing to crop or flip
    cut_only = augment(x, AugmentParams(None, None, torch.tensor([[2, 2], [0, 1]])), pad=0, cutout=1)
    assert cut_only[0, 0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]
    assert cut_only[1, 0].tolist() == [[1, 0, 3], [4, 5, 6], [7, 8, 9]]
    assert torch.equal(crop_flip(x, None, None, pad=0), x)


def test_augment_params_slice_keeps_every_field():
    p = AugmentParams(torch.arange(10).view(5, 2), torch.tensor([True, False, True, True, False]),
                      torch.arange(10, 20).view(5, 2))
    s = p.slice(slice(1, 3))
    assert s.offsets.tolist() == [[2, 3], [4, 5]] and s.flip.tolist() == [False, True]
    assert s.cutout.tolist() == [[12, 13], [14, 15]]
    s = AugmentParams(None, p.flip, None).slice(torch.tensor([4, 0]))
    assert s.offsets is None and s.flip.tolist() == [False, True] and s.cutout is None


def test_norm_constants_hand_computed():
    import numpy as np

    scale, shift = norm_constants(np.array([0.5, 0.25]), np.array([0.25, 0.5]), "cpu")  # float64 in, float32 out
    assert scale.shape == shift.shape == (1, 2, 1, 1) and scale.dtype == shift.dtype == torch.float32
    torch.testing.assert_close(scale.flatten(), torch.tensor([4 / 255, 2 / 255]))
    torch.testing.assert_close(shift.flatten(), torch.tensor([-2.0, -0.5]))
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 2, 1, 1)
    torch.testing.assert_close(normalize(x, scale, shift).flatten(), torch.tensor([-2.0, -0.5, 2.0, 1.5]))


def test_augmentation_stays_on_the_batch_device():
    # meta stands in for a GPU: any index or constant made on the CPU instead would raise here
    dev = "meta"
    p = AugmentParams(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([True, False]), None).to(dev)
    assert p.offsets.device.type == p.flip.device.type == dev and p.cutout is None
    x = torch.zeros(2, 3, 6, 6, dtype=torch.uint8, device=dev)
    out = crop_flip(x, p.offsets, p.flip, pad=2)
    out = apply_cutout(out, torch.zeros(2, 2, dtype=torch.int64, device=dev), size=3)
    scale, shift = norm_constants((0.5,) * 3, (0.2,) * 3, dev)
    assert scale.device.type == shift.device.type == dev
    y = normalize(out, scale, shift)
    assert y.device.type == dev and y.shape == (2, 3, 6, 6) and y.dtype == torch.float32


# -- per-epoch determinism ------------------------------------------------------------------------
def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def _synthetic_loader(seed=0, **kw):
    x, y = make_synthetic(50, shape=(3, 32, 32), seed=0)
    return DeviceLoader(x, y, 16, (0.5,) * 3, (0.2,) * 3, shuffle=True, augment=True, cutout=4, seed=seed, **kw)


def test_same_seed_and_epoch_give_identical_batches_other_epoch_differs():
    a = _epoch(_synthetic_loader(), 3)
    fresh = _synthetic_loader()  # as after a resume: a new loader jumps straight to epoch 3
    b = _epoch(fresh, 3)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    c = _epoch(fresh, 4)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))
    d = _epoch(_synthetic_loader(seed=1), 3)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in d]))


def test_eval_loader_keeps_order_and_last_partial_batch_train_drops_a_single_leftover():
    x, y = make_synthetic(33, shape=(1, 4, 4))
    ev = DeviceLoader(x, y, 16, (0.5,), (0.2,))
    assert len(ev) == 3 and ev.num_samples == 33
    assert torch.equal(torch.cat([b for _, b in ev]), y)
    tr = DeviceLoader(x, y, 16, (0.5,), (0.2,), shuffle=True)
    assert len(tr) == 2 and tr.num_samples == 32 and [len(b) for _, b in tr] == [16, 16]


# -- DDP sharding ------------------------------------------------------------------------------------
def test_train_shards_are_disjoint_equal_and_cover_the_split():
    x, y = make_synthetic(101, shape=(1, 4, 4))
    labels = torch.arange(101)
    whole = DeviceLoader(x, labels, 10, (0.5,), (0.2,), shuffle=True, augment=True, seed=5)
    whole.set_epoch(2)
    order, _ = whole.epoch_plan()
    shares = []
    for rank in range(3):
        part = DeviceLoader(x, labels, 10, (0.5,), (0.2,), shuffle=True, augment=True, seed=5, rank=rank,
                            world_size=3)
        part.set_epoch(2)
        got = torch.cat([b for _, b in part])
        assert part.num_samples == 33 == len(got)
        assert torch.equal(got, order[rank::3][:33])  # the same permutation on every rank
        shares.append(set(got.tolist()))
    assert not (shares[0] & shares[1] or shares[0] & shares[2] or shares[1] & shares[2])
    assert len(shares[0] | shares[1] | shares[2]) == 99  # 101 trimmed to 3 x 33


def test_eval_shards_score_every_image_once_and_batch_is_split(tmp_path):
    x, y = make_synthetic(10, shape=(1, 4, 4))
    parts = [torch.cat([b for _, b in DeviceLoader(x, torch.arange(10), 4, (0.5,), (0.2,), rank=r, world_size=3)])
             for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    fixtures.write_cifar10(tmp_path, n_train=40, n_test=10)
    data = build_loaders(cfg_for(tmp_path, batch_size=8), "cpu", rank=1, world_size=2)
    assert data.train.batch_size == 4 and data.train.num_samples == 18  # 36 train images / 2 ranks
    with pytest.raises(ConfigError):
        build_loaders(cfg_for(tmp_path, batch_size=2), "cpu", rank=0, world_size=4)


def test_same_image_gets_the_same_augmentation_whatever_the_world_size():
    x, _ = make_synthetic(20, shape=(3, 8, 8))
    ids = torch.arange(20)

    def batches(rank, ws):
        loader = DeviceLoader(x, ids, 20, (0.5,) * 3, (0.2,) * 3, shuffle=True, augment=True, cutout=3,
                              seed=2, rank=rank, world_size=ws)
        loader.set_epoch(1)
        xb, yb = next(iter(loader))
        return dict(zip(yb.tolist(), xb))

    single = batches(0, 1)
    for rank in range(2):
        for i, img in batches(rank, 2).items():
            assert torch.equal(img, single[i])


# -- synthetic data ----------------------------------------------------------------------------------
def test_synthetic_is_seeded_balanced_and_learnable():
    x, y = make_synthetic(200, num_classes=4, shape=(2, 6, 5), seed=1)
    assert x.shape == (200, 2, 6, 5) and x.dtype == torch.uint8 and torch.equal(torch.bincount(y), torch.full((4,), 50))
    x2, y2 = make_synthetic(200, num_classes=4, shape=(2, 6, 5), seed=1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    # class means from one seed classify another seed's images (shared patterns): learnable
    tx, ty = make_synthetic(500, seed=0)
    sx, sy = make_synthetic(300, seed=1)
    centroids = torch.stack([tx[ty == k].float().mean(0) for k in range(10)])
    pred = torch.cdist(sx.float().flatten(1), centroids.flatten(1)).argmin(1)
    assert (pred == sy).float().mean() > 0.9
    tr, te = load_arrays("synthetic:1x28x28:3", None, True), load_arrays("synthetic:1x28x28:3", None, False)
    assert tr[0].shape == (5000, 1, 28, 28) and te[0].shape == (1000, 1, 28, 28) and int(tr[1].max()) == 2
    assert not torch.equal(tr[0][:1000], te[0])


def test_tiny_training_on_synthetic_loader_learns():
    torch.manual_seed(0)
    # no augmentation: a linear model on 8x8 images cannot follow +-4 pixel shifts
    data = build_loaders(make_config(dataset="synthetic:1x8x8:4", batch_size=32, eval_batch_size=256, augment=False),
                         "cpu", size=512)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in (1, 2):
        data.train.set_epoch(epoch)
        for xb, yb in data.train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        acc = torch.cat([(model(xb).argmax(1) == yb) for xb, yb in data.test]).float().mean()
    assert acc > 0.8  # chance: 0.25


# -- the Flowers-102 DataLoader path ---------------------------------------------------------------
def x_range_ok(x):
    return x.dtype == torch.float32 and -2.2 < x.min() and x.max() < 2.7  # ImageNet-normalised [0, 1]


def test_flowers_dataloader_path(tmp_path):
    labels = fixtures.write_flowers102(tmp_path, n_per_split=(6, 4, 5))
    cfg = cfg_for(tmp_path, dataset="flowers102", batch_size=4, eval_batch_size=3, num_workers=0, cutout=8)
    data = build_loaders(cfg, "cpu")
    assert data.sizes == {"train": 6, "val": 4, "test": 5} and data.info.num_classes == 102
    data.train.set_epoch(1)
    first = [(x.clone(), y.clone()) for x, y in data.train]
    assert [tuple(x.shape) for x, _ in first] == [(4, 3, 32, 32), (2, 3, 32, 32)] and len(data.train) == 2
    assert sorted(torch.cat([y for _, y in first]).tolist()) == sorted(labels["train"].tolist())
    data.train.set_epoch(1)
    again = list(data.train)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))  # epoch 1 replays exactly
    assert torch.equal(torch.cat([y for _, y in data.test]), labels["test"])
    assert x_range_ok(torch.cat([x for x, _ in data.val]))
    big = build_loaders(cfg, "cpu", image_size=48)
    assert next(iter(big.test))[0].shape == (3, 3, 48, 48) and big.info.image_size == (48, 48)


def test_torchvision_dataset_for_synthetic_gives_pil_images():
    ds = torchvision_dataset("synthetic", None, True, size=10)
    img, label = ds[0]
    assert img.size == (32, 32) and img.mode == "RGB" and 0 <= label < 10


# -- through the Trainer ---------------------------------------------------------------------------
def test_trainer_runs_on_real_format_cifar_files(tmp_path):
    from cifarlab.train import Trainer

    _, (sx, sy) = fixtures.write_cifar10(tmp_path / "data", n_train=60, n_test=20)
    cfg = cfg_for(tmp_path / "data", model="lenet5", epochs=2, batch_size=16, device="cpu", progress="off",
                  run_dir=str(tmp_path / "run"), test_subset=10)
    summary = Trainer(cfg).fit()
    assert summary["finished"] and summary["epochs_completed"] == 2 and summary["train_images"] == 54
    assert summary["dataset"] == "cifar10"
    # the test score is best.pt's on the 10 chosen test images of the files: count it by hand
    t = Trainer(cfg, write=False)
    t._setup()
    t.model.load_state_dict(torch.load(tmp_path / "run/checkpoints/best.pt", weights_only=True)["model"])
    t.model.eval()
    xs, ys = zip(*t.data.test)
    labels = torch.cat(ys)
    assert torch.equal(labels, sy[subset_indices(20, 10)])  # the files' labels, in order
    with torch.no_grad(), t.autocast():
        right = sum(int((t.model(x).argmax(1) == y).sum()) for x, y in zip(xs, ys))
    assert summary["test_acc"] == right / 10
    assert summary["test_error"] == pytest.approx(100 * (1 - right / 10))
