"""Data layer (common.py, issue #2): every on-disk format, splits, caches, downloads, task samplers."""
from __future__ import annotations

import importlib.machinery
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import types
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR100, Flowers102, Omniglot

import common
from common import DataError, EvalTasks, TaskSampler, load_split
from conftest import (CIFAR_PER_CLASS, CIFAR_SUPERCLASSES, MINI_FIXTURE_CLASSES, MINI_FIXTURE_PER_CLASS,
                      TIERED_FIXTURE_CLASSES, TIERED_FIXTURE_PER_CLASS, class_color, coded_split, cub_class,
                      write_cifar100, write_cub, write_flowers102, write_mini_csv, write_mini_folders,
                      write_mini_pickle, write_omniglot, write_omniglot_small, write_tiered)


def files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def load_all(dataset: str, root: Path, cache: Path, **kwargs) -> dict[str, common.Split]:
    return {s: load_split(dataset, s, root, cache_dir=cache, verbose=False, **kwargs) for s in common.SPLITS}


def check_splits(splits: dict[str, common.Split], shape: tuple[int, int, int], classes: dict[str, int]) -> None:
    """Shapes, dtype, grouping bookkeeping, class counts and disjoint splits."""
    for name, split in splits.items():
        assert split.images.dtype == torch.uint8 and split.image_shape == shape
        assert split.classes == classes[name] == len(split.class_names) == len(set(split.class_names))
        assert torch.equal(split.start, torch.cumsum(split.count, 0) - split.count)
        assert int(split.count.sum()) == len(split.images)
    names = [set(s.class_names) for s in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


# ---- MiniImagenet ----

@pytest.mark.parametrize("key_type, val_name", [(str, "val"), (bytes, "validation")])
def test_mini_pickle(tmp_path, cache, key_type, val_name):
    expected = {s: write_mini_pickle(tmp_path / "miniimagenet", s, key_type, val_name) for s in common.SPLITS}
    splits = load_all("miniimagenet", tmp_path, cache)
    check_splits(splits, (3, 84, 84), MINI_FIXTURE_CLASSES)
    for s, split in splits.items():
        assert split.class_names == sorted(expected[s]) and split.mean == common.IMAGENET_MEAN
        for c, name in enumerate(split.class_names):  # exact pixels, regrouped by class, HWC -> CHW
            block = split.images[split.start[c]:split.start[c] + split.count[c]]
            assert torch.equal(block.permute(0, 2, 3, 1), torch.from_numpy(expected[s][name]))


@pytest.mark.parametrize("writer", [write_mini_csv, write_mini_folders])
def test_mini_jpeg_layouts(tmp_path, cache, writer):
    writer(tmp_path)  # directly under the data root
    splits = load_all("miniimagenet", tmp_path, cache)
    check_splits(splits, (3, 84, 84), MINI_FIXTURE_CLASSES)
    for split in splits.values():
        assert split.count.tolist() == [MINI_FIXTURE_PER_CLASS] * split.classes
        colors = split.images.float().mean((2, 3)).view(split.classes, MINI_FIXTURE_PER_CLASS, 3)
        expected = torch.tensor(np.stack([class_color(c) for c in range(split.classes)]), dtype=torch.float32)
        assert (colors - expected[:, None]).abs().max() < 4  # each class block holds that class's images only
    tasks = EvalTasks(splits["val"], 4, 1, 5, 3, seed=0)
    x = next(tasks.batches(3)).x_s
    low = (0 - torch.tensor(common.IMAGENET_MEAN)) / torch.tensor(common.IMAGENET_STD)
    high = (1 - torch.tensor(common.IMAGENET_MEAN)) / torch.tensor(common.IMAGENET_STD)
    assert x.dtype == torch.float32 and (x >= low.view(3, 1, 1) - 1e-6).all() and (x <= high.view(3, 1, 1) + 1e-6).all()


def test_mini_csv_missing_file_and_image(tmp_path, cache):
    write_mini_csv(tmp_path)
    (tmp_path / "val.csv").unlink()
    with pytest.raises(DataError, match=r"val\.csv[\s\S]*--download"):
        load_split("miniimagenet", "val", tmp_path, cache_dir=cache, verbose=False)
    next((tmp_path / "images").glob(f"{common_wnid('test')}*.jpg")).unlink()
    with pytest.raises(DataError, match="1 of 100 listed images are missing"):
        load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)
    assert not files(cache)


def common_wnid(split: str) -> str:
    from conftest import wnid
    return wnid(split, 0)


def test_html_named_like_a_pickle(tmp_path, cache):
    (tmp_path / "mini-imagenet-cache-train.pkl").write_text("<!DOCTYPE html><html><body>Quota exceeded</body></html>")
    with pytest.raises(DataError, match=r"mini-imagenet-cache-train\.pkl is an HTML page.*by hand"):
        load_split("miniimagenet", "train", tmp_path, cache_dir=cache, verbose=False)
    assert not files(cache)


def test_pickle_with_code_is_refused(tmp_path, cache):
    with open(tmp_path / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": os.system, "class_dict": {}}, f)  # would import os.system on load
    with pytest.raises(DataError, match="refusing to load"):
        load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)


# ---- tieredImageNet ----

@pytest.mark.parametrize("python2", [False, True], ids=["png-bytes", "python2-arrays-bytes-keys"])
def test_tiered_pickles(tmp_path, cache, python2):
    expected = write_tiered(tmp_path / "tiered-imagenet", python2)
    splits = load_all("tieredimagenet", tmp_path, cache)
    check_splits(splits, (3, 84, 84), TIERED_FIXTURE_CLASSES)
    for s, split in splits.items():
        assert split.class_names == sorted(expected[s]) and split.mean == common.IMAGENET_MEAN
        for c, name in enumerate(split.class_names):  # PNG is lossless: exact pixels, regrouped by class
            block = split.images[split.start[c]:split.start[c] + split.count[c]]
            assert torch.equal(block.permute(0, 2, 3, 1), torch.from_numpy(expected[s][name]))


