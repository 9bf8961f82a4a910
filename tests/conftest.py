"""Shared test fixtures: tiny datasets written in each real on-disk format, and the real shared data.

The writers are plain functions (importable as `from conftest import write_cub`) so that other test
files can build the same layouts; each returns what a correct loader must find.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR100, Flowers102

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `import common`

# Real data (read-only), from $METALEARN_SHARED_DATA: `make test` sets it from its TEST_DATA variable.
SHARED_DATA = Path(os.environ["METALEARN_SHARED_DATA"]) if os.environ.get("METALEARN_SHARED_DATA") else None

SPLITS = ("train", "val", "test")
MINI_FIXTURE_CLASSES = {"train": 8, "val": 4, "test": 4}
MINI_FIXTURE_PER_CLASS = 25
# Real Omniglot alphabets with their character counts (the loader checks the Vinyals split's totals).
OMNIGLOT_VAL = {"Armenian": 41, "Bengali": 46, "Early_Aramaic": 22, "Hebrew": 22, "Mkhedruli_(Georgian)": 41}
OMNIGLOT_TEST = {"Kannada": 41, "Keble": 26, "Malayalam": 47, "Manipuri": 40, "Mongolian": 30,
                 "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46, "Sylheti": 28, "Syriac_(Serto)": 23,
                 "Tengwar": 25, "Tibetan": 42, "ULOG": 26}
OMNIGLOT_SMALL = {"images_background_small1": {"Balinese": 24, "Early_Aramaic": 22, "Greek": 24, "Korean": 40,
                                                "Latin": 26},
                  "images_background_small2": {"Greek": 24, "Japanese_(katakana)": 47, "Latin": 26, "Sanskrit": 42,
                                               "Tagalog": 17}}


def encode(array: np.ndarray, fmt: str) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> image file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def class_color(c: int) -> np.ndarray:
    """A distinct, JPEG-robust flat RGB colour per class index."""
    return np.array([(37 * c) % 200 + 20, (91 * c) % 200 + 20, (53 * c + 100) % 200 + 20], np.uint8)


def flat_jpeg(c: int, size: tuple[int, int] = (12, 10)) -> bytes:
    return encode(np.broadcast_to(class_color(c), (*size, 3)).copy(), "JPEG")


def wnid(split: str, c: int) -> str:
    return f"n{SPLITS.index(split):02d}{c:06d}"


def write_mini_pickle(folder: Path, split: str, key_type: type = str, val_name: str = "val") -> dict[str, np.ndarray]:
    """mini-imagenet-cache-{split}.pkl with interleaved classes; returns {wnid: its images, in order}."""
    n, per = MINI_FIXTURE_CLASSES[split], MINI_FIXTURE_PER_CLASS
    rng = np.random.default_rng(SPLITS.index(split))
    images = rng.integers(0, 256, (n * per, 84, 84, 3), dtype=np.uint8)
    key = (lambda s: s.encode()) if key_type is bytes else str
    class_dict = {key(wnid(split, c)): list(range(c, n * per, n)) for c in range(n)}  # image i is class i % n
    folder.mkdir(parents=True, exist_ok=True)
    name = val_name if split == "val" else split
    with open(folder / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
        pickle.dump({key("image_data"): images, key("class_dict"): class_dict}, f)
    return {wnid(split, c): images[c::n] for c in range(n)}


def write_mini_csv(folder: Path) -> None:
    """images/*.jpg + {train,val,test}.csv with a filename,label header; class c of a split is class_color(c)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, n in MINI_FIXTURE_CLASSES.items():
        rows = ["filename,label"]
        for i in range(n * MINI_FIXTURE_PER_CLASS):
            c = i % n
            name = f"{wnid(split, c)}{i:08d}.jpg"
            (folder / "images" / name).write_bytes(flat_jpeg(c))
            rows.append(f"{name},{wnid(split, c)}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")


TIERED_FIXTURE_CLASSES = {"train": 6, "val": 3, "test": 3}
TIERED_FIXTURE_PER_CLASS = 3


def write_tiered(folder: Path, python2: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Ren's {split}_images_png.pkl (a list of PNG files' bytes; python2: as his cv2/Python 2 pickles hold them,
    uint8 arrays under bytes keys) and {split}_labels.pkl; classes interleaved. Returns {split: {wnid: images}}."""
    expected = {}
    for split, n in TIERED_FIXTURE_CLASSES.items():
        rng = np.random.default_rng(SPLITS.index(split))
        images = rng.integers(0, 256, (n * TIERED_FIXTURE_PER_CLASS, 84, 84, 3), dtype=np.uint8)
        labels = [i % n for i in range(len(images))]
        pngs = [encode(image, "PNG") for image in images]
        key = (lambda s: s.encode()) if python2 else str
        if python2:
            pngs = [np.frombuffer(p, np.uint8).reshape(-1, 1) for p in pngs]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(pngs, f)
        with open(folder / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({key("label_specific"): np.array(labels), key("label_general"): np.zeros(len(labels), int),
                         key("label_specific_str"): [key(wnid(split, c)) for c in range(n)],
                         key("label_general_str"): [key("n99999999")]}, f)
        expected[split] = {wnid(split, c): images[c::n] for c in range(n)}
    return expected


# CIFAR-100's superclasses and their fine classes (the real data's, both sorted as CIFAR-100 numbers them).
CIFAR_SUPERCLASSES = {
    "aquatic_mammals": "beaver dolphin otter seal whale", "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip", "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe", "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman", "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train", "vehicles_2": "lawn_mower rocket streetcar tank tractor"}
CIFAR_PER_CLASS = {"train": 3, "test": 2}  # per class in each file (the real data: 500 and 100)


def write_cifar100(root: Path) -> dict[str, str]:
    """torchvision's CIFAR100 layout, root/cifar-100-python/{train,test,meta}: latin-1 pickles of flat CHW uint8
    rows with fine and coarse labels (pixel 0 of each image = its fine label). Returns each file's md5."""
    fine = sorted(c for classes in CIFAR_SUPERCLASSES.values() for c in classes.split())
    coarse = sorted(CIFAR_SUPERCLASSES)
    coarse_of = {c: coarse.index(s) for s, classes in CIFAR_SUPERCLASSES.items() for c in classes.split()}
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in CIFAR_PER_CLASS.items():
        labels = [c for c in range(len(fine)) for _ in range(n)][::-1]  # not grouped by class: reversed
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        data[:, 0] = labels
        entry = {"filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": name, "fine_labels": labels,
                 "coarse_labels": [coarse_of[fine[c]] for c in labels], "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse}, f)
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}


def write_flowers102(root: Path, per_class: int = 2) -> dict[str, str]:
    """torchvision's Flowers102 layout, root/flowers-102/{jpg/image_%05d.jpg, imagelabels.mat, setid.mat}: 102
    classes (1-based labels, images interleaved by class), a flat colour per class. Returns the .mat files' md5s."""
    from scipy.io import savemat
    folder = root / "flowers-102"
    (folder / "jpg").mkdir(parents=True)
    labels = [c for _ in range(per_class) for c in range(1, 103)]
    for i, c in enumerate(labels, start=1):
        (folder / "jpg" / f"image_{i:05d}.jpg").write_bytes(flat_jpeg(c, (20, 24)))
    ids = np.arange(1, len(labels) + 1)
    savemat(folder / "imagelabels.mat", {"labels": np.array(labels)[None]})
    savemat(folder / "setid.mat", {"trnid": ids[0::3][None], "valid": ids[1::3][None], "tstid": ids[2::3][None]})
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("imagelabels.mat", "setid.mat")}


def write_mini_folders(folder: Path) -> None:
    """MAML++ layout {train,val,test}/<wnid>/*.jpg; same images as write_mini_csv."""
    for split, n in MINI_FIXTURE_CLASSES.items():
        for i in range(n * MINI_FIXTURE_PER_CLASS):
            c = i % n
            path = folder / split / wnid(split, c) / f"{wnid(split, c)}{i:08d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(flat_jpeg(c))


def cub_class(i: int) -> str:
    return f"{i + 1:03d}.Bird_{i + 1}"


def write_cub(root: Path, classes: int = 8, per_class: int = 3, tgz: bool = False,
              size: tuple[int, int] = (40, 30)) -> Path:
    """CUB_200_2011/ (images.txt, classes.txt, image_class_labels.txt, bounding_boxes.txt, images/NNN.Name/*.jpg),
    or only CUB_200_2011.tgz holding it. Inside its box an image has class_color(c), outside it black."""
    folder = root / "CUB_200_2011"
    lines = {"images.txt": [], "image_class_labels.txt": [], "bounding_boxes.txt": []}
    h, w = size
    box = (w // 4, h // 5, w // 2, h // 2)  # x, y, width, height
    for c in range(classes):
        (folder / "images" / cub_class(c)).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            image_id = c * per_class + k + 1
            image = np.zeros((h, w, 3), np.uint8)
            image[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = class_color(c)
            path = f"{cub_class(c)}/Bird_{c + 1}_{k:04d}.jpg"
            (folder / "images" / path).write_bytes(encode(image, "JPEG"))
            lines["images.txt"].append(f"{image_id} {path}")
            lines["image_class_labels.txt"].append(f"{image_id} {c + 1}")
            lines["bounding_boxes.txt"].append(f"{image_id} {box[0]}.0 {box[1]}.0 {box[2]}.0 {box[3]}.0")
    lines["classes.txt"] = [f"{c + 1} {cub_class(c)}" for c in range(classes)]
    for name, rows in lines.items():
        (folder / name).write_text("\n".join(rows) + "\n")
    if not tgz:
        return folder
    archive = root / "CUB_200_2011.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        (root / "attributes.txt").write_text("1 has_bill_shape::curved\n")  # the real archive has it at top level
        tar.add(root / "attributes.txt", arcname="attributes.txt")
        tar.add(folder, arcname="CUB_200_2011")
    shutil.rmtree(folder)
    (root / "attributes.txt").unlink()
    return archive


def drawing(seed: int) -> bytes:
    """A small black-on-white PNG, like an Omniglot drawing."""
    image = np.full((15, 15), 255, np.uint8)
    image[seed % 11: seed % 11 + 4, 2:13] = 0
    return encode(image, "PNG")


def _write_omniglot_zip(path: Path, top: str, alphabets: dict[str, int], drawings: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for alphabet, characters in alphabets.items():
            for ch in range(1, characters + 1):
                for d in range(drawings):
                    z.writestr(f"{top}/{alphabet}/character{ch:02d}/{ch:04d}_{d + 1:02d}.png", drawing(ch + d))


def write_omniglot(folder: Path, drawings: int = 2) -> None:
    """torchvision layout folder/images_{background,evaluation}.zip with the Vinyals split's character counts:
    real validation/test alphabets (and Gurmukhi, 45 characters), made-up train alphabets filling the totals."""
    train_background = {f"Train_Background_{i:02d}": 44 for i in range(18)}  # 18 * 44 = 792 = 964 - 172
    train_evaluation = {f"Train_Evaluation_{i}": 39 for i in range(5)}  # 5 * 39 + 41 (Gurmukhi) = 236
    _write_omniglot_zip(folder / "images_background.zip", "images_background", {**OMNIGLOT_VAL, **train_background},
                        drawings)
    _write_omniglot_zip(folder / "images_evaluation.zip", "images_evaluation",
                        {**OMNIGLOT_TEST, "Gurmukhi": 45, **train_evaluation}, drawings)


def write_omniglot_small(folder: Path, drawings: int = 1) -> None:
    """images_background_small{1,2}.zip with the real alphabets and character counts (Greek, Latin in both)."""
    for top, alphabets in OMNIGLOT_SMALL.items():
        _write_omniglot_zip(folder / f"{top}.zip", top, alphabets, drawings)


def coded_split(counts: list[int]):
    """A Split whose image pixels encode (class, index within class), to check what a sampler picked."""
    import common
    count = torch.tensor(counts, dtype=torch.int64)
    images = torch.cat([torch.stack([torch.full((n,), c), torch.arange(n)], 1) for c, n in enumerate(counts)])
    images = images.to(torch.uint8).view(-1, 1, 1, 2)  # (N, C=1, H=1, W=2): pixel 0 = class, pixel 1 = index
    return common.Split("coded/train", images, torch.cumsum(count, 0) - count, count,
                        [f"class{c}" for c in range(len(counts))], (0.0,), (1.0 / 255,))


@pytest.fixture
def shared_data() -> Path:
    """The real shared data folder (read-only), or skip."""
    if SHARED_DATA is None or not (SHARED_DATA / "omniglot-small").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set METALEARN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder; the user cache ($XDG_CACHE_HOME) is redirected into tmp_path too."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


@pytest.fixture
def cifar(tmp_path, monkeypatch) -> Path:
    """CIFAR-100 in torchvision's layout under tmp_path/cifar100; torchvision's md5s set to the fixture's."""
    md5 = write_cifar100(tmp_path / "cifar100")
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    return tmp_path


@pytest.fixture
def flowers(tmp_path, monkeypatch) -> Path:
    """Oxford 102 Flowers in torchvision's layout under tmp_path/vggflower; torchvision's md5s the fixture's."""
    md5 = write_flowers102(tmp_path / "vggflower")
    for key, name in (("label", "imagelabels.mat"), ("setid", "setid.mat")):
        monkeypatch.setitem(Flowers102._file_dict, key, (name, md5[name]))
    return tmp_path