def test_tiered_class_folders(tmp_path, cache):
    write_mini_folders(tmp_path / "tiered_imagenet")  # {split}/<wnid>/*.jpg
    check_splits(load_all("tieredimagenet", tmp_path, cache), (3, 84, 84), MINI_FIXTURE_CLASSES)


def test_tiered_faults_are_data_errors(tmp_path, cache, monkeypatch):
    with pytest.raises(DataError, match="tiered_imagenet/train/<wnid>/\\*.jpg"):
        load("tieredimagenet", tmp_path / "none", cache)
    folder = tmp_path / "short" / "tiered-imagenet"
    write_tiered(folder)
    with open(folder / "train_images_png.pkl", "rb") as f:
        pngs = pickle.load(f)
    with open(folder / "train_images_png.pkl", "wb") as f:
        pickle.dump(pngs[:-1], f)
    with pytest.raises(DataError, match="do not match"):
        load("tieredimagenet", tmp_path / "short", cache)
    with open(folder / "train_images_png.pkl", "wb") as f:
        pickle.dump(pngs[:-1] + [b"not a png"], f)
    with pytest.raises(DataError, match=r"train_images_png.pkl \(image \d+\)"):
        load("tieredimagenet", tmp_path / "short", cache)
    with open(folder / "train_labels.pkl", "wb") as f:
        pickle.dump({"labels": [0]}, f)
    with pytest.raises(DataError, match="'label_specific'"):
        load("tieredimagenet", tmp_path / "short", cache)

    def download(file_id, root, filename):  # a mirror serving a tar of a small tiered-imagenet/
        write_tiered(Path(root) / "staging" / "tiered-imagenet")
        with tarfile.open(Path(root) / filename, "w") as tar:
            tar.add(Path(root) / "staging" / "tiered-imagenet", arcname="tiered-imagenet")
        shutil.rmtree(Path(root) / "staging")
    monkeypatch.setattr(common, "download_file_from_google_drive", download)
    gdown = types.ModuleType("gdown")  # installed, as far as the check before a download sees
    gdown.__spec__ = importlib.machinery.ModuleSpec("gdown", None)
    monkeypatch.setitem(sys.modules, "gdown", gdown)
    with pytest.raises(DataError, match="6 train classes, expected 351"):  # the content check of a download
        common.load_split("tieredimagenet", "train", tmp_path / "dl", download=True, cache_dir=cache, verbose=False)
    assert not (tmp_path / "dl" / common.TIERED_ARCHIVE).exists()


# ---- CIFAR-FS, FC100, VGG Flower (torchvision's layouts and checks) ----

def test_cifarfs_and_fc100_split_cifar100_by_class_and_by_superclass(cifar, cache):
    fine = sorted(c for classes in CIFAR_SUPERCLASSES.values() for c in classes.split())
    superclass = {c: s for s, classes in CIFAR_SUPERCLASSES.items() for c in classes.split()}
    per_class = sum(CIFAR_PER_CLASS.values())  # train and test files together, as the real 600
    for dataset, classes in common.CIFAR_CLASSES.items():
        splits = load_all(dataset, cifar, cache)
        check_splits(splits, (3, 32, 32), classes)
        assert set().union(*(s.class_names for s in splits.values())) == set(fine)  # all 100, each once
        for name, split in splits.items():
            assert split.class_names == sorted(split.class_names)  # CIFAR-100's label order
            assert split.count.tolist() == [per_class] * split.classes and split.mean == common.IMAGENET_MEAN
            for c, class_name in enumerate(split.class_names):  # pixel 0 of each image: its fine label
                block = split.images[split.start[c]:split.start[c] + split.count[c]]
                assert (block[:, 0, 0, 0] == fine.index(class_name)).all()
        test = (common.CIFAR_FS_CLASSES["test"] if dataset == "cifarfs" else
                [c for c in fine if superclass[c] in common.FC100_SUPERCLASSES["test"]])
        assert splits["test"].class_names == sorted(test)
    fc100 = load_all("fc100", cifar, cache)
    assert len({superclass[c] for c in fc100["train"].class_names}) == 12  # whole superclasses, none shared
    assert not {superclass[c] for c in fc100["train"].class_names} & {superclass[c] for c in fc100["val"].class_names}


def test_cifar_faults_are_data_errors(tmp_path, cifar, cache, monkeypatch):
    with pytest.raises(DataError, match="cifar100/cifar-100-python/train"):
        load("cifarfs", tmp_path / "none", cache)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", "0" * 32]])  # the real md5s: the fixture fails them
    with pytest.raises(DataError, match="torchvision's CIFAR100 check failed"):
        load("fc100", cifar, cache)
    def download(self):  # no network: what torchvision's download raises
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(CIFAR100, "download", download)
    with pytest.raises(DataError, match="could not get CIFAR100 into .*no route to host"):
        common.load_split("cifarfs", "train", tmp_path / "dl", download=True, cache_dir=cache, verbose=False)
    monkeypatch.setattr(CIFAR100, "download", lambda self: write_cifar100(Path(self.root)))  # the fixture's md5s
    monkeypatch.setattr(CIFAR100, "train_list", [["train", write_cifar100(tmp_path / "again")["train"]]])
    split = common.load_split("fc100", "val", tmp_path / "dl2", download=True, cache_dir=cache, verbose=False)
    assert split.classes == 20 and (tmp_path / "dl2" / "cifar100" / "cifar-100-python" / "meta").is_file()


def test_vggflower_is_meta_datasets_class_split_at_32px(flowers, cache):
    splits = load_all("vggflower", flowers, cache)
    check_splits(splits, (3, 32, 32), {"train": 71, "val": 15, "test": 16})
    ids = {name: [int(n[:3]) for n in split.class_names] for name, split in splits.items()}
    assert ids["val"] == list(common.FLOWERS_CLASSES["val"]) and ids["test"] == list(common.FLOWERS_CLASSES["test"])
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == list(range(1, 103))
    assert splits["test"].class_names[0] == "005.english marigold"  # torchvision's names
    for name, split in splits.items():
        assert split.count.tolist() == [2] * split.classes
        for c, class_id in enumerate(ids[name]):  # a flat JPEG colour per class survives the 32x32 resize
            block = split.images[split.start[c]:split.start[c] + split.count[c]].int()
            assert (block - torch.from_numpy(class_color(class_id)).int().view(1, 3, 1, 1)).abs().max() <= 8


def test_vggflower_faults_are_data_errors(tmp_path, flowers, cache, monkeypatch):
    with pytest.raises(DataError, match="vggflower/flowers-102/imagelabels.mat"):
        load("vggflower", tmp_path / "none", cache)
    (flowers / "vggflower" / "flowers-102" / "jpg" / "image_00007.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="image_00007.jpg"):
        load_all("vggflower", flowers, cache)
    (flowers / "vggflower" / "flowers-102" / "jpg" / "image_00007.jpg").unlink()
    with pytest.raises(DataError, match="missing, e.g. jpg/image_00007.jpg"):
        load_all("vggflower", flowers, cache)
    monkeypatch.setitem(Flowers102._file_dict, "label", ("imagelabels.mat", "0" * 32))
    with pytest.raises(DataError, match="torchvision's Flowers102 check failed"):
        load("vggflower", flowers, cache)


# ---- CUB ----

def test_cub_folder_tgz_and_bbox(tmp_path, cache):
    write_cub(tmp_path / "folder")
    write_cub(tmp_path / "archive", tgz=True)
    folder, archive = load_all("cub", tmp_path / "folder", cache), load_all("cub", tmp_path / "archive", cache)
    check_splits(folder, (3, 84, 84), {"train": 4, "val": 2, "test": 2})  # Chen rule on 8 classes
    for s in common.SPLITS:
        assert torch.equal(folder[s].images, archive[s].images) and folder[s].class_names == archive[s].class_names
    assert folder["val"].class_names == [cub_class(1), cub_class(5)]
    assert folder["test"].class_names == [cub_class(3), cub_class(7)]
    cropped = load_all("cub", tmp_path / "archive", cache, bbox_crop=True)
    for s in common.SPLITS:  # the crop keeps only the class-coloured box; uncropped images are mostly black
        assert cropped[s].image_shape == (3, 84, 84)
        colors = torch.tensor(np.stack([class_color(int(n[:3]) - 1) for n in cropped[s].class_names]),
                              dtype=torch.float32)
        mean = cropped[s].images.float().mean((2, 3)).view(cropped[s].classes, -1, 3).mean(1)
        assert (mean - colors).abs().max() < 12
        assert folder[s].images.float().mean() < 0.5 * cropped[s].images.float().mean()
    assert len(list(cache.rglob("*.pt"))) == 9  # 3 splits x (folder, archive, archive + bbox): distinct cache files


def test_cub_chen_split_200_classes(tmp_path, cache):
    write_cub(tmp_path, classes=200, per_class=1, size=(6, 6))
    splits = load_all("cub", tmp_path, cache)
    check_splits(splits, (3, 84, 84), {"train": 100, "val": 50, "test": 50})
    names = [cub_class(i) for i in range(200)]  # already in sorted order
    assert splits["train"].class_names == names[0::2]
    assert splits["val"].class_names == names[1::4]
    assert splits["test"].class_names == names[3::4]


def test_cub_wrong_checksum_download(tmp_path, cache, monkeypatch):
    urls = []

    def fake_download(url, root, filename):  # a mirror serving the wrong bytes
        urls.append(url)
        Path(root, filename).write_bytes(b"\x1f\x8b not the CUB archive")

    monkeypatch.setattr(common, "download_url", fake_download)
    with pytest.raises(DataError, match=rf"CUB_200_2011\.tgz[\s\S]*expected {common.CUB_MD5}[\s\S]*by hand"):
        load_split("cub", "train", tmp_path, download=True, cache_dir=cache, verbose=False)
    assert urls == list(common.CUB_URLS)
    assert not files(tmp_path)  # no archive, no .part, no cache


def test_mini_download_html_and_wrong_content(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(common, "download_url",
                        lambda url, root, filename: Path(root, filename).write_text("<html>sign in</html>"))
    with pytest.raises(DataError, match=r"HTML page[\s\S]*zenodo[\s\S]*dropbox"):
        load_split("miniimagenet", "val", tmp_path, download=True, cache_dir=cache, verbose=False)
    tiny = tmp_path / "tiny"
    write_mini_pickle(tiny, "val")  # a real pickle, but 4 classes x 25 images instead of 16 x 600
    monkeypatch.setattr(common, "download_url", lambda url, root, filename:
                        shutil.copy(tiny / "mini-imagenet-cache-val.pkl", Path(root, filename)))
    with pytest.raises(DataError, match=r"4 classes with \[25\] images, expected 16 x 600"):
        load_split("miniimagenet", "val", tmp_path, download=True, cache_dir=cache, verbose=False)
    assert not list((tmp_path / "miniimagenet").iterdir()) and not files(cache)


def test_omniglot_download_uses_torchvision_url_and_md5(tmp_path, cache, monkeypatch):
    urls = []
    monkeypatch.setattr(common, "download_url", lambda url, root, filename: (
        urls.append(url), Path(root, filename).write_bytes(b"PK not a zip")))
    with pytest.raises(DataError, match=Omniglot.zips_md5["images_background"]):
        load_split("omniglot", "val", tmp_path, download=True, cache_dir=cache, verbose=False)
    assert urls == [f"{Omniglot.download_url_prefix}/images_background.zip"]


# ---- Omniglot ----

def test_omniglot_vinyals_split(tmp_path, cache):
    write_omniglot(tmp_path / "omniglot-py")
    splits = load_all("omniglot", tmp_path, cache)
    check_splits(splits, (1, 28, 28), {"train": 4 * 1028, "val": 4 * 172, "test": 4 * 423})
    assert {n.split("/")[0] for n in splits["val"].class_names} == {
        "Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"}
    gurmukhi = {s: {n.split("/")[1] for n in split.class_names if n.startswith("Gurmukhi/")}
                for s, split in splits.items()}
    assert gurmukhi["test"] == {f"character{i}" for i in range(42, 46)} and len(gurmukhi["train"]) == 41
    split = splits["test"]
    c = split.class_names.index("Kannada/character01/rot000")
    assert split.class_names[c:c + 4] == [f"Kannada/character01/rot{r:03d}" for r in (0, 90, 180, 270)]
    # 2 drawings per class; the classes are rotations of each other
    first = split.images[split.start[c]:split.start[c] + 8].view(4, 2, 28, 28)
    assert torch.equal(torch.rot90(first[0], 1, (1, 2)), first[1])
    assert torch.equal(torch.rot90(first[0], 2, (1, 2)), first[2])
    assert split.images.float().mean() < 128 and split.images.max() > 200  # white strokes on black
    assert split.mean == (0.0,) and split.std == (1.0,)


def test_omniglot_small_real(shared_data, cache):
    root = shared_data / "omniglot-small"
    before = sorted(p.name for p in root.iterdir())
    splits = load_all("omniglot", root, cache)
    check_splits(splits, (1, 28, 28), {"train": 556, "val": 156, "test": 256})
    for s, split in splits.items():
        assert split.name == f"omniglot-small/{s}" and split.count.tolist() == [20] * split.classes
        assert {n.split("/")[0] for n in split.class_names} == set(common.OMNIGLOT_SMALL_SPLIT[s])
    assert sum(n.startswith("Greek/") for n in splits["train"].class_names) == 4 * 24  # deduplicated
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written into the data folder
    assert len(list(cache.rglob("*.pt"))) == 3


def test_truncated_zip(tmp_path, cache):
    write_omniglot_small(tmp_path)
    zip_path = tmp_path / "images_background_small2.zip"
    zip_path.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images_background_small2\.zip \(BadZipFile.*Delete it"):
        load_split("omniglot", "train", tmp_path, cache_dir=cache, verbose=False)
    assert not files(cache) and not (tmp_path / "xdg").exists()


# ---- caches ----

def test_cache_reused_validated_and_atomic(tmp_path, cache, monkeypatch):
    write_mini_pickle(tmp_path, "test")
    first = load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)
    [cache_file] = cache.rglob("*.pt")
    monkeypatch.setattr(common, "_read_mini_pickle", lambda *a: pytest.fail("cache not used"))
    second = load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)
    assert torch.equal(first.images, second.images) and first.class_names == second.class_names

    payload = torch.load(cache_file, weights_only=True)
    for broken in ({**payload, "images": payload["images"][:, :, :10]},  # wrong shape
                   {**payload, "images": payload["images"].float()},  # wrong dtype
                   {**payload, "count": payload["count"][1:]},  # counts do not match
                   {**payload, "config": {**payload["config"], "image_size": 32}},
                   {k: v for k, v in payload.items() if k != "class_names"}):
        torch.save(broken, cache_file)
        with pytest.raises(DataError, match=rf"{cache_file.name} is invalid .*delete it"):
            load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)
    cache_file.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"unreadable.*delete it"):
        load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)

    cache_file.unlink()
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    class Crash(BaseException):
        pass

    def crashing_save(obj, f):  # a crash half-way through writing
        f.write(b"PK partial")
        raise Crash

    monkeypatch.setattr(common.torch, "save", crashing_save)
    with pytest.raises(Crash):
        load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)
    assert [f.suffix for f in files(cache)] == [".lock"]  # neither the temp file nor a cache that looks valid


def test_read_only_data_root_falls_back(tmp_path, cache, monkeypatch, capsys):
    write_mini_pickle(tmp_path / "data", "val")
    data_dir = tmp_path / "data"
    mkstemp = tempfile.mkstemp

    def read_only(dir=None, **kwargs):  # root ignores permission bits, so simulate a read-only data folder
        if Path(dir) == data_dir:
            raise PermissionError(13, "Read-only file system", str(dir))
        return mkstemp(dir=dir, **kwargs)

    monkeypatch.setattr(common.tempfile, "mkstemp", read_only)
    first = load_split("miniimagenet", "val", data_dir)
    [cached] = (tmp_path / "xdg" / common.CACHE_APP_DIR).rglob("*.pt")
    assert "converting" in capsys.readouterr().out and not list(data_dir.glob("*.pt"))
    second = load_split("miniimagenet", "val", data_dir)
    assert "converting" not in capsys.readouterr().out and torch.equal(first.images, second.images)
    cached.unlink()
    monkeypatch.setattr(common.tempfile, "mkstemp", lambda **kwargs: (_ for _ in ()).throw(PermissionError(13, "ro")))
    third = load_split("miniimagenet", "val", data_dir)  # nowhere writable: warn, never fail
    assert "warning: no writable cache folder" in capsys.readouterr().out and torch.equal(first.images, third.images)


# ---- errors ----

@pytest.mark.parametrize("dataset, looked_for", [
    ("omniglot", r"omniglot-py/images_background\.zip[\s\S]*images_background_small1\.zip"),
    ("miniimagenet", r"miniimagenet/mini-imagenet-cache-validation\.pkl[\s\S]*val\.csv[\s\S]*val/<wnid>"),
    ("cub", r"CUB_200_2011/images\.txt[\s\S]*CUB_200_2011\.tgz")])
def test_missing_data_root(tmp_path, dataset, looked_for):
    with pytest.raises(DataError, match=rf"no data under[\s\S]*{looked_for}[\s\S]*--dataset {dataset} .*--download"):
        load_split(dataset, "val", tmp_path / "nowhere", verbose=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("imagenet", "train", tmp_path)
    with pytest.raises(DataError, match="unknown dataset/split"):
        load_split("synthetic", "validation", tmp_path)
    with pytest.raises(DataError, match="cub dataset only"):
        load_split("miniimagenet", "train", tmp_path, bbox_crop=True)
    split = coded_split([6, 5, 7])
    for kwargs, message in [(dict(ways=4), "3 classes, fewer than ways=4"),
                            (dict(shots=2, queries=4), "shots \\+ queries = 6 .* smallest class has 5"),
                            (dict(shots=0), "shots must be a positive integer"),
                            (dict(queries=-1), "queries must be"), (dict(tasks=0), "tasks must be")]:
        args = dict(ways=2, shots=1, queries=1, tasks=2) | kwargs
        with pytest.raises(DataError, match=message):
            TaskSampler(split, seed=0, **args)
        with pytest.raises(DataError, match=message):
            EvalTasks(split, args["ways"], args["shots"], args["queries"], args["tasks"], seed=0)
    with pytest.raises(DataError, match="batch_size"):
        next(EvalTasks(split, 2, 1, 1, 4, seed=0).batches(0))


# ---- samplers ----

def decode(x: torch.Tensor) -> torch.Tensor:
    """Tasks images of coded_split -> (..., 2) int: (class, index within class)."""
    return x.round().long().flatten(-3)


def test_sampler_tasks_are_valid():
    counts = [3, 7, 4, 10, 5, 6, 3, 8]  # unequal classes: picks must stay inside each class
    split = coded_split(counts)
    ways, shots, queries, tasks = 5, 1, 2, 400
    batch = TaskSampler(split, ways, shots, queries, tasks, seed=1).sample()
    assert batch.x_s.shape == (tasks, ways * shots, 1, 1, 2) and batch.x_q.shape == (tasks, ways * queries, 1, 1, 2)
    assert batch.x_s.dtype == torch.float32 and batch.y_s.dtype == batch.y_q.dtype == torch.int64
    assert batch.y_s.shape == (tasks, ways * shots) and batch.y_q.shape == (tasks, ways * queries)
    support, query = decode(batch.x_s), decode(batch.x_q)  # (tasks, n, 2)
    label_class = torch.full((tasks, ways), -1)
    label_class.scatter_(1, batch.y_s, support[..., 0])
    assert torch.equal(label_class.gather(1, batch.y_s), support[..., 0])  # one class per label ...
    assert torch.equal(label_class.gather(1, batch.y_q), query[..., 0])  # ... the same in support and query
    assert all(len(set(row.tolist())) == ways for row in label_class)  # classes without replacement
    assert (support[..., 1] < torch.tensor(counts)[support[..., 0]]).all()
    assert (query[..., 1] < torch.tensor(counts)[query[..., 0]]).all()
    for t in range(tasks):  # support and query images are distinct images
        s = {tuple(p) for p in support[t].tolist()}
        q = {tuple(p) for p in query[t].tolist()}
        assert not s & q and len(q) == ways * queries
    for c in range(len(counts)):  # random label permutation: every class gets every label
        assert set(batch.y_s[support[..., 0] == c].tolist()) == set(range(ways))
    assert set(label_class.flatten().tolist()) == set(range(len(counts)))


def test_smallest_class_fully_used():
    split = coded_split([3, 9, 9])
    batch = EvalTasks(split, 3, 1, 2, 50, seed=0)
    for tasks in batch.batches(50):
        both = torch.cat([decode(tasks.x_s), decode(tasks.x_q)], 1)
        assert all(sorted(p[1] for p in row.tolist() if p[0] == 0) == [0, 1, 2] for row in both)


def test_eval_tasks_fixed_and_independent_of_global_rng():
    split = coded_split([20] * 10)
    torch.manual_seed(123)
    reference = [t.x_q for t in EvalTasks(split, 5, 1, 3, 600, seed=7).batches(64)]
    torch.manual_seed(999)
    torch.rand(10)
    rng_state = torch.get_rng_state()
    tasks = EvalTasks(split, 5, 1, 3, 600, seed=7)
    assert len(tasks) == 600
    for _ in range(2):  # identical every call, whatever the batch size
        assert torch.equal(torch.cat([t.x_q for t in tasks.batches(64)]), torch.cat(reference))
        assert torch.equal(torch.cat([t.x_q for t in tasks.batches(600)]), torch.cat(reference))
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG was not touched
    other = torch.cat([t.x_q for t in EvalTasks(split, 5, 1, 3, 600, seed=8).batches(600)])
    assert not torch.equal(other, torch.cat(reference))


def test_training_sampler_seed_and_state():
    split = coded_split([12] * 8)
    a, b = TaskSampler(split, 5, 2, 3, 4, seed=3), TaskSampler(split, 5, 2, 3, 4, seed=3)
    torch.manual_seed(0)
    first = a.sample()
    torch.manual_seed(1)
    assert all(torch.equal(u, v) for u, v in zip(first, b.sample()))  # same seed, global RNG irrelevant
    state = a.state_dict()
    rng_state = torch.get_rng_state()
    expected = [a.sample() for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), rng_state)
    c = TaskSampler(split, 5, 2, 3, 4, seed=42)
    c.load_state_dict(state)
    for e in expected:  # a restored checkpoint continues with the same tasks
        assert all(torch.equal(u, v) for u, v in zip(e, c.sample()))
    assert not torch.equal(expected[0].x_s, expected[1].x_s)
    d = TaskSampler(split, 5, 2, 3, 4, seed=42)
    assert d.load_state_dict({"generator": state["generator"]}) is None  # a checkpoint made before "device"
    assert all(torch.equal(u, v) for u, v in zip(expected[0], d.sample()))


PHILOX_STATE_BYTES = 16  # a CUDA generator's state: seed and offset


@pytest.mark.parametrize("saved_device", ["cuda", None])  # None: a checkpoint made before "device" was saved
def test_a_sampler_state_from_another_kind_of_device_starts_a_new_reproducible_stream(saved_device):
    """--device may change on --resume; a CUDA generator's state cannot go into a CPU generator."""
    split = coded_split([12] * 8)
    uninterrupted = TaskSampler(split, 5, 2, 3, 4, seed=3)
    for _ in range(2):
        uninterrupted.sample()
    state = {"generator": torch.zeros(PHILOX_STATE_BYTES, dtype=torch.uint8), "draws": 2}
    if saved_device:
        state["device"] = saved_device
    resumed, again = TaskSampler(split, 5, 2, 3, 4, seed=3), TaskSampler(split, 5, 2, 3, 4, seed=3)
    note = resumed.load_state_dict(state)
    assert note.startswith(f"the run sampled its training tasks on {saved_device or 'another kind of device'} "
                           "and this session on cpu") and "the 2 batches drawn" in note
    assert again.load_state_dict(state) == note
    batch = resumed.sample()
    assert all(torch.equal(u, v) for u, v in zip(batch, again.sample()))  # the same resume, the same tasks
    assert not torch.equal(batch.x_s, uninterrupted.sample().x_s)  # but not the first device's stream
    assert resumed.state_dict()["draws"] == 3 and resumed.state_dict()["device"] == "cpu"


# ---- synthetic ----

def test_synthetic_deterministic_disjoint_learnable():
    kwargs = dict(synthetic_shape=(3, 16, 12), synthetic_classes=(6, 5, 4), synthetic_per_class=10, verbose=False)
    splits = {s: load_split("synthetic", s, seed=0, **kwargs) for s in common.SPLITS}
    check_splits(splits, (3, 16, 12), {"train": 6, "val": 5, "test": 4})
    assert torch.equal(splits["val"].images, load_split("synthetic", "val", seed=0, **kwargs).images)
    assert not torch.equal(splits["val"].images, load_split("synthetic", "val", seed=1, **kwargs).images)
    means = {s: split.images.float().view(split.classes, 10, -1).mean(1) for s, split in splits.items()}
    spread = torch.pdist(splits["val"].images[:10].float().flatten(1)).mean()
    assert torch.cdist(means["train"], means["val"]).min() > 3 * spread / 10
    tasks = next(EvalTasks(splits["val"], 5, 1, 5, 100, seed=0).batches(100))  # nearest-prototype classifier
    logits = -torch.cdist(tasks.x_q.flatten(2), tasks.x_s.flatten(2))  # 1 shot: support images are the prototypes
    accuracy = (tasks.y_s.gather(1, logits.argmax(2)) == tasks.y_q).float().mean()
    assert accuracy > 0.9


def load(dataset, root, cache, split="train"):
    return common.load_split(dataset, split, root, cache_dir=cache, verbose=False)


def test_malformed_content_is_a_data_error_naming_the_file(tmp_path, cache):
    """Content in the right place but of the wrong form: a DataError saying what was expected, never a traceback."""
    write_mini_csv(tmp_path / "bom")  # a BOM before the header is accepted
    csv_path = tmp_path / "bom" / "train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert load("miniimagenet", tmp_path / "bom", cache).classes == MINI_FIXTURE_CLASSES["train"]
    write_mini_csv(tmp_path / "short")
    (tmp_path / "short" / "train.csv").write_text("filename,label\nn0000000000000000.jpg\n")  # a row of one field
    with pytest.raises(common.DataError, match="'filename,label' header"):
        load("miniimagenet", tmp_path / "short", cache)
    write_mini_csv(tmp_path / "latin1")
    (tmp_path / "latin1" / "train.csv").write_bytes(b"filename,label\n\xe9t\xe9.jpg,x\n")
    with pytest.raises(common.DataError, match="not UTF-8"):
        load("miniimagenet", tmp_path / "latin1", cache)
    (tmp_path / "empty" / "train").mkdir(parents=True)  # MAML++ layout without class folders
    with pytest.raises(common.DataError, match="no class folders"):
        load("miniimagenet", tmp_path / "empty", cache)
    import pickle
    folder = tmp_path / "pickle"
    folder.mkdir()
    images = np.zeros((4, 84, 84, 3), np.uint8)
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": images, "class_dict": {"n01": "0123"}}, f)  # indices as a string
    with pytest.raises(common.DataError, match="class_dict is not"):
        load("miniimagenet", folder, cache)


def test_malformed_cub_text_files_and_empty_boxes(tmp_path, cache):
    folder = write_cub(tmp_path / "short")
    (folder / "images.txt").write_text("1\n")
    with pytest.raises(common.DataError, match="images.txt should list"):
        load("cub", tmp_path / "short", cache)
    folder = write_cub(tmp_path / "boxes")
    lines = (folder / "bounding_boxes.txt").read_text().splitlines()
    (folder / "bounding_boxes.txt").write_text("\n".join([lines[0].rsplit(" ", 2)[0] + " 0.0 5.0"] + lines[1:]))
    with pytest.raises(common.DataError, match="bounding box of .* is empty"):
        common.load_split("cub", "train", tmp_path / "boxes", cache_dir=cache, bbox_crop=True, verbose=False)


def test_cub_boxes_outside_the_image_are_clipped_or_refused(tmp_path, cache):
    """A box reaching past the image is clipped to it (the same crop as the box inside it); one wholly outside it,
    or an image without a box, is a DataError."""
    inside, past = write_cub(tmp_path / "inside"), write_cub(tmp_path / "past")
    lines = (past / "bounding_boxes.txt").read_text().splitlines()  # 30 wide, 40 high; box x 7 y 8 w 15 h 20
    image_id, x, y, w, h = lines[0].split()
    (past / "bounding_boxes.txt").write_text("\n".join([f"{image_id} -{x} -{y} {float(w) + 2 * float(x)} "
                                                          f"{float(h) + 2 * float(y)}"] + lines[1:]))
    (inside / "bounding_boxes.txt").write_text("\n".join([f"{image_id} 0.0 0.0 {float(w) + float(x)} "
                                                            f"{float(h) + float(y)}"] + lines[1:]))
    clipped, expected = (common.load_split("cub", "train", tmp_path / name, cache_dir=cache, bbox_crop=True,
                                           verbose=False) for name in ("past", "inside"))
    assert torch.equal(clipped.images, expected.images)
    (past / "bounding_boxes.txt").write_text("\n".join([f"{image_id} 100.0 100.0 5.0 5.0"] + lines[1:]))
    with pytest.raises(common.DataError, match="lies outside the 30x40 image"):  # image 1: class 0, train
        common.load_split("cub", "train", tmp_path / "past", cache_dir=tmp_path / "other", bbox_crop=True,
                          verbose=False)
    (past / "bounding_boxes.txt").write_text("\n".join(lines[1:]))
    with pytest.raises(common.DataError, match="no box for"):
        common.load_split("cub", "train", tmp_path / "past", cache_dir=tmp_path / "third", bbox_crop=True,
                          verbose=False)


def test_mini_pickle_with_mixed_bytes_and_str_keys(tmp_path, cache):
    expected = write_mini_pickle(tmp_path, "test")
    with open(tmp_path / "mini-imagenet-cache-test.pkl", "rb") as f:
        data = pickle.load(f)
    class_dict = {(k.encode() if i % 2 else k): v for i, (k, v) in enumerate(data["class_dict"].items())}
    with open(tmp_path / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({b"image_data": data["image_data"], "class_dict": class_dict}, f)
    split = load("miniimagenet", tmp_path, cache, "test")
    assert split.class_names == sorted(expected)


def test_a_cache_conversion_killed_mid_write_leaves_nothing_behind_next_time(tmp_path, cache):
    write_mini_pickle(tmp_path, "test")
    folder = common._cache_dirs(tmp_path, cache)[0]
    folder.mkdir(parents=True)
    name = f"miniimagenet-test-84px.cache-v{common.CACHE_VERSION}.pt"
    (folder / f"{name}x1y2.tmp").write_bytes(b"half a cache")  # what a kill inside atomic_write leaves
    split = common.load_split("miniimagenet", "test", tmp_path, cache_dir=cache, verbose=False)
    assert split.classes == MINI_FIXTURE_CLASSES["test"] and (folder / name).is_file()
    assert not list(folder.glob("*.tmp"))


# ---- malformed content: a DataError saying what was expected, never a traceback, a MemoryError or a hang ----

def rewrite_tiered(folder: Path, mutate, split: str = "train") -> None:
    """Ren's pickles of write_tiered, rewritten as mutate(labels dict, PNG list) -> (labels, PNGs) gives them."""
    with open(folder / f"{split}_labels.pkl", "rb") as f:
        labels = pickle.load(f)
    with open(folder / f"{split}_images_png.pkl", "rb") as f:
        pngs = pickle.load(f)
    labels, pngs = mutate(labels, pngs)
    with open(folder / f"{split}_labels.pkl", "wb") as f:
        pickle.dump(labels, f)
    with open(folder / f"{split}_images_png.pkl", "wb") as f:
        pickle.dump(pngs, f)


HUGE_LABEL = 10 ** 12  # a class index whose per-class list or bincount would need terabytes


@pytest.mark.parametrize("with_names", [True, False])
def test_tiered_huge_label_is_checked_before_anything_per_class_is_allocated(tmp_path, cache, with_names):
    write_tiered(tmp_path / "tiered-imagenet")

    def huge(labels, pngs):
        label = np.array(labels["label_specific"])
        label[-1] = HUGE_LABEL
        return ({"label_specific": label, "label_specific_str": labels["label_specific_str"]} if with_names
                else {"label_specific": label}), pngs
    rewrite_tiered(tmp_path / "tiered-imagenet", huge)
    # the bound: the class names' count, else the images' (each class has an image)
    bound = TIERED_FIXTURE_CLASSES["train"] * (1 if with_names else TIERED_FIXTURE_PER_CLASS)
    with pytest.raises(DataError, match=rf"train_labels\.pkl: label_specific .*{HUGE_LABEL}.* \[0, {bound}\)"):
        load("tieredimagenet", tmp_path, cache)
    assert not files(cache)


def test_data_root_with_non_utf8_bytes_works(shared_data, tmp_path, cache):
    root = tmp_path / os.fsdecode(b"omniglot\xff")  # a folder name that is no UTF-8 text, holding the real zips
    root.mkdir()
    for name in common.OMNIGLOT_SMALL_ZIPS:  # links to the files: the folder itself is what resolve() keeps
        (root / f"{name}.zip").symlink_to(shared_data / "omniglot-small" / f"{name}.zip")
    split = load_split("omniglot", "val", root, cache_dir=cache, verbose=False)
    assert split.classes == 4 * common.OMNIGLOT_CHARACTERS["omniglot-small"]["val"]
    assert len(list(cache.rglob("*.pt"))) == 1
    assert torch.equal(load_split("omniglot", "val", root, cache_dir=cache, verbose=False).images, split.images)


@pytest.mark.parametrize("split", ["val", "test"])
def test_cub_split_without_classes(tmp_path, cache, split):
    folder = write_cub(tmp_path)
    lines = (folder / "images.txt").read_text().splitlines()
    (folder / "images.txt").write_text("\n".join(l for l in lines if f" {cub_class(0)}/" in l) + "\n")  # train only
    with pytest.raises(DataError, match=rf"images\.txt lists 1 class folder.* no {split} class"):
        load("cub", tmp_path, cache, split)


def test_omniglot_character_folder_not_named_characterNN(tmp_path, cache):
    write_omniglot(tmp_path / "omniglot-py", drawings=1)
    with zipfile.ZipFile(tmp_path / "omniglot-py" / "images_evaluation.zip", "a") as z:
        z.writestr("images_evaluation/Gurmukhi/character45b/0045_01.png", b"")
    with pytest.raises(DataError, match=r"images_evaluation/Gurmukhi/character45b/0045_01\.png.*characterNN"):
        load("omniglot", tmp_path, cache, "test")


def dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f)


@pytest.mark.parametrize("where", ["tiered labels", "mini top level", "mini class_dict"])
def test_non_utf8_bytes_keys_name_the_file(tmp_path, cache, where):
    if where == "tiered labels":
        write_tiered(tmp_path / "tiered-imagenet")
        rewrite_tiered(tmp_path / "tiered-imagenet", lambda labels, pngs: ({**labels, b"\xff": 0}, pngs))
        dataset, name = "tieredimagenet", "train_labels.pkl"
    else:
        images, key = np.zeros((2, 84, 84, 3), np.uint8), b"\xff"
        dump(tmp_path / "mini-imagenet-cache-train.pkl", {"image_data": images, "class_dict": {"n01": [0, 1]}, key: 0}
             if where == "mini top level" else {"image_data": images, "class_dict": {key: [0, 1]}})
        dataset, name = "miniimagenet", "mini-imagenet-cache-train.pkl"
    with pytest.raises(DataError, match=rf"{name}: the name b'\\xff' is not UTF-8 text"):
        load(dataset, tmp_path, cache)


MINI_IMAGES = np.zeros((10, 84, 84, 3), np.uint8)


@pytest.mark.parametrize("class_dict, message", [
    ({"a": [], "b": []}, r"class a holds float64 of shape \(0,\)"),
    ({"a": [0.5, 1.7]}, "class a holds float64"),
    ({"a": [True, False]}, "class a holds bool"),
    ({"a": [10 ** 30]}, "class a holds object"),
    ({"a": [0, 1], "b": [1, 2]}, "each image listed once"),
    ({"a": [0, 0]}, "each image listed once"),
    ({5: [0, 1]}, "expected a name .*int 5"),
    ({"a": [0], b"a": [1]}, "class a listed twice")],
    ids=["empty", "floats", "bools", "huge", "shared", "repeated", "int-key", "str-and-bytes-key"])
def test_malformed_mini_pickle_content(tmp_path, cache, class_dict, message):
    dump(tmp_path / "mini-imagenet-cache-train.pkl", {"image_data": MINI_IMAGES, "class_dict": class_dict})
    with pytest.raises(DataError, match=rf"mini-imagenet-cache-train\.pkl: .*{message}"):
        load("miniimagenet", tmp_path, cache)


@pytest.mark.parametrize("mutate, message", [
    (lambda lab, png: ({**lab, "label_specific": lab["label_specific"] + 0.5}, png), "label_specific .*float64"),
    (lambda lab, png: ({**lab, "label_specific": [10 ** 30] * len(png)}, png), "label_specific .*object"),
    (lambda lab, png: ({**lab, "label_specific_str": "abcdef"}, png), "label_specific_str .*str"),
    (lambda lab, png: ({**lab, "label_specific_str": list(range(6))}, png), "expected a name .*int 0"),
    (lambda lab, png: ({**lab, "label_specific_str": ["n01"] * 6}, png), "class n01 twice"),
    (lambda lab, png: (lab, [np.frombuffer(p, np.uint8).astype(float) for p in png]), r"\(image \d+\): .*float64")],
    ids=["float-labels", "huge-labels", "names-a-str", "int-names", "repeated-names", "float-pngs"])
def test_malformed_tiered_content(tmp_path, cache, mutate, message):
    write_tiered(tmp_path / "tiered-imagenet")
    rewrite_tiered(tmp_path / "tiered-imagenet", mutate)
    with pytest.raises(DataError, match=rf"train_(labels|images_png)\.pkl.*{message}"):
        load("tieredimagenet", tmp_path, cache)


@pytest.mark.parametrize("edit", [lambda rows: [rows[0], rows[1].split(",")[0] + ",", *rows[2:]],
                                  lambda rows: [rows[0], "," + rows[1].split(",")[1], *rows[2:]],
                                  lambda rows: [*rows, rows[1] + ",extra"], lambda rows: [*rows, rows[1]]],
                         ids=["no-label", "no-filename", "three-fields", "repeated-row"])
def test_malformed_mini_csv_rows(tmp_path, cache, edit):
    write_mini_csv(tmp_path)
    rows = (tmp_path / "train.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(edit(rows)) + "\n")
    with pytest.raises(DataError, match=r"train\.csv: .*one row per image"):
        load("miniimagenet", tmp_path, cache)


@pytest.mark.parametrize("edit, message", [
    (lambda lines: [*lines, lines[0]], "id 1 twice"),
    (lambda lines: [*lines, f"1 {lines[1].split()[1]}"], "id 1 twice"),
    (lambda lines: [*lines, f"999 {lines[0].split()[1]}"], r"image 001\.Bird_1/Bird_1_0000\.jpg twice"),
    (lambda lines: [f"x{lines[0]}", *lines[1:]], "should list '<id> <class>/<file>.jpg'"),
    (lambda lines: ["1 Bird_1_0000.jpg", *lines[1:]], "should list '<id> <class>/<file>.jpg'")],
    ids=["repeated-line", "repeated-id", "repeated-path", "id-not-a-number", "no-class-folder"])
def test_malformed_cub_images_txt(tmp_path, cache, edit, message):
    folder = write_cub(tmp_path)
    (folder / "images.txt").write_text("\n".join(edit((folder / "images.txt").read_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=message):
        load("cub", tmp_path, cache)


def test_cub_infinite_box_is_a_data_error(tmp_path, cache):
    folder = write_cub(tmp_path)
    lines = (folder / "bounding_boxes.txt").read_text().splitlines()
    (folder / "bounding_boxes.txt").write_text("\n".join([lines[0].split()[0] + " inf 0 5 5", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match="bounding_boxes.txt should list"):
        common.load_split("cub", "train", tmp_path, cache_dir=cache, bbox_crop=True, verbose=False)


@pytest.mark.parametrize("argv0, program", [("/home/u/metalearn/cml.py", "cml"), ("lwdgh.py", "lwdgh"),
                                            ("/usr/bin/pytest", "<file>")])
def test_missing_data_names_the_running_program(tmp_path, monkeypatch, argv0, program):
    monkeypatch.setattr(common.sys, "argv", [argv0, "--dataset", "cub"])
    with pytest.raises(DataError, match=rf"e\.g\. python {program}\.py --dataset cub"):
        load_split("cub", "val", tmp_path / "nowhere", verbose=False)


def test_tiered_download_without_gdown(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(common.sys.modules, "gdown", None)  # not installed: `import gdown` fails
    monkeypatch.setattr(common, "download_file_from_google_drive", lambda *a, **k: pytest.fail("gdown is missing"))
    with pytest.raises(DataError, match=rf"needs the gdown package.*pip install gdown.*by hand: .*"
                                        rf"{common.TIERED_GDRIVE_ID}"):
        common.load_split("tieredimagenet", "train", tmp_path / "dl", download=True, cache_dir=cache, verbose=False)
    assert not (tmp_path / "dl").exists()
