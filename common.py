"""Shared plumbing of maml_gs.py, metasgd_gs.py, mamlpp_gs.py, cml.py and lwdgh.py; each algorithm lives in its file,
whose main() parses its Args and, inside `with common.Run(...)`, meta-trains with the outer Adam, meta-validates every
epoch on a fixed task set and meta-tests the top-5 checkpoints' ensemble. Sections, and what algorithm files use:
  Files: atomic_write (a crash leaves the old file or the new one, never half), for data caches and run files.
  Data: load_split (zip/tgz/pickle/jpg -> uint8 Split, cached), fingerprint, TaskSampler, EvalTasks; files get Tasks.
    Regression: the generated sinusoid family (sinusoid_tasks, SinusoidSampler, SinusoidEvalTasks).
  Model: pure Conv4/ResNet-12/MLP (FORWARD, init_backbone, conv*, mlp*), split_adapted, forward_tasks, support_grads,
    task_loss (cross-entropy; regression: squared error), query_loss, score (accuracy; regression: MSE).
  Arguments: Args (the shared flags; each file subclasses it) and parse_args (checks, --help's groups; --resume:
    resumed_args, which checks config.json's types).
  Evaluation: evaluate (an ensemble's per-task scores) and mean_ci, used by Run; Score (accuracy or MSE: its name
    in the files, which way is better).
  Run directory and checkpoints: write_json, write_csv, append_csv and repair_csv, load_checkpoint, used by Run.
  Run: StepResult, and the plumbing main calls: load_data, restore, epochs, iterations, accept, validate, meta_test.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import platform
import reprlib
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import typing
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from torchvision.datasets import CIFAR100, Flowers102, Omniglot
from torchvision.datasets.utils import calculate_md5, download_file_from_google_drive, download_url

# ---- Files ----
def atomic_write(path: Path, write: Callable[[typing.BinaryIO], None]) -> None:
    """write(f) into a temp file beside path, fsync, rename: a crash leaves the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; caches and checkpoints are for reading
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---- Data ----
REGRESSION = ("sinusoid",)  # generated regression task families: no files, a network of points (--backbone mlp)
REGRESSION_DEFAULTS = {"backbone": "mlp", "ways": 1}  # what the image defaults become for them
REGRESSION_OUTPUTS = 1  # the MLP's prediction per point
IMAGE_ONLY = ("adapt_bn", "bbox_crop", "filters", "resnet_width", "synthetic_shape")  # refused with them
DATASETS = ("omniglot", "miniimagenet", "tieredimagenet", "cub", "cifarfs", "fc100", "vggflower", "synthetic")
SPLITS = ("train", "val", "test")
PROGRAMS = ("maml_gs", "metasgd_gs", "mamlpp_gs", "cml", "lwdgh")  # the algorithm files, named in hints
CACHE_VERSION = 1
CACHE_APP_DIR = "metalearn-gs"  # subfolder of $XDG_CACHE_HOME (or ~/.cache) for read-only data roots
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SIZE = 84  # MiniImagenet and CUB
RESAMPLE = Image.Resampling.LANCZOS  # anti-aliased downscaling, as in MAML's own resizing script
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error, Image.DecompressionBombError)
DOCS = "docs/datasets.md"

OMNIGLOT_SIZE, OMNIGLOT_ROTATIONS = 28, 4  # rotations: each multiple of 90 degrees a new class (Santoro et al. 2016)
OMNIGLOT_DIRS = ("omniglot-py", "omniglot-small", "")  # torchvision's layout, the subsets' folder, the root itself
OMNIGLOT_ZIPS = tuple(Omniglot.zips_md5)  # ("images_background", "images_evaluation")
OMNIGLOT_SMALL_ZIPS = ("images_background_small1", "images_background_small2")
# Vinyals et al. (2016) split, as listed by torchmeta (assets/omniglot/*.json) and protonets:
# validation = 5 background alphabets, test = 12 evaluation alphabets + Gurmukhi characters 42-45.
OMNIGLOT_VAL_ALPHABETS = frozenset({"Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"})
OMNIGLOT_TEST_ALPHABETS = frozenset(
    {"Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)", "Oriya",
     "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG"})
OMNIGLOT_GURMUKHI_FIRST_TEST = 42
# Our split of the small subsets' 8 alphabets (characters per alphabet in brackets); Early_Aramaic: val in Vinyals' too.
OMNIGLOT_SMALL_SPLIT = {
    "train": ("Greek", "Japanese_(katakana)", "Latin", "Sanskrit"),  # 24 + 47 + 26 + 42
    "val": ("Early_Aramaic", "Tagalog"),  # 22 + 17
    "test": ("Balinese", "Korean"),  # 24 + 40
}
OMNIGLOT_CHARACTERS = {"omniglot": {"train": 1028, "val": 172, "test": 423},
                       "omniglot-small": {"train": 139, "val": 39, "test": 64}}

MINI_DIRS, MINI_PICKLE = ("miniimagenet", "mini_imagenet_full_size", ""), "mini-imagenet-cache-{}.pkl"
MINI_PICKLE_SPLITS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
MINI_CLASSES, MINI_PER_CLASS = {"train": 64, "val": 16, "test": 20}, 600
# learn2learn's mirrors. They publish no md5 we could verify, so a download is checked by content
# instead: a pickle (not an HTML page) holding MINI_CLASSES[split] classes x 600 images of 84x84x3.
MINI_URLS = {
    "train": ("https://zenodo.org/record/7978538/files/mini-imagenet-cache-train.pkl",
              "https://www.dropbox.com/s/9g8c6w345s2ek03/mini-imagenet-cache-train.pkl?dl=1"),
    "val": ("https://zenodo.org/record/7978538/files/mini-imagenet-cache-validation.pkl",
            "https://www.dropbox.com/s/ip1b7se3gij3r1b/mini-imagenet-cache-validation.pkl?dl=1"),
    "test": ("https://zenodo.org/record/7978538/files/mini-imagenet-cache-test.pkl",
             "https://www.dropbox.com/s/ye9jeb5tyz0x01b/mini-imagenet-cache-test.pkl?dl=1"),
}

# tieredImageNet (Ren et al. 2018, arXiv 1803.00676): 351 / 97 / 160 classes of 84×84 images. Ren's pickles
# ({split}_images_png.pkl: a list of PNG files' bytes; {split}_labels.pkl: {"label_specific": class per image,
# "label_specific_str": class names, ...}), as learn2learn and MetaOptNet read them, or {split}/<wnid>/*.jpg.
TIERED_DIRS, TIERED_CLASSES = ("tiered-imagenet", "tiered_imagenet", ""), {"train": 351, "val": 97, "test": 160}
TIERED_GDRIVE_ID = "1g1aIDy2Ar_MViF2gDXFYDBTR-HYecV07"  # learn2learn's mirror of Ren's tar (12 GB; no md5 published)
TIERED_ARCHIVE = "tiered_imagenet.tar"

CUB_DIRS, CUB_FOLDER, CUB_ARCHIVE = ("cub", ""), "CUB_200_2011", "CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"
CUB_URLS = ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
            "http://www.vision.caltech.edu/visipedia-data/CUB-200-2011/CUB_200_2011.tgz")

# CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018): CIFAR-100's 600 images per class (its train
# and test sets) split by class / by superclass, 32x32, as torchmeta's assets cifar100/cifar-fs/{val,test}.json and
# cifar100/fc100/{val,test}.json (tristandeleu/pytorch-meta: the copy JJongyn/CML runs); every other class trains.
CIFAR_DIRS = ("cifar100", "")  # torchvision's CIFAR100 root, holding cifar-100-python/
CIFAR_SIZE = 32
CIFAR_FS_CLASSES = {
    "val": ("beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
            "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor"),
    "test": ("whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
             "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket")}
FC100_SUPERCLASSES = {"val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
                              "small_mammals"), "test": ("aquatic_mammals", "insects", "medium_mammals", "people")}
CIFAR_CLASSES = {"cifarfs": {"train": 64, "val": 16, "test": 20}, "fc100": {"train": 60, "val": 20, "test": 20}}
# VGG Flower (Oxford 102 Flowers), Meta-Dataset's class split (Triantafillou et al. 2020), as the torchmeta
# vgg_flower.py of CML's code base and learn2learn's vgg_flowers.py: imagelabels.mat's 1-based ids; the other 71
# train. 32x32 as that vgg_flower.py resizes them (CML's maml/utils.py: a 2x2 Conv4 head input, wh_size 2).
FLOWERS_DIRS = ("vggflower", "")  # torchvision's Flowers102 root, holding flowers-102/
FLOWERS_BASE, FLOWERS_FILES = "flowers-102", ("jpg", "imagelabels.mat", "setid.mat")  # torchvision's layout
FLOWERS_SIZE = 32
FLOWERS_CLASSES = {"val": (10, 16, 17, 23, 26, 47, 53, 56, 57, 62, 82, 83, 86, 97, 102),
                   "test": (5, 9, 15, 19, 35, 40, 41, 42, 45, 46, 65, 85, 89, 94, 96, 98)}

SYNTHETIC_GRID = 4  # prototypes are random GRIDxGRID fields upsampled to HxW: smooth, distinct per class
SYNTHETIC_DEFORM = 0.25  # amplitude of a per-image smooth deformation of the prototype (same construction)
SYNTHETIC_NOISE_STD = 0.1  # per-pixel noise


class DataError(Exception):
    """Data missing, damaged or not usable as asked; the message says what was expected and how to fix it."""


@dataclass
class Split:
    """One split in memory: uint8 images grouped by class, class c = images[start[c]:start[c] + count[c]]."""
    name: str  # e.g. "miniimagenet/train", "omniglot-small/val"
    images: torch.Tensor  # (N, C, H, W) uint8
    start: torch.Tensor  # (classes,) int64
    count: torch.Tensor  # (classes,) int64
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, applied after /255
    std: tuple[float, ...]
    source: str = "generated"  # the folder it was read from

    @property
    def classes(self) -> int:
        return len(self.count)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device: torch.device | str) -> Split:
        """The same split with its tensors on `device`."""
        return replace(self, images=self.images.to(device), start=self.start.to(device), count=self.count.to(device))


FINGERPRINT_BYTES = 2 ** 22  # bytes of a split's images a fingerprint hashes, evenly strided: cheap at any size


def fingerprint(split: Split) -> dict:
    """What tells a split's data from other data (another variant, another copy, another conversion): its name, counts,
    image shape and a hash of its class sizes and of a strided sample of its pixels. A run records it; --resume
    refuses other data."""
    flat = split.images.reshape(-1)
    sample = flat[::max(1, flat.numel() // FINGERPRINT_BYTES)].cpu().numpy()
    digest = hashlib.sha1(split.count.cpu().numpy().astype("<i8").tobytes() + sample.tobytes()).hexdigest()
    return {"name": split.name, "classes": split.classes, "images": len(split.images),
            "shape": list(split.image_shape), "sha1": digest[:16]}


class _Source(NamedTuple):
    variant: str  # "omniglot", "omniglot-small", "miniimagenet", "tieredimagenet", "cub", "cifarfs", ...
    directory: Path  # where the data lives; its cache goes here unless read-only
    shape: tuple[int, int, int]  # (C, H, W) of the converted images
    build: Callable[[], tuple[np.ndarray, list[int], list[str]]]  # -> (N, H, W, C) uint8, counts, names


def load_split(dataset: str, split: str, data_root: str | Path = "data", *, download: bool = False,
               cache_dir: str | Path | None = None, bbox_crop: bool = False,
               synthetic_shape: tuple[int, int, int] = (3, 84, 84),
               synthetic_classes: tuple[int, int, int] = (64, 16, 20), synthetic_per_class: int = 30,
               seed: int = 0, verbose: bool = True) -> Split:
    """Load one split on the CPU, cached as uint8 on first use in `cache_dir`/<hash of the data folder>/ if given,
    else next to the data, else (read-only) in $XDG_CACHE_HOME/metalearn-gs/<same hash>/. `seed`: synthetic only."""
    if dataset not in DATASETS or split not in SPLITS:
        raise DataError(f"unknown dataset/split {dataset}/{split}: expected one of {DATASETS} / {SPLITS}")
    if bbox_crop and dataset != "cub":
        raise DataError("bbox_crop applies to the cub dataset only")
    if dataset == "synthetic":
        return _synthetic(split, synthetic_shape, synthetic_classes, synthetic_per_class, seed)
    root = Path(data_root).expanduser()
    locate = {"omniglot": _locate_omniglot, "miniimagenet": _locate_mini, "tieredimagenet": _locate_tiered,
              "cub": _locate_cub, "cifarfs": _locate_cifar, "fc100": _locate_cifar, "vggflower": _locate_flowers}
    locate = functools.partial(locate[dataset], variant=dataset) if dataset in CIFAR_CLASSES else locate[dataset]
    try:
        source = locate(root, split, download, bbox_crop)
    except PermissionError as e:  # a data folder that cannot be listed or entered
        raise _damaged(Path(e.filename or root), e) from e
    config = {"dataset": source.variant, "split": split, "image_size": source.shape[1], "bbox_crop": bbox_crop}
    file_name = f"{source.variant}-{split}-{source.shape[1]}px{'-bbox' if bbox_crop else ''}.cache-v{CACHE_VERSION}.pt"
    dirs = _cache_dirs(source.directory, cache_dir)
    cached = next((d / file_name for d in dirs if (d / file_name).is_file()), None)
    if cached is not None:
        images, count, names = _load_cache(cached, config, source.shape)
    else:
        if verbose:
            print(f"converting {source.variant}/{split} from {source.directory} (first use only) ...", flush=True)
        hwc, counts, names = source.build()
        if min(counts) < 1:
            raise DataError(f"{source.directory}: class {names[counts.index(0)]} of {split} has no images")
        images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        count = torch.tensor(counts, dtype=torch.int64)
        payload = {"version": CACHE_VERSION, "config": config, "images": images, "count": count, "class_names": names}
        written = _save_cache(payload, dirs, file_name)
        if verbose:
            print(f"cached {tuple(images.shape)} to {written}" if written else
                  f"warning: no writable cache folder among {[str(d) for d in dirs]}; converting again next time")
    imagenet = dataset not in ("omniglot", "synthetic")  # natural RGB images: ImageNet's channel statistics
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else ((0.0,) * images.shape[1], (1.0,) * images.shape[1])
    return Split(f"{source.variant}/{split}", images, torch.cumsum(count, 0) - count, count, names, mean, std,
                 str(source.directory))


# -- caches --
def _cache_dirs(data_dir: Path, cache_dir: str | Path | None) -> list[Path]:
    """Folders to look for / write a cache in, in order of preference."""
    # Away from the data, one subfolder per data folder, so that two copies of a dataset never share a cache.
    # Its bytes, as the OS has them: a name that is no UTF-8 text (b"\xff") hashes too, and UTF-8 ones as before.
    subfolder = hashlib.sha1(os.fsencode(data_dir.resolve())).hexdigest()[:12]
    if cache_dir is not None:
        return [Path(cache_dir).expanduser() / subfolder]
    return [data_dir, Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_APP_DIR / subfolder]


def _save_cache(payload: dict, dirs: list[Path], file_name: str) -> Path | None:
    """Write atomically to the first writable folder: a crash leaves no valid-looking cache. The writer holds the
    folder's lock for this cache, so this cache's temp files it finds there are a killed writer's: they go first."""
    for folder in dirs:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{file_name}.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process writing the same cache: wait for it
                for leftover in folder.glob(f"{file_name}*.tmp"):
                    leftover.unlink()
                atomic_write(folder / file_name, lambda f: torch.save(payload, f))
            return folder / file_name
        except (OSError, RuntimeError):  # read-only, or disk full (torch's writer raises RuntimeError): next folder
            continue
    return None


def _load_cache(path: Path, config: dict, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read and validate a cache; any inconsistency is a DataError telling to delete the file."""
    def fail(what: str) -> DataError:
        return DataError(f"cache {path} is invalid ({what}); delete it to rebuild it from the original data")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises several unrelated types
        raise fail(f"unreadable: {e}") from e
    if not isinstance(payload, dict) or set(payload) != {"version", "config", "images", "count", "class_names"}:
        raise fail("unexpected keys")
    if payload["version"] != CACHE_VERSION or payload["config"] != config:
        raise fail(f"built by version {payload['version']} from {payload['config']}, expected {config}")
    images, count, names = payload["images"], payload["count"], payload["class_names"]
    if not (isinstance(images, torch.Tensor) and isinstance(count, torch.Tensor) and isinstance(names, list)):
        raise fail("wrong types")
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise fail(f"images {images.dtype} {tuple(images.shape)}, expected uint8 (N, {', '.join(map(str, shape))})")
    if count.dtype != torch.int64 or count.ndim != 1 or len(count) != len(names) or (count < 1).any() \
            or int(count.sum()) != len(images):
        raise fail("class counts do not match the images")
    return images, count, names


# -- reading files from folders and archives --
def _iter_files(source: Path, prefix: str, wanted: dict | set) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the files prefix + name, name in `wanted`, present in a folder, .zip or .tar(.gz)."""
    with contextlib.ExitStack() as stack:
        if source.is_dir():
            pairs = ((n, (source / prefix / n).read_bytes()) for n in wanted if (source / prefix / n).is_file())
        elif source.suffix == ".zip":
            z = stack.enter_context(zipfile.ZipFile(source))
            pairs = ((i.filename[len(prefix):], z.read(i)) for i in z.infolist()
                     if i.filename.startswith(prefix) and i.filename[len(prefix):] in wanted)
        else:  # stream the tar once in archive order: seeking back in a .tgz re-decompresses from its start
            tar = stack.enter_context(tarfile.open(source, "r|*"))
            pairs = ((m.name[len(prefix):], tar.extractfile(m).read()) for m in tar
                     if m.isfile() and m.name.startswith(prefix) and m.name[len(prefix):] in wanted)
        remaining = len(wanted)
        for pair in pairs:
            yield pair
            remaining -= 1
            if remaining == 0:  # stop early: the rest of a .tgz need not be decompressed
                return


def _damaged(path: Path, error: Exception) -> DataError:
    if isinstance(error, PermissionError):
        return DataError(f"could not read {path}: permission denied; make it readable (chmod) or copy the data "
                         f"to a folder you can read, and point --data-root there")
    return DataError(f"could not read {path} ({type(error).__name__}: {error}): the file is damaged or "
                     f"incomplete. Delete it and download it again (see {DOCS}).")


def _decode_into(out: np.ndarray, source: Path, prefix: str, rows: dict[str, int], mode: str,
                 boxes: dict[str, tuple[int, int, int, int]] | None = None) -> None:
    """Decode each image `name` of `rows` into out[rows[name]] (H, W, C): optional crop box, then resize to H x W."""
    done = set()
    try:
        for name, data in _iter_files(source, prefix, rows):
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image = image.convert(mode)
                    if boxes is not None:
                        image = image.crop(_clip_box(boxes[name], image.size, source / prefix / name))
                    out[rows[name]] = np.asarray(image.resize(out.shape[2:0:-1], RESAMPLE)).reshape(out.shape[1:])
            except READ_ERRORS as e:  # a damaged image: name it
                raise _damaged(source / prefix / name, e) from e
            done.add(name)
    except READ_ERRORS as e:  # a damaged archive
        raise _damaged(source, e) from e
    if len(done) != len(rows):
        missing = sorted(set(rows) - done)
        raise DataError(f"{source}: {len(missing)} of {len(rows)} listed images are missing, e.g. "
                        f"{prefix}{missing[0]}; the data is incomplete (see {DOCS})")


def _clip_box(box: tuple[int, int, int, int], size: tuple[int, int], path: Path) -> tuple[int, int, int, int]:
    """A (left, upper, right, lower) box clipped to the image (PIL would pad black outside it); none left: error."""
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], size[0]), min(box[3], size[1])
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{path}: its bounding box {box} lies outside the {size[0]}x{size[1]} image; "
                        f"fix bounding_boxes.txt")
    return x0, y0, x1, y1


def _decode_groups(source: Path, prefix: str, groups: list[tuple[str, list[str]]], size: int,
                   boxes: dict | None = None) -> tuple[np.ndarray, list[int], list[str]]:
    """RGB images of classes [(class name, [file names])] -> (N, size, size, 3) uint8, counts, names."""
    files = [f for _, members in groups for f in members]
    out = np.empty((len(files), size, size, 3), np.uint8)
    _decode_into(out, source, prefix, {f: i for i, f in enumerate(files)}, "RGB", boxes)
    return out, [len(members) for _, members in groups], [name for name, _ in groups]


def _reject_html(path: Path, expected: str, how: str) -> None:
    """A 'download' that is a web page (quota notice, login page) gets a clear error, not an unpickling one."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip()
    if head.startswith(b"<"):  # no pickle, zip or gzip starts with "<"; HTML and XML pages do
        raise DataError(f"{path} is an HTML page, not {expected}: the download link served a web page. "
                        f"Delete it and get the file by hand: {how}")


def _download(urls: tuple[str, ...], dest: Path, expected: str, how: str, md5: str | None = None,
              check: Callable[[Path], object] | None = None) -> None:
    """Try each mirror into dest.part; keep it (os.replace to dest) only if it passes md5 or the content check."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part, errors = dest.with_name(dest.name + ".part"), []
    for url in urls:
        part.unlink(missing_ok=True)
        try:
            download_url(url, str(part.parent), part.name)
            _reject_html(part, expected, how)
            if md5 is not None and (digest := calculate_md5(str(part))) != md5:
                raise DataError(f"md5 {digest}, expected {md5}")
            if check is not None:
                check(part)
            os.replace(part, dest)
            return
        except (DataError, OSError, RuntimeError) as e:  # URLError and HTTPError are OSErrors
            errors.append(f"  {url}: {e}")
        finally:
            part.unlink(missing_ok=True)
    raise DataError(f"could not download {dest.name} ({expected}):\n" + "\n".join(errors) +
                    f"\nGet it by hand: {how}, and put it at {dest}")


NEEDED = {"miniimagenet": f"all three splits' files: {', '.join(MINI_PICKLE.format(s) for s in SPLITS)} (or "
                          f"train/val/test.csv with images/, or train/val/test/<wnid>/*.jpg)",
          "tieredimagenet": "all three splits' files: {train,val,test}_images_png.pkl and {train,val,test}_labels.pkl "
                            "(or train/val/test/<wnid>/*.jpg)"}  # named at once, not found missing one run at a time


def _missing(dataset: str, split: str, root: Path, looked_for: list[Path]) -> DataError:
    program = Path(sys.argv[0]).stem if sys.argv and Path(sys.argv[0]).stem in PROGRAMS else "<file>"
    return DataError(f"{dataset}/{split}: no data under {root}. Looked for any of:\n" +
                     "\n".join(f"  {p}" for p in looked_for) +
                     (f"\nA run needs {NEEDED[dataset]}." if dataset in NEEDED else "") +
                     f"\nDownload it with --download, e.g. python {program}.py --dataset {dataset} "
                     f"--data-root {root} --download, or see {DOCS}.")


def _find(root: Path, dirs: tuple[str, ...], names: list[str], looked_for: list[Path]) -> Path | None:
    """First folder root/d holding all `names`; records every path tried in `looked_for`."""
    for d in dirs:
        paths = [root / d / n for n in names]
        looked_for.extend(paths)
        if all(p.exists() for p in paths):
            return root / d
    return None


# -- datasets --
def _locate_omniglot(root: Path, split: str, download: bool, _bbox: bool) -> _Source:
    full_zips, small_zips = [f"{z}.zip" for z in OMNIGLOT_ZIPS], [f"{z}.zip" for z in OMNIGLOT_SMALL_ZIPS]
    looked_for = []
    folder = _find(root, OMNIGLOT_DIRS, full_zips, looked_for)
    small_folder = None if folder is not None else _find(root, OMNIGLOT_DIRS, small_zips, looked_for)
    if folder is None and small_folder is None and download:
        folder = root / OMNIGLOT_DIRS[0]
        for z in OMNIGLOT_ZIPS:  # torchvision's own URL and md5s
            if not (folder / f"{z}.zip").exists():
                _download((f"{Omniglot.download_url_prefix}/{z}.zip",), folder / f"{z}.zip", f"Omniglot {z}.zip",
                          f"download {Omniglot.download_url_prefix}/{z}.zip", md5=Omniglot.zips_md5[z])
    if folder is not None:
        zips, variant = OMNIGLOT_ZIPS, "omniglot"
    elif small_folder is not None:
        folder, zips, variant = small_folder, OMNIGLOT_SMALL_ZIPS, "omniglot-small"
    else:
        raise _missing("omniglot", split, root, looked_for)
    return _Source(variant, folder, (1, OMNIGLOT_SIZE, OMNIGLOT_SIZE), lambda: _build_omniglot(
        [folder / f"{z}.zip" for z in zips], [f"{z}/" for z in zips], variant, split))


def _omniglot_split(variant: str, alphabet: str, character: str) -> str | None:
    if variant == "omniglot-small":
        return next((s for s, alphabets in OMNIGLOT_SMALL_SPLIT.items() if alphabet in alphabets), None)
    if alphabet in OMNIGLOT_VAL_ALPHABETS:
        return "val"
    if alphabet in OMNIGLOT_TEST_ALPHABETS or (
            alphabet == "Gurmukhi" and int(character.removeprefix("character")) >= OMNIGLOT_GURMUKHI_FIRST_TEST):
        return "test"
    return "train"


def _build_omniglot(zips: list[Path], prefixes: list[str], variant: str, split: str):
    """Characters of `split` -> 28x28 white-on-black drawings, each rotation by k*90 degrees its own class."""
    characters: dict[str, list[tuple[int, str]]] = {}  # "Alphabet/characterNN" -> [(zip index, member)]
    seen = set()
    for z, (path, prefix) in enumerate(zip(zips, prefixes)):
        try:
            with zipfile.ZipFile(path) as archive:
                members = sorted(n[len(prefix):] for n in archive.namelist()
                                 if n.startswith(prefix) and n.endswith(".png"))
        except READ_ERRORS as e:
            raise _damaged(path, e) from e
        for member in members:
            if member in seen:  # small1 and small2 share Greek and Latin (identical files): keep one copy
                continue
            seen.add(member)
            if member.count("/") != 2:  # Alphabet/characterNN/file.png under the zip's top folder
                raise DataError(f"{path}: member {prefix}{member} is not at the depth of Omniglot's "
                                f"<alphabet>/<character>/<drawing>.png; delete the zip and download it again")
            alphabet, character, _ = member.split("/")
            number = character.removeprefix("character")  # _omniglot_split reads it; Omniglot's: character01 ..
            if number == character or not (number.isascii() and number.isdigit()):
                raise DataError(f"{path}: member {prefix}{member} is not in a folder named characterNN (e.g. "
                                f"character01) as in Omniglot's zips; delete the zip and download it again")
            if _omniglot_split(variant, alphabet, character) == split:
                characters.setdefault(f"{alphabet}/{character}", []).append((z, member))
    expected = OMNIGLOT_CHARACTERS[variant][split]
    if len(characters) != expected:
        raise DataError(f"{zips}: found {len(characters)} {split} characters, expected {expected}: "
                        f"incomplete or foreign zips; delete them and download them again")
    names = sorted(characters)
    files = [entry for name in names for entry in sorted(characters[name])]
    base = np.empty((len(files), OMNIGLOT_SIZE, OMNIGLOT_SIZE, 1), np.uint8)
    for z, path in enumerate(zips):
        _decode_into(base, path, prefixes[z], {m: i for i, (zz, m) in enumerate(files) if zz == z}, "L")
    base = 255 - base  # strokes 255 on background 0, so that zero padding matches the background
    spans = np.cumsum([0] + [len(characters[n]) for n in names])
    # (characters * rotations * drawings, H, W, 1): each character's drawings once per rotation
    images = np.concatenate([np.rot90(base[a:b], k, axes=(1, 2)) for a, b in zip(spans[:-1], spans[1:])
                             for k in range(OMNIGLOT_ROTATIONS)])
    counts = [int(b - a) for a, b in zip(spans[:-1], spans[1:]) for _ in range(OMNIGLOT_ROTATIONS)]
    return images, counts, [f"{n}/rot{90 * k:03d}" for n in names for k in range(OMNIGLOT_ROTATIONS)]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers and numpy arrays only: a downloaded pickle could otherwise run arbitrary code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, keyed: bool = False):
    """A pickle of containers and arrays (latin1: also reads Python 2's, e.g. Ren's); a damaged one: DataError.
    keyed: a dict with str keys ({} for a pickle of no dict)."""
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except Exception as e:  # a truncated or foreign pickle raises many unrelated types
        raise _damaged(path, e) from e
    return ({_text(k, path): v for k, v in data.items()} if isinstance(data, dict) else {}) if keyed else data


def _text(name: object, path: Path) -> str:
    """A key or class name of a pickle: str, or bytes as UTF-8 (Python 2's str); anything else: a DataError."""
    try:
        if isinstance(name, (str, bytes)):
            return str(name.decode() if isinstance(name, bytes) else name)  # str(): not numpy's str_
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: the name {name!r} is not UTF-8 text ({e.reason}); keys and class names must be "
                        f"str or UTF-8 bytes: the file is damaged or foreign, get it again (see {DOCS})") from e
    raise DataError(f"{path}: expected a name (str or bytes), found {type(name).__name__} {reprlib.repr(name)}; the "
                    f"file is damaged or foreign, get it again (see {DOCS})")


def _twice(names: list) -> object | None:
    """The first name listed a second time, if any."""
    seen = set()
    return next((n for n in names if n in seen or seen.add(n)), None)  # add() returns None: checks, then records


def _read_mini_pickle(path: Path, split: str, strict: bool = False):
    """mini-imagenet-cache-*.pkl: {"image_data": (N, 84, 84, 3) uint8, "class_dict": {wnid: [indices]}}."""
    how = f"download {MINI_URLS[split][0]}"
    _reject_html(path, "a mini-imagenet pickle", how)
    data = _unpickle(path, keyed=True)
    images, class_dict = data.get("image_data"), data.get("class_dict")
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8
            and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and isinstance(class_dict, dict) and class_dict):
        raise DataError(f"{path}: expected a dict with 'image_data' uint8 (N, 84, 84, 3) and 'class_dict' "
                        f"{{wnid: [indices]}}; delete it and get the file by hand: {how}")
    def fail(what: str) -> DataError:
        return DataError(f"{path}: class_dict is not {{wnid: [image indices]}} ({what}); delete it and get the file "
                         f"by hand: {how}")
    try:  # every key a wnid (str or bytes), every value a non-empty flat list of integer image indices
        names = [_text(k, path) for k in class_dict]
        groups = sorted(zip(names, (np.asarray(v) for v in class_dict.values())), key=lambda group: group[0])
    except (ValueError, TypeError) as e:  # ragged lists
        raise fail(str(e)) from e
    if (twice := _twice(names)) is not None:  # a str key and its bytes twin
        raise fail(f"class {twice} listed twice")
    if bad := next(((n, v) for n, v in groups if v.ndim != 1 or v.dtype.kind not in "iu" or not v.size), None):
        raise fail(f"class {bad[0]} holds {bad[1].dtype} of shape {bad[1].shape}, not a list of integers")
    index = np.concatenate([v for _, v in groups])  # int64 and uint64 lists concatenate to float64: checked below
    if index.min() < 0 or index.max() >= len(images) or len(np.unique(index)) < len(index):
        raise fail(f"indices must lie in [0, {len(images)}) of image_data, each image listed once")
    index = index.astype(np.int64)
    counts = [len(v) for _, v in groups]
    if strict and (len(counts), set(counts)) != (MINI_CLASSES[split], {MINI_PER_CLASS}):
        raise DataError(f"{path}: {len(counts)} classes with {sorted(set(counts))} images, expected "
                        f"{MINI_CLASSES[split]} x {MINI_PER_CLASS}")
    return images[index], counts, [name for name, _ in groups]


def _read_mini_csv(folder: Path, split: str):
    """{split}.csv (filename,label) listing images/<filename>."""
    try:
        with open(folder / f"{split}.csv", newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is accepted
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{folder / f'{split}.csv'}: not UTF-8 text ({e})") from e
    # two fields per row (DictReader: None for a missing one, a None key for extra ones), each set, each file once
    bad = next((r for r in rows if len(r) != 2 or not all(v and v.strip() for v in r.values())), None)
    if not rows or set(rows[0]) != {"filename", "label"} or bad is not None:
        raise DataError(f"{folder / f'{split}.csv'}: expected a 'filename,label' header and one row per image, "
                        f"both fields set" + ("" if bad is None else f", found {bad!r}"))
    if (twice := _twice([r["filename"] for r in rows])) is not None:
        raise DataError(f"{folder / f'{split}.csv'}: lists {twice} twice; expected one row per image")
    by_label: dict[str, list[str]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row["filename"])
    return _decode_groups(folder, "images/", sorted(by_label.items()), IMAGE_SIZE)


def _read_class_folders(folder: Path, split: str):
    """{split}/<wnid>/*.jpg (MAML++'s MiniImagenet layout; tieredImageNet's extracted to folders)."""
    classes = sorted(p for p in (folder / split).iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{folder / split}: no class folders <wnid>/*.jpg in it (see {DOCS})")
    groups = [(c.name, sorted(f"{c.name}/{f.name}" for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
              for c in classes]
    return _decode_groups(folder, f"{split}/", groups, IMAGE_SIZE)


def _locate_mini(root: Path, split: str, download: bool, _bbox: bool) -> _Source:
    looked_for, shape = [], (3, IMAGE_SIZE, IMAGE_SIZE)
    for d in MINI_DIRS:
        folder = root / d
        for name in MINI_PICKLE_SPLITS[split]:
            looked_for.append(folder / MINI_PICKLE.format(name))
            if looked_for[-1].is_file():
                return _Source("miniimagenet", folder, shape, lambda p=looked_for[-1]: _read_mini_pickle(p, split))
        looked_for += [folder / f"{split}.csv", folder / "images"]
        if looked_for[-2].is_file() and looked_for[-1].is_dir():
            return _Source("miniimagenet", folder, shape, lambda: _read_mini_csv(folder, split))
        looked_for.append(folder / split / "<wnid>" / "*.jpg")
        if (folder / split).is_dir():
            return _Source("miniimagenet", folder, shape, lambda: _read_class_folders(folder, split))
    if not download:
        raise _missing("miniimagenet", split, root, looked_for)
    path = root / MINI_DIRS[0] / MINI_PICKLE.format(MINI_PICKLE_SPLITS[split][-1])
    _download(MINI_URLS[split], path, f"a pickle of {MINI_CLASSES[split]} classes x {MINI_PER_CLASS} images",
              f"download one of {', '.join(MINI_URLS[split])}",
              check=lambda p: _read_mini_pickle(p, split, strict=True))
    return _Source("miniimagenet", path.parent, shape, lambda: _read_mini_pickle(path, split))


def _locate_tiered(root: Path, split: str, download: bool, _bbox: bool) -> _Source:
    looked_for, shape = [], (3, IMAGE_SIZE, IMAGE_SIZE)
    if (folder := _find(root, TIERED_DIRS, [f"{split}_images_png.pkl", f"{split}_labels.pkl"], looked_for)):
        return _Source("tieredimagenet", folder, shape, lambda: _read_tiered_pickles(folder, split))
    for d in TIERED_DIRS:
        looked_for.append(root / d / split / "<wnid>" / "*.jpg")
        if (root / d / split).is_dir():
            return _Source("tieredimagenet", root / d, shape,
                           lambda folder=root / d: _read_class_folders(folder, split))
    if not download:
        raise _missing("tieredimagenet", split, root, looked_for)
    how = f"download https://drive.google.com/file/d/{TIERED_GDRIVE_ID} and extract it into {root}"
    if importlib.util.find_spec("gdown") is None:  # torchvision's download_file_from_google_drive imports it
        raise DataError(f"tieredImageNet's --download needs the gdown package (not in requirements.txt): "
                        f"pip install gdown, or download by hand: {how}")
    archive = root / TIERED_ARCHIVE
    try:
        root.mkdir(parents=True, exist_ok=True)
        download_file_from_google_drive(TIERED_GDRIVE_ID, str(root), TIERED_ARCHIVE)
        _reject_html(archive, "a tar of tiered-imagenet/", how)
        with tarfile.open(archive) as tar:  # no md5 is published: the class counts check the content below
            tar.extractall(root, filter="data")
    except (OSError, tarfile.TarError, RuntimeError) as e:
        raise DataError(f"could not download tieredImageNet ({e}); get it by hand: {how}") from e
    finally:
        archive.unlink(missing_ok=True)
    folder = root / TIERED_DIRS[0]
    return _Source("tieredimagenet", folder, shape, lambda: _read_tiered_pickles(folder, split, strict=True))


def _read_tiered_pickles(folder: Path, split: str, strict: bool = False):
    """Ren's pickles -> (N, 84, 84, 3) uint8 grouped by class, each PNG decoded straight into its row (the
    training split is about 9.5 GB decoded: the PNG list and this array are the only copies held)."""
    path = folder / f"{split}_labels.pkl"
    labels = _unpickle(path, keyed=True)

    def fail(what: str) -> DataError:
        return DataError(f"{path}: {what}; expected a dict with 'label_specific' (an integer class per image) and "
                         f"'label_specific_str' (the class names, str or bytes): get the file again")
    try:
        label, raw_names = np.asarray(labels["label_specific"]).reshape(-1), labels.get("label_specific_str")
    except (KeyError, ValueError) as e:  # no such key; ragged lists
        raise fail(repr(e)) from e
    if not (raw_names is None or isinstance(raw_names, (list, tuple)) or getattr(raw_names, "ndim", 0) == 1):
        raise fail(f"label_specific_str is a {type(raw_names).__name__}")
    if label.dtype.kind not in "iu" or not label.size:
        raise fail(f"label_specific holds {label.size} {label.dtype} values")
    # Labels in [0, classes), classes <= images, checked before anything per class is allocated (a label of 10**12)
    bound = len(label) if raw_names is None else len(raw_names)
    if label.min() < 0 or label.max() >= bound:
        raise fail(f"label_specific holds labels in [{label.min()}, {label.max()}], expected [0, {bound}) "
                   f"({'the images' if raw_names is None else 'the class names'})")
    names = ([f"class{c:03d}" for c in range(int(label.max()) + 1)] if raw_names is None
             else [_text(n, path) for n in raw_names])
    if (twice := _twice(names)) is not None:
        raise fail(f"label_specific_str lists class {twice} twice")
    counts = np.bincount(label.astype(np.int64), minlength=len(names))
    images = _unpickle(folder / f"{split}_images_png.pkl")
    if not (counts.min() > 0 and isinstance(images, (list, tuple, np.ndarray)) and len(images) == len(label)):
        raise DataError(f"{folder}: {split}_labels.pkl and {split}_images_png.pkl do not match (a label in "
                        f"[0, {len(names)}) for every image, every class with images); get the pair again")
    if strict and len(names) != TIERED_CLASSES[split]:
        raise DataError(f"{folder}: {len(names)} {split} classes, expected {TIERED_CLASSES[split]}")
    out = np.empty((len(label), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for row, i in enumerate(np.argsort(label, kind="stable")):  # class by class, each class in file order
        entry = images[i]
        png = entry.tobytes() if isinstance(entry, np.ndarray) and entry.dtype == np.uint8 else entry
        if not isinstance(png, bytes):
            raise DataError(f"{folder / f'{split}_images_png.pkl'} (image {i}): "
                            f"{getattr(entry, 'dtype', type(entry).__name__)}, expected a PNG file's bytes (or a uint8 "
                            f"array of them): get the file again")
        try:
            with Image.open(io.BytesIO(png)) as image:
                out[row] = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), RESAMPLE))
        except (*READ_ERRORS, TypeError, ValueError) as e:
            raise _damaged(folder / f"{split}_images_png.pkl (image {i})", e) from e
    return out, counts.tolist(), names


def _locate_cub(root: Path, split: str, download: bool, bbox_crop: bool) -> _Source:
    looked_for = []
    if (folder := _find(root, CUB_DIRS, [f"{CUB_FOLDER}/images.txt"], looked_for)) is not None:
        source, prefix = folder / CUB_FOLDER, ""
    elif (folder := _find(root, CUB_DIRS, [CUB_ARCHIVE], looked_for)) is not None:
        source, prefix = folder / CUB_ARCHIVE, f"{CUB_FOLDER}/"
    elif download:
        folder, source, prefix = root / CUB_DIRS[0], root / CUB_DIRS[0] / CUB_ARCHIVE, f"{CUB_FOLDER}/"
        _download(CUB_URLS, source, f"{CUB_ARCHIVE} with md5 {CUB_MD5}", f"download {CUB_URLS[0]}", md5=CUB_MD5)
    else:
        raise _missing("cub", split, root, looked_for)
    return _Source("cub", folder, (3, IMAGE_SIZE, IMAGE_SIZE), lambda: _build_cub(source, prefix, split, bbox_crop))


def _build_cub(source: Path, prefix: str, split: str, bbox_crop: bool):
    """CUB-200-2011 from its folder or .tgz: images.txt ("id path"), bounding_boxes.txt ("id x y w h")."""
    wanted = {"images.txt", "bounding_boxes.txt"} if bbox_crop else {"images.txt"}
    try:
        meta = {name: data.decode().splitlines() for name, data in _iter_files(source, prefix, wanted)}
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: {prefix}images.txt or bounding_boxes.txt is not UTF-8 text ({e})") from e
    except READ_ERRORS as e:
        raise _damaged(source, e) from e
    if set(meta) != wanted:
        raise DataError(f"{source}: missing {prefix}{sorted(wanted - set(meta))[0]}; "
                        f"incomplete CUB-200-2011 (see {DOCS})")
    entries = [line.split() for line in meta["images.txt"] if line.strip()]
    bad = next((" ".join(e) for e in entries if len(e) != 2 or not e[0].isdigit() or len(e[1].split("/")) != 2
                or not all(e[1].split("/"))), None)
    if bad is not None or not entries:
        raise DataError(f"{source}: {prefix}images.txt should list '<id> <class>/<file>.jpg' per line, "
                        f"found {bad!r}" if bad is not None else f"{source}: {prefix}images.txt is empty")
    for what, values in (("id", [i for i, _ in entries]), ("image", [p for _, p in entries])):
        if (twice := _twice(values)) is not None:
            raise DataError(f"{source}: {prefix}images.txt lists {what} {twice} twice; expected each image once, "
                            f"as '<id> <class>/<file>.jpg'")
    paths = dict(entries)  # id -> "NNN.Class/file.jpg"
    by_class: dict[str, list[str]] = {}
    for path in sorted(paths.values()):
        by_class.setdefault(path.split("/")[0], []).append(path)
    # Chen et al. (2019) CUB split of the sorted class folders: 100 train, 50 val, 50 test
    groups = [(c, by_class[c]) for i, c in enumerate(sorted(by_class))
              if ("train" if i % 2 == 0 else "val" if i % 4 == 1 else "test") == split]
    if not groups:
        raise DataError(f"{source}: {prefix}images.txt lists {len(by_class)} class folder(s), which leave no {split} "
                        f"class: of the sorted classes, every 2nd from the 1st trains, every 4th from the 2nd "
                        f"validates, from the 4th tests (CUB-200-2011: 200 classes); list them all (see {DOCS})")
    boxes = None
    if bbox_crop:  # crop before resizing; PIL boxes are (left, upper, right, lower)
        try:
            xywh = {i: [float(v) for v in rest.split()] for i, rest in
                    (line.split(maxsplit=1) for line in meta["bounding_boxes.txt"] if line.strip())}
            boxes = {paths[i]: (round(x), round(y), round(x + w), round(y + h)) for i, (x, y, w, h) in xywh.items()}
        except (ValueError, KeyError, OverflowError) as e:  # OverflowError: round(inf)
            raise DataError(f"{source}: {prefix}bounding_boxes.txt should list '<id> <x> <y> <w> <h>' for the ids "
                            f"of images.txt ({e!r})") from e
        if empty := next((name for name, (x0, y0, x1, y1) in boxes.items() if x1 <= x0 or y1 <= y0), None):
            raise DataError(f"{source}: the bounding box of {empty} is empty; fix bounding_boxes.txt")
        if unboxed := next((f for _, members in groups for f in members if f not in boxes), None):
            raise DataError(f"{source}: {prefix}bounding_boxes.txt has no box for {unboxed}; fix bounding_boxes.txt")
    return _decode_groups(source, prefix + "images/", groups, IMAGE_SIZE, boxes)


def _members(table: dict[str, tuple], split: str, every: list) -> list:
    """The val or test members a split table lists, or for train every member it lists in neither (in order)."""
    if split != "train":
        return list(table[split])
    return [m for m in every if m not in table["val"] and m not in table["test"]]


def _checked(dataset: type, folder: Path, **kw):
    """A torchvision dataset object on folder (its md5 check passed), or the reason it is not, as a DataError."""
    try:
        return dataset(str(folder), **kw)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (an md5 that does not match)
        raise DataError(f"{folder}: torchvision's {dataset.__name__} check failed ({e}): a file is damaged or "
                        f"incomplete; delete it and run again with --download (see {DOCS})") from e
    except ImportError as e:  # Flowers102 reads its .mat files with scipy
        raise DataError(f"torchvision's {dataset.__name__} needs {e.name}: pip install -r requirements.txt") from e
    except OSError as e:  # a download that failed (URLError, HTTPError) or a file that cannot be read
        raise DataError(f"could not get {dataset.__name__} into {folder} ({e}); see {DOCS}") from e


def _locate_cifar(root: Path, split: str, download: bool, _bbox: bool, variant: str = "cifarfs") -> _Source:
    looked_for, files = [], [n for n, _ in CIFAR100.train_list + CIFAR100.test_list] + [CIFAR100.meta["filename"]]
    folder = _find(root, CIFAR_DIRS, [f"{CIFAR100.base_folder}/{n}" for n in files], looked_for)
    if folder is None:
        if not download:
            raise _missing(variant, split, root, looked_for)
        folder = root / CIFAR_DIRS[0]
        _checked(CIFAR100, folder, download=True)  # torchvision's URL and md5
    return _Source(variant, folder, (3, CIFAR_SIZE, CIFAR_SIZE), lambda: _build_cifar(folder, variant, split))


def _build_cifar(folder: Path, variant: str, split: str):
    """CIFAR-100's train and test sets, checked by torchvision, grouped by the split's classes in label order."""
    parts = [_checked(CIFAR100, folder, train=train) for train in (True, False)]
    images, labels = np.concatenate([p.data for p in parts]), np.concatenate([p.targets for p in parts])
    names = parts[0].classes
    if variant == "fc100":  # superclasses: torchvision keeps only the fine labels, its pickles have both
        try:
            with open(folder / CIFAR100.base_folder / CIFAR100.train_list[0][0], "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            with open(folder / CIFAR100.base_folder / CIFAR100.meta["filename"], "rb") as f:
                coarse_names = pickle.load(f, encoding="latin1")["coarse_label_names"]
        except (OSError, pickle.UnpicklingError, KeyError) as e:
            raise _damaged(folder / CIFAR100.base_folder, e) from e
        superclass = dict(zip(entry["fine_labels"], entry["coarse_labels"]))
        wanted = set(_members(FC100_SUPERCLASSES, split, coarse_names))
        classes = [c for c in range(len(names)) if coarse_names[superclass[c]] in wanted]
    else:
        if missing := sorted(set(_members(CIFAR_FS_CLASSES, split, names)) - set(names)):
            raise DataError(f"{folder}: CIFAR-100 without the classes {missing}: not CIFAR-100 (see {DOCS})")
        classes = sorted(names.index(n) for n in _members(CIFAR_FS_CLASSES, split, names))
    if len(classes) != CIFAR_CLASSES[variant][split]:
        raise DataError(f"{folder}: {len(classes)} {variant} {split} classes, expected {CIFAR_CLASSES[variant][split]}")
    groups = [images[labels == c] for c in classes]
    return np.concatenate(groups), [len(g) for g in groups], [names[c] for c in classes]


def _locate_flowers(root: Path, split: str, download: bool, _bbox: bool) -> _Source:
    looked_for = []
    folder = _find(root, FLOWERS_DIRS, [f"{FLOWERS_BASE}/{name}" for name in FLOWERS_FILES], looked_for)
    if folder is None:
        if not download:
            raise _missing("vggflower", split, root, looked_for)
        folder = root / FLOWERS_DIRS[0]
        _checked(Flowers102, folder, download=True)  # torchvision's URLs and md5s
    return _Source("vggflower", folder, (3, FLOWERS_SIZE, FLOWERS_SIZE), lambda: _build_flowers(folder, split))


def _build_flowers(folder: Path, split: str):
    """The split's classes of Oxford 102 Flowers, after torchvision's md5 check of its label files."""
    _checked(Flowers102, folder)
    from scipy.io import loadmat  # torchvision's Flowers102 reads its .mat files so too
    path = folder / FLOWERS_BASE / FLOWERS_FILES[1]
    try:
        labels = loadmat(path, squeeze_me=True)["labels"].tolist()  # label of image_{i:05d}.jpg, i from 1
    except (OSError, ValueError, KeyError) as e:
        raise _damaged(path, e) from e
    ids = _members(FLOWERS_CLASSES, split, list(range(1, len(Flowers102.classes) + 1)))
    groups = [(f"{c:03d}.{Flowers102.classes[c - 1]}",
               [f"image_{i:05d}.jpg" for i, label in enumerate(labels, start=1) if label == c]) for c in ids]
    return _decode_groups(folder / FLOWERS_BASE, f"{FLOWERS_FILES[0]}/", groups, FLOWERS_SIZE)


def _synthetic(split: str, shape: tuple[int, int, int], classes: tuple[int, int, int], per_class: int,
               seed: int) -> Split:
    """Learnable toy data: image = smooth class prototype + smooth per-image deformation + pixel noise."""
    if len(shape) != 3 or min(shape) < 1 or len(classes) != len(SPLITS) or min(classes) < 1 or per_class < 1:
        raise DataError(f"synthetic: shape (C, H, W), classes per split and per_class must be positive, "
                        f"got {shape}, {classes}, {per_class}")
    (c, h, w), n = shape, classes[SPLITS.index(split)]
    # One generator per (seed, split): splits get different prototypes, i.e. disjoint classes.
    g = torch.Generator().manual_seed(seed * len(SPLITS) + SPLITS.index(split))

    def smooth(count: int, scale: float, offset: float) -> torch.Tensor:  # (count, C, H, W)
        grid = torch.rand(count, c, SYNTHETIC_GRID, SYNTHETIC_GRID, generator=g) * scale + offset
        return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)

    prototypes = smooth(n, 1.0, 0.0).repeat_interleave(per_class, 0)  # (n * per_class, C, H, W) in [0, 1]
    images = prototypes + smooth(n * per_class, 2 * SYNTHETIC_DEFORM, -SYNTHETIC_DEFORM) \
        + SYNTHETIC_NOISE_STD * torch.randn(prototypes.shape, generator=g)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    count = torch.full((n,), per_class, dtype=torch.int64)
    return Split(f"synthetic/{split}", images, torch.arange(n) * per_class, count,
                 [f"synthetic/{split}/{i:03d}" for i in range(n)], (0.0,) * c, (1.0,) * c)


# -- task sampling --
class Tasks(NamedTuple):
    """A batch of tasks. Classification: images and labels. Regression (sinusoid): ways = 1, the points x and the
    targets y, (tasks, shots, 1) and (tasks, queries, 1) float32 each."""
    x_s: torch.Tensor  # (tasks, ways*shots, C, H, W) float32, normalised
    y_s: torch.Tensor  # (tasks, ways*shots) int64 in [0, ways)
    x_q: torch.Tensor  # (tasks, ways*queries, C, H, W)
    y_q: torch.Tensor  # (tasks, ways*queries)


@functools.lru_cache
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 1, 1) mean and std on `device`, made once: no host-to-device copy per batch."""
    return (torch.tensor(mean, device=device).view(-1, 1, 1), torch.tensor(std, device=device).view(-1, 1, 1))


def normalize_images(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 (x / 255 - mean) / std, computed on the images' device."""
    m, s = _channel_stats(tuple(mean), tuple(std), images.device)
    return images.float().div_(255).sub_(m).div_(s)


def _check_task_shape(split: Split, ways: int, shots: int, queries: int, tasks: int) -> None:
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries), ("tasks", tasks)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")
    if ways > split.classes:
        raise DataError(f"{split.name} has {split.classes} classes, fewer than ways={ways}: lower --ways")
    smallest = int(split.count.min())
    if shots + queries > smallest:
        raise DataError(f"{split.name}: shots + queries = {shots + queries} images per class, but its smallest "
                        f"class has {smallest}: lower --shots or --queries")


def _sample_indices(start: torch.Tensor, count: torch.Tensor, max_count: int, ways: int, per_class: int,
                    tasks: int, generator: torch.Generator) -> torch.Tensor:
    """(tasks, ways, per_class) image indices, on the generator's device; label of [t, w] is w. The top-k of i.i.d.
    uniform keys is a uniformly random *ordered* subset, so classes come without replacement and in random order (= a
    random label permutation per task), and images of a class are distinct: support (first shots) and query disjoint."""
    device = start.device
    keys = torch.rand(tasks, len(count), generator=generator, device=device)
    classes = keys.topk(ways, dim=1).indices  # (tasks, ways)
    keys = torch.rand(tasks, ways, max_count, generator=generator, device=device)
    beyond = torch.arange(max_count, device=device) >= count[classes].unsqueeze(-1)  # slots past a smaller class
    picks = keys.masked_fill_(beyond, -1.0).topk(per_class, dim=2).indices  # (tasks, ways, per_class)
    return start[classes].unsqueeze(-1) + picks


def _gather_tasks(split: Split, index: torch.Tensor, shots: int) -> Tasks:
    """index (tasks, ways, shots + queries) -> Tasks; support = the first `shots` images of each class."""
    tasks, ways, per_class = index.shape
    x = normalize_images(split.images[index], split.mean, split.std)  # (tasks, ways, per_class, C, H, W)
    y = torch.arange(ways, device=index.device).view(1, ways, 1).expand(tasks, ways, per_class)
    return Tasks(x[:, :, :shots].flatten(1, 2), y[:, :, :shots].flatten(1, 2),
                 x[:, :, shots:].flatten(1, 2), y[:, :, shots:].flatten(1, 2))


class TaskSampler:
    """Training tasks, sampled on split.images.device from the sampler's own generator (global RNG untouched)."""

    def __init__(self, split: Split, ways: int, shots: int, queries: int, tasks: int, seed: int):
        _check_task_shape(split, ways, shots, queries, tasks)
        self.split, self.ways, self.shots, self.queries, self.tasks = split, ways, shots, queries, tasks
        self.max_count, self.seed, self.draws = int(split.count.max()), seed, 0
        self.generator = torch.Generator(device=split.images.device).manual_seed(seed)

    def sample(self) -> Tasks:
        """One batch of `tasks` tasks on the split's device."""
        index = _sample_indices(self.split.start, self.split.count, self.max_count, self.ways,
                                self.shots + self.queries, self.tasks, self.generator)
        self.draws += 1
        return _gather_tasks(self.split, index, self.shots)

    def state_dict(self) -> dict:
        """Generator state, its device type and the batches drawn, for checkpoints."""
        return {"generator": self.generator.get_state(), "device": self.generator.device.type, "draws": self.draws}

    def load_state_dict(self, state: dict) -> str | None:
        """Continue a checkpoint's task stream exactly, or say why not (returned message). A generator's state fits
        only its own kind of device's generator (a CPU's Mersenne Twister, CUDA's Philox), and --device may change on
        --resume: on another kind of device a run continues with a new stream seeded from the seed and the batches
        drawn (the same resume gives the same tasks again); its numbers differ from an uninterrupted run's."""
        self.draws = state.get("draws", 0)
        here, saved = self.generator.device.type, state.get("device")  # None: a checkpoint made before "device"
        if saved in (None, here):
            try:
                self.generator.set_state(state["generator"])
                return None
            except RuntimeError:  # a state of the other kind of generator, from a checkpoint without "device"
                pass
        self.generator.manual_seed(hash((self.seed, self.draws)) % 2 ** 63)  # ints, tuples: hashed alike in every run
        return (f"the run sampled its training tasks on {saved or 'another kind of device'} and this session on "
                f"{here}: a generator's state fits only its own kind of device, so the tasks continue from a new "
                f"stream (seeded from --seed and the {self.draws} batches drawn); the numbers will differ from an "
                f"uninterrupted run's. Resume on {saved or 'the first device'} to continue it exactly.")


class EvalTasks:
    """A fixed task set: indices drawn once on the CPU from `seed`: the same on every device, epoch, run and method."""

    def __init__(self, split: Split, ways: int, shots: int, queries: int, num_tasks: int, seed: int):
        _check_task_shape(split, ways, shots, queries, num_tasks)
        self.split, self.shots = split, shots
        start, count, generator = split.start.cpu(), split.count.cpu(), torch.Generator().manual_seed(seed)
        self.index = _sample_indices(start, count, int(count.max()), ways, shots + queries, num_tasks, generator)

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, batch_size: int) -> Iterator[Tasks]:
        """The tasks in batches of `batch_size` (the last may be smaller), same order every call."""
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        for first in range(0, len(self.index), batch_size):
            index = self.index[first:first + batch_size].to(self.split.images.device)
            yield _gather_tasks(self.split, index, self.shots)


# -- the sinusoid task family (regression) --
# C. Finn, P. Abbeel and S. Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", arXiv
# 1703.03400, Section 5.1: a task is y = A sin(x - φ), its points x drawn anew per task.
SINUSOID_AMPLITUDE = (0.1, 5.0)  # A ~ U[0.1, 5.0]
SINUSOID_PHASE = (0.0, math.pi)  # φ ~ U[0, π]
SINUSOID_X = (-5.0, 5.0)  # x ~ U[-5, 5]
SINUSOID_SHAPE = (1,)  # one input, one output per point
SINUSOID_STREAMS = {"train": 0, "val": 1, "test": 2}  # the fixed task sets' streams, each its own from --eval-seed
SINUSOID = {"name": "sinusoid", "amplitude": list(SINUSOID_AMPLITUDE), "phase": list(SINUSOID_PHASE),
            "x": list(SINUSOID_X)}  # a run's record of its task family (config.json, checkpoints: as fingerprint)


def _uniform(bounds: tuple[float, float], shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def sinusoid_tasks(tasks: int, shots: int, queries: int, generator: torch.Generator) -> Tasks:
    """`tasks` sinusoids y = A sin(x - φ), each with its own `shots` support and `queries` query points, drawn on the
    generator's device: x_s, y_s (tasks, shots, 1), x_q, y_q (tasks, queries, 1), float32."""
    amplitude = _uniform(SINUSOID_AMPLITUDE, (tasks, 1, 1), generator)
    phase = _uniform(SINUSOID_PHASE, (tasks, 1, 1), generator)
    x = _uniform(SINUSOID_X, (tasks, shots + queries, 1), generator)
    y = amplitude * torch.sin(x - phase)
    return Tasks(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def _check_points(shots: int, queries: int, tasks: int) -> None:
    for name, value in (("shots", shots), ("queries", queries), ("tasks", tasks)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


class SinusoidSampler(TaskSampler):
    """Training sinusoids, drawn on `device` from the sampler's own generator; checkpoints as TaskSampler's."""

    def __init__(self, shots: int, queries: int, tasks: int, seed: int, device: torch.device | str):
        _check_points(shots, queries, tasks)
        self.shots, self.queries, self.tasks, self.seed, self.draws = shots, queries, tasks, seed, 0
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self) -> Tasks:
        self.draws += 1
        return sinusoid_tasks(self.tasks, self.shots, self.queries, self.generator)


class SinusoidEvalTasks(EvalTasks):
    """A fixed set of sinusoids, drawn once on the CPU from (seed, split): the same on every device, run and method;
    the validation and the test set differ."""

    def __init__(self, split: str, shots: int, queries: int, num_tasks: int, seed: int, device: torch.device | str):
        _check_points(shots, queries, num_tasks)
        generator = torch.Generator().manual_seed(hash((seed, SINUSOID_STREAMS[split])) % 2 ** 63)  # ints: stable
        self.tasks, self.device = sinusoid_tasks(num_tasks, shots, queries, generator), device

    def __len__(self) -> int:
        return len(self.tasks.x_s)

    def batches(self, batch_size: int) -> Iterator[Tasks]:
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        for first in range(0, len(self), batch_size):
            yield Tasks(*(t[first:first + batch_size].to(self.device) for t in self.tasks))


# ---- Model: Conv4 and ResNet-12, functional; the inner-loop helpers ----
# One pure function over a parameter dict, so that the inner loop can differentiate through fast weights (torch.func
# style). Names are the checkpoint keys: conv{i}.weight, conv{i}.bias, bn{i}.weight, bn{i}.bias, head.weight, head.bias.
CONV_KERNEL = 3  # 3×3 convolutions, padding 1: the spatial size is kept until the pooling
POOL = 2  # each block halves the spatial size
BLOCKS = 4  # Conv4's blocks: images need at least POOL ** BLOCKS = 16 pixels a side
BN_EPS = 1e-5  # BatchNorm's ε, F.batch_norm's default
BN = "bn"  # the BatchNorm tensors' names start so: bn{i}.weight (scale), bn{i}.bias (shift)


def conv4_init(image_shape: tuple[int, int, int], ways: int, filters: int = 48, blocks: int = BLOCKS,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The Conv4 of MAML / MAML++ (O. Chang and H. Lipson, "Accelerating Meta-Learning by Sharing Gradients", arXiv
    2312.08398, appendix A.2) for (C, H, W) images: Xavier-uniform conv and head weights, zero biases, BatchNorm
    scale 1, shift 0 (the MAML++ reference code). 84×84 -> 5×5×filters features; 28×28 -> 1×1."""
    channels, height, width = image_shape
    if min(height, width) < POOL ** blocks:
        raise ValueError(f"{blocks} pooling blocks need images of at least {POOL ** blocks} pixels, got {image_shape}")
    params: dict[str, torch.Tensor] = {}
    for i in range(blocks):
        w = torch.empty(filters, channels, CONV_KERNEL, CONV_KERNEL, dtype=dtype)
        params[f"conv{i}.weight"] = torch.nn.init.xavier_uniform_(w, generator=generator)
        params[f"conv{i}.bias"] = torch.zeros(filters, dtype=dtype)
        params[f"bn{i}.weight"] = torch.ones(filters, dtype=dtype)
        params[f"bn{i}.bias"] = torch.zeros(filters, dtype=dtype)
        channels, height, width = filters, height // POOL, width // POOL
    w = torch.empty(ways, filters * height * width, dtype=dtype)
    params["head.weight"] = torch.nn.init.xavier_uniform_(w, generator=generator)
    params["head.bias"] = torch.zeros(ways, dtype=dtype)
    return params


def conv4_blocks(params: dict[str, torch.Tensor]) -> int:
    """Number of conv blocks in a Conv4 parameter dict."""
    return sum(1 for name in params if name.startswith("conv") and name.endswith(".weight"))


def conv_block(params: dict[str, torch.Tensor], i: int, x: torch.Tensor) -> torch.Tensor:
    """Block i before its pooling: conv 3×3 -> BatchNorm on this batch's statistics -> ReLU. No running statistics:
    the transductive BatchNorm of MAML and MAML++, the same at train and test time."""
    x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], padding=CONV_KERNEL // 2)
    x = F.batch_norm(x, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], training=True, eps=BN_EPS)
    return F.relu(x)


def conv4_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, ways) logits: every block conv -> BatchNorm -> ReLU -> max-pool, then linear."""
    for i in range(conv4_blocks(params)):
        x = F.max_pool2d(conv_block(params, i, x), POOL)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


RESNET_BLOCKS, RESNET_CONVS = 4, 3  # ResNet-12: 4 residual blocks of 3 convolutions (+ the 1×1 shortcut's)
RESNET_SLOPE = 0.1  # LeakyReLU's negative slope


def resnet12_init(image_shape: tuple[int, int, int], ways: int, width: int = 64,
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
                  ) -> dict[str, torch.Tensor]:
    """The ResNet-12 of fmu2/PyTorch-MAML (models/encoders/resnet12.py, the code the LWDGH paper, "Cross-Task
    Gradient Harmonization for Meta-Learning" (anonymous, under double-blind review), built on). Block i: 3×3
    convolutions without bias, width·2^i channels (64-128-256-512: about 8 million parameters), Kaiming-normal
    (fan_out, leaky_relu) as there; BatchNorm scale 1, shift 0; a 1×1 convolution + BatchNorm shortcut. Head: linear
    on the spatial mean, initialised as torch.nn.Linear. Names: conv{i}.{j}.weight, bn{i}.{j}.weight / .bias (j = 0,
    1, 2, and "shortcut"), head.weight, head.bias."""
    if min(image_shape[1:]) < POOL ** RESNET_BLOCKS:
        raise ValueError(f"{RESNET_BLOCKS} pooling blocks need images of at least {POOL ** RESNET_BLOCKS} pixels, "
                         f"got {image_shape}")
    params: dict[str, torch.Tensor] = {}
    channels = image_shape[0]
    for i in range(RESNET_BLOCKS):
        out = width * 2 ** i
        for j, (c_in, kernel) in enumerate([(channels, CONV_KERNEL)] + [(out, CONV_KERNEL)] * (RESNET_CONVS - 1)
                                           + [(channels, 1)]):
            j = "shortcut" if j == RESNET_CONVS else j
            w = torch.empty(out, c_in, kernel, kernel, dtype=dtype)
            params[f"conv{i}.{j}.weight"] = torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="leaky_relu",
                                                                          generator=generator)
            params[f"bn{i}.{j}.weight"] = torch.ones(out, dtype=dtype)
            params[f"bn{i}.{j}.bias"] = torch.zeros(out, dtype=dtype)
        channels = out
    bound = 1 / math.sqrt(channels)  # torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    params["head.weight"] = torch.empty(ways, channels, dtype=dtype).uniform_(-bound, bound, generator=generator)
    params["head.bias"] = torch.empty(ways, dtype=dtype).uniform_(-bound, bound, generator=generator)
    return params


def _conv_bn(params: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """ResNet-12's convolution `name` (e.g. 0.1, 2.shortcut), then BatchNorm on this batch's statistics."""
    weight = params[f"conv{name}.weight"]
    x = F.conv2d(x, weight, padding=weight.shape[-1] // 2)
    return F.batch_norm(x, None, None, params[f"bn{name}.weight"], params[f"bn{name}.bias"], training=True, eps=BN_EPS)


def resnet12_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images -> (N, ways) logits: per block three conv -> BatchNorm (-> LeakyReLU but the last), plus
    the shortcut, LeakyReLU, max-pool; then the spatial mean and the linear head."""
    for i in range(RESNET_BLOCKS):
        out = x
        for j in range(RESNET_CONVS):
            out = _conv_bn(params, f"{i}.{j}", out)
            out = F.leaky_relu(out, RESNET_SLOPE) if j < RESNET_CONVS - 1 else out
        x = F.max_pool2d(F.leaky_relu(out + _conv_bn(params, f"{i}.shortcut", x), RESNET_SLOPE), POOL)
    return F.linear(x.mean((2, 3)), params["head.weight"], params["head.bias"])


MLP_HIDDEN = (40, 40)  # Finn et al. (arXiv 1703.03400) Section 5.1: two hidden layers of 40 ReLU units
MLP_INIT_STD = 0.01  # their code (cbfinn/maml, maml.py construct_fc_weights): truncated normal, 2 std, zero biases


def mlp_init(inputs: int, outputs: int, hidden: tuple[int, ...] = MLP_HIDDEN, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The sinusoid network of MAML and Meta-SGD, inputs-40-40-outputs: fc{i}.weight, fc{i}.bias, head.weight,
    head.bias; weights ~ N(0, MLP_INIT_STD²) cut at 2 std, biases zero."""
    params: dict[str, torch.Tensor] = {}
    sizes = (inputs, *hidden, outputs)
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        name = "head" if i == len(hidden) else f"fc{i}"
        w = torch.empty(b, a, dtype=dtype)
        params[f"{name}.weight"] = torch.nn.init.trunc_normal_(w, std=MLP_INIT_STD, a=-2 * MLP_INIT_STD,
                                                               b=2 * MLP_INIT_STD, generator=generator)
        params[f"{name}.bias"] = torch.zeros(b, dtype=dtype)
    return params


def mlp_features(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(N, inputs) points -> (N, hidden[-1]): every hidden layer linear -> ReLU; the input of the head."""
    for i in range(sum(1 for name in params if name.startswith("fc") and name.endswith(".weight"))):
        x = F.relu(F.linear(x, params[f"fc{i}.weight"], params[f"fc{i}.bias"]))
    return x


def mlp_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(N, inputs) points -> (N, outputs) predictions: the hidden layers, then the linear head."""
    return F.linear(mlp_features(params, x), params["head.weight"], params["head.bias"])


FORWARD = {"conv4": conv4_forward, "resnet12": resnet12_forward, "mlp": mlp_forward}  # --backbone -> its forward


def init_backbone(args: Args, image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """θ of --backbone for (C, H, W) images (the MLP: points of shape (inputs,)), drawn from --seed."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.backbone == "mlp":  # regression: one real output per point
        return mlp_init(math.prod(image_shape), REGRESSION_OUTPUTS, generator=generator)
    if args.backbone == "resnet12":
        return resnet12_init(image_shape, args.ways, args.resnet_width, generator=generator)
    return conv4_init(image_shape, args.ways, args.filters, generator=generator)


def split_adapted(weights: dict[str, torch.Tensor], adapt_bn: bool) -> tuple[dict, dict]:
    """weights -> (those the inner loop adapts, those it leaves alone). BatchNorm's scale and shift are meta-learned,
    adapted in the inner loop only with --adapt-bn, as in the reference code: MAML's (BatchNorm variables outside the
    adapted weights), MAML++'s (enable_inner_loop_optimizable_bn_params false), fmu2/PyTorch-MAML's (frozen: bn)."""
    frozen = {name: w for name, w in weights.items() if name.startswith(BN) and not adapt_bn}
    return {name: w for name, w in weights.items() if name not in frozen}, frozen


def forward_tasks(forward: Callable, params: dict[str, torch.Tensor], x: torch.Tensor, use_vmap: bool,
                  recompute: bool = False) -> torch.Tensor:
    """Run `forward` for every task: params (tasks, ...) per tensor, x (tasks, N, C, H, W) -> (tasks, N, ways).
    use_vmap: one batched forward (torch.func.vmap: grouped convolutions, fastest on a GPU), else a loop over tasks
    (faster on a CPU); same values and gradients (tested). recompute: gradient checkpointing (torch.utils.checkpoint),
    activations recomputed in the backward, not stored; on the loop path task by task: the backward holds one task's."""
    def run(fn: Callable, *inputs):
        return torch.utils.checkpoint.checkpoint(fn, *inputs, use_reentrant=False) if recompute else fn(*inputs)
    if use_vmap:
        return run(torch.func.vmap(forward), params, x)
    per_task = {name: p.unbind(0) for name, p in params.items()}
    return torch.stack([run(forward, {name: p[t] for name, p in per_task.items()}, x[t]) for t in range(x.shape[0])])


def support_grads(forward: Callable, fast: dict[str, torch.Tensor], x_s: torch.Tensor, y_s: torch.Tensor, *,
                  create_graph: bool, use_vmap: bool, frozen: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """∇L_t(θ_t) of every task's support loss w.r.t. its own weights θ_t: fast (tasks, ...) -> (tasks, ...) per tensor.
    One backward of Σ_t L_t (L_t: the mean over task t's support set) gives them all: tasks share nothing in the forward
    pass. frozen: tensors the forward also reads, (tasks, ...) too, not adapted (e.g. BatchNorm's scale and shift)."""
    logits = forward_tasks(forward, {**fast, **(frozen or {})}, x_s, use_vmap)  # (tasks, ways*shots, ways)
    loss = task_loss(logits.flatten(0, 1), y_s.flatten(0, 1), reduction="sum") / y_s.shape[1]
    return dict(zip(fast, torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph)))


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The papers' task loss: cross-entropy of logits (N, ways) against labels (N,); for real-valued targets (N, 1)
    (regression) the squared error of the predictions (N, 1), MAML's and Meta-SGD's sinusoid loss."""
    if targets.is_floating_point():
        return F.mse_loss(outputs, targets, reduction=reduction)
    return F.cross_entropy(outputs, targets, reduction=reduction)


def query_loss(logits: torch.Tensor, y_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1/T) Σ_t L_t^query and the mean score (accuracy; regression: MSE): logits (tasks, ways*queries, ways), y_q
    (tasks, ways*queries). Every task has as many queries, so the mean over all of them is the mean over tasks of
    each task's mean."""
    return task_loss(logits.flatten(0, 1), y_q.flatten(0, 1)), score(logits.detach(), y_q).mean()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct predictions per task: logits (tasks, N, ways), labels (tasks, N) -> (tasks,)."""
    return (logits.argmax(-1) == labels).double().mean(-1)  # exact fractions k / N


def score(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each task's score, (tasks,): its accuracy, or for real-valued targets (tasks, N, 1) its mean squared error."""
    if targets.is_floating_point():
        return (outputs.double() - targets.double()).square().mean((1, 2))
    return accuracy(outputs, targets)


# ---- Arguments: a typed dataclass, one docstring line per field (CleanRL style) ----
@dataclass
class Args:
    dataset: Literal["omniglot", "miniimagenet", "tieredimagenet", "cub", "cifarfs", "fc100", "vggflower",
                     "synthetic", "sinusoid"] = "omniglot"
    """dataset: omniglot, miniimagenet, tieredimagenet, cub, cifarfs, fc100, vggflower, synthetic, or sinusoid
    (regression, generated)"""
    data_root: str = "data"
    """folder that holds the datasets (see docs/datasets.md for the layout looked for)"""
    download: bool = False
    """download the dataset into --data-root when it is missing"""
    cache_dir: str = ""
    """where the uint8 array caches go (default: next to the data, or ~/.cache when that is read-only)"""
    bbox_crop: bool = False
    """CUB only: crop each image to its bounding box before resizing"""
    synthetic_shape: str = "3,84,84"
    """synthetic only: image shape C,H,W"""
    adapt_bn: bool = False
    """adapt BatchNorm's scale and shift in the inner loop too (default: the outer loop only, as the references)"""
    ways: int = 5
    """classes per task (sinusoid: 1, one function)"""
    shots: int = 1
    """support examples per class (sinusoid: support points K)"""
    queries: int = 15
    """query examples per class (sinusoid: query points)"""
    test_queries: int = 0
    """query examples per class of the meta-test tasks (0: --queries)"""
    tasks: int = 5
    """task batch size: tasks per meta-iteration"""
    filters: int = 48
    """channels of each Conv4 block"""
    backbone: Literal["conv4", "resnet12", "mlp"] = "conv4"
    """conv4, or resnet12 (fmu2/PyTorch-MAML's) where the algorithm file offers it; mlp: sinusoid's (its default)"""
    resnet_width: int = 64
    """ResNet-12 only: channels of its first block, doubled in each next one (fmu2's 64-128-256-512)"""
    epochs: int = 250
    """meta-training epochs"""
    iters_per_epoch: int = 1000
    """meta-iterations per epoch"""
    outer_lr: float = 1e-3
    """learning rate of the outer Adam"""
    val_tasks: int = 600
    """meta-validation tasks, evaluated after every epoch (a fixed set)"""
    test_tasks: int = 600
    """meta-test tasks (a fixed set)"""
    ensemble: int = 5
    """checkpoints kept (best by validation accuracy) and ensembled at meta-test"""
    eval_batch: int = 25
    """evaluation tasks adapted together (memory only: results do not depend on it)"""
    eval_seed: int = 0
    """seed of the fixed validation and test task sets, shared by all runs and methods"""
    seed: int = 1
    """seed of initialisation and training task sampling"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda when available), cpu or cuda"""
    vmap: Literal["auto", "on", "off"] = "auto"
    """batch the tasks through one vmap-ed forward: auto (on for cuda and the mlp, off for cpu), on, off"""
    max_bad_steps: int = 10
    """consecutive non-finite meta-iterations after which the run stops as diverged"""
    out: str = ""
    """run directory (default runs/<algo>__<dataset>__<ways>w<shots>s__t<tasks>__<seed>__<time>)"""
    resume: str = ""
    """continue the interrupted run in this run directory from its last checkpoint"""
    quiet: bool = False
    """no progress line"""
    tensorboard: bool = False
    """also write the per-epoch scalars as TensorBoard events into the run directory (pip install tensorboard)"""
    process_timeout: int = 600
    """several processes (torchrun, srun): seconds one waits for the others before the run stops with a message"""
    backbones = ("conv4", "resnet12", "mlp")  # the --backbone values a file offers (no annotation: not a flag)
    images_only = ""  # why a file that offers no mlp cannot run --dataset sinusoid (no annotation: not a flag)

    def check(self) -> list[str]:
        """Problems with the values, each saying what is expected (subclasses add their own)."""
        problems = []
        if self.test_queries < 0:
            problems.append(f"--test-queries must be 0 (--queries) or a positive integer, got {self.test_queries}")
        for name in ("ways", "shots", "queries", "tasks", "filters", "epochs", "iters_per_epoch", "val_tasks",
                     "test_tasks", "ensemble", "eval_batch", "max_bad_steps", "resnet_width", "process_timeout"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        regression = self.dataset in REGRESSION
        if regression and "mlp" not in self.backbones:
            problems.append(f"--dataset {self.dataset}: this method runs on images only: {self.images_only}")
        elif self.backbone not in self.backbones:
            problems.append(f"--backbone {self.backbone}: this method runs on {' or '.join(self.backbones)} only")
        elif regression != (self.backbone == "mlp"):
            problems.append(f"--backbone {self.backbone} with --dataset {self.dataset}: the sinusoid's points run on "
                            f"--backbone mlp (its default there), images on a convolutional backbone")
        if regression and self.ways != 1:
            problems.append(f"--ways {self.ways}: a {self.dataset} task is one function, not classes; leave --ways out "
                            f"(it is 1)")
        if regression:  # flags of images and convolutions, which the MLP would silently ignore
            problems += [f"--{f.name.replace('_', '-')} applies to image data sets only, not --dataset {self.dataset}"
                         for f in dataclasses.fields(Args)
                         if f.name in IMAGE_ONLY and getattr(self, f.name) != f.default]
        if not regression and self.ways < 2:
            problems.append(f"--ways must be at least 2 for a classification task, got {self.ways}")
        if not self.outer_lr > 0:
            problems.append(f"--outer-lr must be positive, got {self.outer_lr}")
        for f in dataclasses.fields(self):  # inf and NaN: no learning rate, weight or probability takes them
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                problems.append(f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(self, f.name)}")
        for name in ("seed", "eval_seed"):  # torch.Generator.manual_seed takes [0, 2^63)
            if not 0 <= getattr(self, name) < 2 ** 63:
                problems.append(f"--{name.replace('_', '-')} must lie in [0, 2^63), got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # counts (of every file's Args) that no run could reach
            value, bound = getattr(self, f.name), MAX_STEPS if f.name.endswith("inner_steps") else MAX_COUNT
            if type(value) is int and f.name not in ("seed", "eval_seed") and value > bound:
                got = str(value) if value < 10 ** 20 else f"a number of {len(str(value))} digits"
                problems.append(f"--{f.name.replace('_', '-')} must be at most {bound:,}, got {got}")
        if self.device == "cuda" and not torch.cuda.is_available():
            problems.append("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        try:
            shape = synthetic_shape(self.synthetic_shape)
            if min(shape) < 1 or max(shape) > MAX_COUNT:
                raise ValueError
            if self.dataset == "synthetic" and min(shape[1:]) < POOL ** BLOCKS:
                problems.append(f"--synthetic-shape {self.synthetic_shape}: Conv4's {BLOCKS} poolings need images of "
                                f"at least {POOL ** BLOCKS}×{POOL ** BLOCKS} pixels")
        except ValueError:
            problems.append(f"--synthetic-shape must be three positive integers C,H,W (at most {MAX_COUNT:,}), "
                            f"got {self.synthetic_shape[:40]!r}")
            return problems
        if not problems and (need := memory_floor(self, shape)) > (have := device_memory(self.device)):
            problems.append(f"these counts need at least {need / 2 ** 30:.1f} GiB (a task batch's images and first "
                            f"activations, the fixed task sets' indices, the network with Adam), more than the "
                            f"{have / 2 ** 30:.1f} GiB of {pick_device(self.device).type} memory here: lower --tasks, "
                            f"--ways, --shots, --queries, --filters, --resnet-width, --val-tasks, --test-tasks or "
                            f"--eval-batch")
        return problems

    def extra_weights(self) -> int:
        """Meta-parameters beyond the backbone's (e.g. CML's co-learner), for memory_floor; files override it."""
        return 0


MAX_COUNT = 2 ** 31 - 1  # any count flag: beyond it no loop finishes and no tensor of that many rows fits
MAX_STEPS = 10_000  # inner steps: each step is a forward and backward per task (the papers take 1 to 100)
FLOAT_BYTES, INDEX_BYTES = 4, 8  # float32 images and activations; int64 task indices
ADAM_COPIES = 4  # a parameter, its gradient and Adam's two moments


def memory_floor(args: Args, synthetic: tuple[int, int, int]) -> int:
    """Bytes a run of these counts needs at the least: a lower bound, so that only the impossible is refused."""
    c, h, w = {"omniglot": (1, OMNIGLOT_SIZE, OMNIGLOT_SIZE), "synthetic": synthetic,
               "cifarfs": (3, CIFAR_SIZE, CIFAR_SIZE), "fc100": (3, CIFAR_SIZE, CIFAR_SIZE),
               "vggflower": (3, FLOWERS_SIZE, FLOWERS_SIZE)}.get(args.dataset, (3, IMAGE_SIZE, IMAGE_SIZE))
    per_task = args.ways * (args.shots + max(args.queries, args.test_queries))  # images of one task
    evaluated = min(args.eval_batch, max(args.val_tasks, args.test_tasks))
    if args.backbone == "mlp":  # points, their targets and activations; the fixed task sets' points and targets
        sizes = (*SINUSOID_SHAPE, *MLP_HIDDEN, *SINUSOID_SHAPE)
        weights = sum(a * b + b for a, b in zip(sizes, sizes[1:]))
        points = max(args.tasks, evaluated) * per_task * (sum(sizes) + 1) + (args.val_tasks + args.test_tasks) \
            * per_task * 2
        return points * FLOAT_BYTES + (weights + args.extra_weights()) * FLOAT_BYTES * ADAM_COPIES
    if args.backbone == "resnet12":
        widths = [c] + [args.resnet_width * 2 ** i for i in range(RESNET_BLOCKS)]
        weights = sum(a * b * (1 + CONV_KERNEL ** 2) + (RESNET_CONVS - 1) * b * b * CONV_KERNEL ** 2
                      for a, b in zip(widths, widths[1:]))
    else:
        widths = [c] + [args.filters] * BLOCKS
        weights = sum(a * b * CONV_KERNEL ** 2 for a, b in zip(widths, widths[1:]))
    images = max(args.tasks, evaluated) * per_task * (c + widths[1]) * h * w * FLOAT_BYTES  # input, first block
    indices = (args.val_tasks + args.test_tasks) * per_task * INDEX_BYTES  # EvalTasks.index
    return images + indices + (weights + args.extra_weights()) * FLOAT_BYTES * ADAM_COPIES


def device_memory(device: str) -> int:
    """Bytes of memory of the device --device names (auto: the one pick_device picks)."""
    if pick_device(device).type == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def synthetic_shape(text: str) -> tuple[int, int, int]:
    """'3,84,84' -> (3, 84, 84)."""
    values = tuple(int(v) for v in text.split(","))
    if len(values) != 3:
        raise ValueError(text)
    return values


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring line under each dataclass field, read from the source of the class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant):
                docs[node.target.id] = str(after.value.value)
    return docs


HELP_GROUPS = {  # --help's groups of the shared flags, after the method's own flags
    "task shape": ("ways", "shots", "queries", "test_queries", "tasks"),
    "data": ("dataset", "data_root", "download", "cache_dir", "bbox_crop", "synthetic_shape"),
    "network": ("backbone", "filters", "resnet_width", "adapt_bn"),
    "training": ("epochs", "iters_per_epoch", "outer_lr", "seed", "max_bad_steps"),
    "evaluation": ("val_tasks", "test_tasks", "ensemble", "eval_batch", "eval_seed"),
    "run": ("device", "vmap", "out", "resume", "quiet", "tensorboard", "process_timeout")}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default once: appended unless its help line already says it."""
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _parser(cls: type, description: str | None, defaults: bool = True) -> argparse.ArgumentParser:
    """An argparse parser of a dataclass of arguments, its flags grouped for --help (the method's own first, then
    HELP_GROUPS), two examples last; defaults=False leaves out every flag not given."""
    program = f"{program_name(cls())}.py" if description else "<file>.py"
    examples = (f"examples:\n  python {program} --dataset omniglot --data-root data --download --shots 1 --tasks 5\n"
                f"  python {program} --resume runs/<the run directory>")
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter, epilog=examples)
    docs, hints, shared = _field_docs(cls), typing.get_type_hints(cls), {f.name for f in dataclasses.fields(Args)}
    groups = {"method": parser.add_argument_group(f"{program}'s own flags")}
    groups.update({title: parser.add_argument_group(title) for title in HELP_GROUPS})
    group_of = {name: title for title, names in HELP_GROUPS.items() for name in names}
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if defaults else argparse.SUPPRESS
        how = ({"action": argparse.BooleanOptionalAction} if kind is bool else {"choices": typing.get_args(kind)}
               if typing.get_origin(kind) is typing.Literal else {"type": kind})  # a switch, a choice or a value
        group = groups[group_of[f.name] if f.name in shared else "method"]
        group.add_argument(flag, **how, default=default, help=docs[f.name])
    return parser


def given_flags(cls: type, argv: list[str] | None = None) -> set[str]:
    """The fields whose flags argv gives explicitly (also where the value given is the default)."""
    return set(vars(_parser(cls, None, defaults=False).parse_known_args(argv)[0]))


def parse_args(cls: type, argv: list[str] | None = None, description: str | None = None):
    """The command line as a `cls` (an algorithm file's Args), checked by cls.check(); --resume: resumed_args."""
    parser = _parser(cls, description)
    args = cls(**vars(parser.parse_args(argv)))
    if args.dataset in REGRESSION:  # the defaults that differ there, where not given: mlp, one function per task
        given = given_flags(cls, argv)
        args = replace(args, **{name: value for name, value in REGRESSION_DEFAULTS.items() if name not in given})
    if problems := args.check():
        parser.error("\n  ".join(problems))
    return resumed_args(args, given_flags(cls, argv)) if args.resume else args


ADDED_LATER = {"backbone": "conv4", "resnet_width": 64,  # result flags newer than some runs: the value those ran with
               "gs_source": "both", "sam_inner": 0.0005, "sam_outer": 0.0005}  # SAM: read by --base sharpmaml only
RESUME_FREE = ("resume", "quiet", "device", "vmap", "out", "data_root", "cache_dir", "download", "eval_batch",
               "tensorboard", "process_timeout")


def wrong_types(config: dict, cls: type) -> list[str]:
    """What in a config.json (read from disk, perhaps edited by hand) does not fit the type of its flag in cls."""
    problems, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, value = hints[f.name], config.get(f.name, f.default)
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        number = (int, float) if kind is float else kind  # JSON writes 1.0 as 1.0, but a hand edit may write 1
        fits = value in choices if choices else isinstance(value, number) and (kind is bool) == isinstance(value, bool)
        if not fits:
            want = f"one of {', '.join(map(repr, choices))}" if choices else f"a {kind.__name__}"
            problems.append(f'"{f.name}": {json.dumps(value)}, expected {want}')
    return problems


def program_name(args: Args) -> str:
    """The algorithm file that defines this Args class, e.g. maml_gs."""
    return Path(inspect.getfile(type(args))).stem


def resumed_args(args: Args, given: set[str] | None = None) -> Args:
    """On --resume, the run's own arguments (its config.json); of the flags that may change between sessions
    (RESUME_FREE) the command line's where it gives them, else the run's (its --data-root, for one). A flag given that
    differs from the run's value is refused, even the default: resuming must never silently continue another
    configuration. given: the fields the command line gives (given_flags); None: those that differ from the defaults."""
    path = Path(args.resume).expanduser() / "config.json"
    try:
        config = {**ADDED_LATER, **json.loads(path.read_text())}
    except (OSError, ValueError, TypeError) as e:  # TypeError: JSON that is not an object
        raise SystemExit(f"error: cannot resume {args.resume}: {path} is missing or damaged ({e}); "
                         f"is it a run directory?")
    if problems := wrong_types(config, type(args)):
        raise SystemExit(f"error: cannot resume {args.resume}: {path} holds values of the wrong type:\n  "
                         + "\n  ".join(problems) + "\nrestore the file (a run writes it once, at its start)")
    if config.get("program") != program_name(args):
        raise SystemExit(f"error: {args.resume} is a run of {config.get('program')}.py, not {program_name(args)}.py")
    values, default = dataclasses.asdict(args), dataclasses.asdict(type(args)())
    if given is None:
        given = {k for k in values if values[k] != default[k]}
    if missing := sorted(set(values) - set(config) - set(RESUME_FREE)):  # a newer RESUME_FREE flag changes no result
        raise SystemExit(f"error: {args.resume} was made without the arguments {missing}: "
                         "another version of the program")
    if clash := [k for k in given if k not in RESUME_FREE and values[k] != config[k]]:
        raise SystemExit(f"error: {args.resume} is a run with "
                         + ", ".join(f"--{k.replace('_', '-')} {config[k]}" for k in clash)
                         + "; resume it without changing those flags, or start a new run")
    kept = {"resume", "out"}  # this session's: the run directory is the one resumed
    resumed = type(args)(**{k: values[k] if k in given or k in kept or k not in config else config[k] for k in values})
    if problems := resumed.check():  # e.g. the run's --device cuda on a machine without one
        raise SystemExit(f"error: cannot resume {args.resume} with these values:\n  " + "\n  ".join(problems))
    return resumed


# ---- Processes: one meta-training split over tasks (torchrun, srun) ----
# Every process samples the same whole batch from the same generator and adapts its own equal share of the tasks
# (my_share); the cross-process sums below make N processes compute the one-process meta-gradient. One process:
# every helper returns its input as it is, and nothing of torch.distributed runs.
SLURM_ENV = ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")  # srun's, read when MASTER_ADDR is exported too


def process_env() -> tuple[int, int, int]:
    """(processes, rank, local rank): torchrun's WORLD_SIZE, RANK, LOCAL_RANK; else, under srun with MASTER_ADDR and
    MASTER_PORT exported, SLURM's SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID; else (1, 0, 0), one process."""
    env = os.environ
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK") if "WORLD_SIZE" in env else SLURM_ENV
    if "WORLD_SIZE" not in env and not ("SLURM_PROCID" in env and "MASTER_ADDR" in env):
        return 1, 0, 0
    try:
        count, rank, local = (int(env.get(name, "0")) for name in names)
    except ValueError:
        raise SystemExit(f"error: the environment's {', '.join(f'{n}={env.get(n)!r}' for n in names)} are not "
                         f"integers; start several processes with torchrun (or srun), one process without them")
    if not 0 <= rank < count:
        raise SystemExit(f"error: {names[1]}={rank} with {names[0]}={count}: a rank in [0, {count}) is expected")
    return count, rank, local


def start_processes(args: Args, device: torch.device) -> None:
    """Join the process group of a torchrun or srun start (NCCL on CUDA, gloo on a CPU); nothing for one process.
    Each process adapts --tasks / processes tasks: a count that does not divide --tasks is a usage error."""
    count, rank, _ = process_env()
    if count == 1:
        return
    if args.tasks % count:
        raise SystemExit(f"error: --tasks {args.tasks} over {count} processes: each process adapts an equal share of "
                         f"the batch, so --tasks must be a multiple of the process count (e.g. --tasks "
                         f"{count * max(1, round(args.tasks / count))})")
    if not hasattr(funcol, "all_reduce_coalesced_backward"):  # before PyTorch gave its collectives a backward
        raise SystemExit(f"error: several processes need PyTorch's differentiable collectives (the functional "
                         f"all-reduce's backward), which torch {torch.__version__} lacks: without it gradient "
                         f"sharing's meta-gradient would silently lose its path through the all-reduce; upgrade "
                         f"torch (pip install -U torch) or run one process")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise SystemExit(f"error: {count} processes but no {name} in the environment: torchrun sets it; under "
                             f"srun export MASTER_ADDR (the first node's host name) and MASTER_PORT (a free port)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=count,
                            timeout=datetime.timedelta(seconds=args.process_timeout),
                            device_id=device if device.type == "cuda" else None)


def processes() -> int:
    """How many processes share the run (1 without torchrun or srun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank() -> int:
    """This process's rank, 0 to processes() - 1; process 0 writes the run directory."""
    return dist.get_rank() if processes() > 1 else 0


def my_share(batch: Tasks | torch.Tensor) -> Tasks | torch.Tensor:
    """This process's equal share of a batch of tasks (tasks, ...): rows rank·n .. (rank + 1)·n − 1, n = tasks /
    processes, so the ranks hold the batch in task order. One process: the whole batch."""
    if isinstance(batch, Tasks):
        return Tasks(*(my_share(x) for x in batch))
    share = batch.shape[0] // processes()
    return batch[process_rank() * share:(process_rank() + 1) * share]


def sum_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Σ over the processes of each tensor, the same on every process, in one all-reduce. Differentiable: its
    backward sums the incoming gradients over the processes, so a second-order meta-gradient flows through it."""
    if processes() == 1:
        return list(tensors)
    summed = funcol.all_reduce_coalesced([t.contiguous() for t in tensors], "sum", dist.group.WORLD)
    return [funcol.wait_tensor(t) for t in summed]


def mean_over_processes(grads: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The batch's meta-gradient from each process's one over its equal share of tasks: their mean (None stays)."""
    names = [name for name, g in grads.items() if g is not None]
    summed = sum_over_processes([grads[name] for name in names])
    return {**grads, **{name: g / processes() for name, g in zip(names, summed)}}


def gather_over_processes(share: torch.Tensor) -> torch.Tensor:
    """Each process's (share, ...) rows, concatenated in rank order: the whole batch's (tasks, ...), on every one."""
    if processes() == 1:
        return share
    return funcol.wait_tensor(funcol.all_gather_single(share.contiguous(), 0, dist.group.WORLD))


def _gather_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """evaluate's uneven split: process r holds rows [r·count // N, (r + 1)·count // N) of count (fewer than N
    rows: some hold none); padded to an equal size for the all-gather, then cut back, in row order."""
    n = processes()
    if n == 1:
        return rows
    bounds = [r * count // n for r in range(n + 1)]
    size = max(b - a for a, b in zip(bounds, bounds[1:]))
    padded = torch.cat([rows, rows.new_zeros(size - rows.shape[0], *rows.shape[1:])])
    parts = gather_over_processes(padded).split(size)
    return torch.cat([part[:b - a] for part, a, b in zip(parts, bounds, bounds[1:])])


# ---- Evaluation ----
Z95 = 1.96  # 95% confidence interval of a mean: ± 1.96 · std / sqrt(n)


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width of per-task scores (sample std)."""
    values = values.double()
    return float(values.mean()), float(Z95 * values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0


def evaluate(predicts: list[Callable[[Tasks], torch.Tensor]], tasks: EvalTasks, batch_size: int,
             between: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query scores (num_tasks,) of the ensemble of `predicts` and of predicts[0] alone. Each predict (a
    model: tasks -> query logits) adapts on every task's support set; the query logits are averaged, then argmax (the
    top-5 ensemble of MAML++, arXiv 2312.08398 appendix A.3; regression: the predictions averaged, then their MSE);
    predicts[0] (the best single model) in the same pass. between() runs after each batch (Run's: stop there on
    SIGINT/SIGTERM)."""
    ensemble, first = [], []
    for batch_tasks in tasks.batches(batch_size):
        count, n, rank = batch_tasks.y_q.shape[0], processes(), process_rank()
        mine = Tasks(*(x[rank * count // n:(rank + 1) * count // n] for x in batch_tasks))  # several processes: a share
        scores = torch.zeros(0, 2, device=batch_tasks.y_q.device, dtype=torch.float64)  # (tasks, ensemble and first)
        if mine.y_q.shape[0]:  # a batch smaller than the process count leaves some processes none
            logits = [predict(mine) for predict in predicts]
            if mine.y_q.is_floating_point():  # regression: predictions averaged in float64, where n equal ones
                logits = [x.double() for x in logits]  # average to exactly one (float32: not always)
            scores = torch.stack([score(sum(logits) / len(logits), mine.y_q), score(logits[0], mine.y_q)], 1).double()
        scores = _gather_rows(scores, count).cpu()  # the batch's, in task order, on every process
        ensemble.append(scores[:, 0])
        first.append(scores[:, 1])
        between()
    return torch.cat(ensemble), torch.cat(first)


class Score(NamedTuple):
    """What a run measures on a task, by its task family: accuracy (classification) or squared error (regression)."""
    name: str  # in the files: metrics.csv's train_<name>, val_<name>; result.json's <max|min>_val_<name>, test_<name>_*
    higher: bool  # whether higher is better: the checkpoints' ranking, the best epoch
    percent: bool  # logs show it in percent (files keep fractions)

    def text(self, value: float) -> str:
        return f"{100 * value:.2f}%" if self.percent else f"{value:.4f}"

    def interval(self, value: float, half: float) -> str:  # 61.20 ± 1.70%, or 0.4321 ± 0.0123
        return f"{100 * value:.2f} ± {100 * half:.2f}%" if self.percent else f"{value:.4f} ± {half:.4f}"

    def ranked(self, value: float) -> float:
        """Higher is better after this, and a non-finite score (a diverged regression's NaN MSE) is worst."""
        return (value if self.higher else -value) if math.isfinite(value) else -math.inf

    @property
    def best(self) -> str:  # result.json's name of the best validation value: max_val_acc, min_val_mse
        return "max" if self.higher else "min"


ACCURACY, MSE = Score("acc", True, True), Score("mse", False, False)


def task_score(dataset: str) -> Score:
    """MSE for a regression family (lower is better), accuracy for images."""
    return MSE if dataset in REGRESSION else ACCURACY


# ---- Run directory and checkpoints ----
CHECKPOINT_FORMAT = "metalearn-gs checkpoint v1"
CHECKPOINT_KEYS = ("program", "algorithm", "args", "params", "state", "optimizer", "sampler", "torch_rng", "loop")
LAST, LOCK = "last.pt", ".lock"  # the run's newest state (for --resume); held by the one process writing the directory
# StepResult.per_task of an epoch's first 25 steps -> tasks.csv (the LWDGH paper's Fig. 2: 25 batches of 4)
TASK_LOG = 25


def write_run_file(path: Path, write: Callable[[typing.BinaryIO], None]) -> None:
    """atomic_write into a run directory; a full disk or a permission error is a message, not a traceback."""
    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as e:  # torch.save's writer raises RuntimeError on a full disk
        raise SystemExit(f"error: could not write {path} ({e}): free some space or fix the permissions, then "
                         f"continue with --resume {path.parent}; the files written before are intact")


def write_json(path: Path, obj: dict) -> None:
    write_run_file(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_csv(path: Path, rows: list[dict]) -> None:
    """rows as CSV, the columns of every row in order of appearance; a row without a column gets nan."""
    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval=math.nan)
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())
    write_run_file(path, write)


def append_csv(path: Path, rows: list[dict], size: int) -> int:
    """Append rows (with a header if size is 0) to the first `size` bytes of path, the end of the rows the last
    checkpoint counts: what a killed process appended after it goes. Returns the new size for the next checkpoint.
    Appending keeps the cost per epoch constant: a file rewritten every epoch grows with the run."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    if size == 0:
        writer.writeheader()
    writer.writerows(rows)
    try:
        with open(path, "r+b" if size else "wb") as f:
            f.truncate(size)
            f.seek(size)
            f.write(text.getvalue().encode())
            f.flush()
            os.fsync(f.fileno())  # on the disk before the checkpoint that counts these bytes
            return f.tell()
    except OSError as e:
        raise SystemExit(f"error: could not write {path} ({e}): free some space or fix the permissions, then "
                         f"continue with --resume {path.parent}")


def repair_csv(path: Path, size: int) -> tuple[int, str | None]:
    """Where append_csv may append: `size`, the bytes the last checkpoint counts, when path holds them all. A file
    that lost its end (a host crash before the bytes reached the disk, a hand edit) or is gone is cut to its last
    complete row, or started anew: never padded with NULs. Returns the size and, after a repair, a note of what was
    lost."""
    have = path.stat().st_size if path.is_file() else 0
    if have >= size:
        return size, None
    data = path.read_bytes() if have else b""
    keep = data[:data.rfind(b"\n") + 1]
    if keep.count(b"\n") < 2:  # not even the header and one row: start the file again
        keep = b""
        path.unlink(missing_ok=True)
    else:
        write_run_file(path, lambda f: f.write(keep))
    rows = max(keep.count(b"\n") - 1, 0)
    kept = f"kept its first {rows} complete rows, the later ones" if rows else "started it again, its rows"
    return len(keep), (f"{path.name} held {have} of the {size} bytes the last checkpoint counts (lost in a crash, "
                       f"or edited): {kept} of the epochs before are gone")


def load_checkpoint(path: Path, args: Args | None = None) -> dict:
    """A checkpoint dict, or SystemExit with a message naming the file when it is damaged or foreign: every key
    the loop reads present; with args, of this program and this configuration (the flags but RESUME_FREE)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: checkpoint {path} not found")
    except Exception as e:  # truncated or foreign file: torch raises several unrelated types
        raise SystemExit(f"error: checkpoint {path} is damaged ({e}); delete it, or resume from another run")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint of this project ({CHECKPOINT_FORMAT})")
    if missing := [key for key in CHECKPOINT_KEYS if key not in ckpt]:
        raise SystemExit(f"error: checkpoint {path} lacks {', '.join(missing)}: damaged or from another version")
    if args is not None and ckpt["program"] != program_name(args):
        raise SystemExit(f"error: checkpoint {path} is {ckpt['program']}.py's, not {program_name(args)}.py's")
    if args is not None:
        saved, mine = ckpt["args"], dataclasses.asdict(args)
        if differ := [k for k in mine if k not in RESUME_FREE and k in saved and saved[k] != mine[k]]:
            raise SystemExit(f"error: checkpoint {path} belongs to a run with " + ", ".join(
                f"--{k.replace('_', '-')} {saved[k]}" for k in differ) + ", not this run's: resume its own run")
    return ckpt


# ---- Run: the training loop's plumbing, and its helpers ----
class Progress:
    """A live status line on a terminal. Elsewhere (a log file, a pipe: a cluster job) a plain line every
    PLAIN_EVERY_ITERS meta-iterations or every PLAIN_EVERY_S seconds, whichever comes later, with no control
    characters. Nothing with --quiet."""
    REFRESH_S = 0.5  # a terminal's line
    PLAIN_EVERY_ITERS, PLAIN_EVERY_S = 50, 60.0  # a log's lines

    def __init__(self, quiet: bool, epochs: int, iters: int, score: Score = ACCURACY):
        self.quiet, self.epochs, self.iters, self.tty, self.score = quiet, epochs, iters, sys.stderr.isatty(), score
        self.start, self.last, self.done, self.since = time.time(), time.time(), 0, 0

    def step(self, epoch: int, it: int, loss: float, acc: float) -> None:
        self.done, self.since, now = self.done + 1, self.since + 1, time.time()
        wait = self.REFRESH_S if self.tty else self.PLAIN_EVERY_S
        if self.quiet or now - self.last < wait or not (self.tty or self.since >= self.PLAIN_EVERY_ITERS):
            return
        self.last, self.since, rate = now, 0, self.done / (now - self.start)
        left = ((self.epochs - epoch) * self.iters - it - 1) / rate
        line = (f"epoch {epoch + 1}/{self.epochs} iter {it + 1}/{self.iters}: loss {loss:.4f} {self.score.name} "
                f"{self.score.text(acc)}, {rate:.2f} it/s, ETA {left / 60:.1f} min")
        sys.stderr.write(f"\r{line}   " if self.tty else f"{line}\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(("\r" if self.tty else "") + text + "\n")
            sys.stderr.flush()


def describe_data(data: dict) -> str:
    """A run's data fingerprints (fingerprint, per split; a generated family's ranges) in a line."""
    return "; ".join(f"{d['name']}: {d['classes']} classes, {d['images']} images of {'x'.join(map(str, d['shape']))}, "
                     f"sha1 {d['sha1']}" if "sha1" in d else
                     f"{d['name']}: " + ", ".join(f"{k} {v}" for k, v in d.items() if k != "name")
                     for d in data.values())


def provenance(device: torch.device) -> dict[str, str]:
    """Where a run ran, for its config.json: the machine (GPU name or CPU model and threads) and the git commit."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
        threads = torch.get_num_threads()
        machine = f"{model}, {threads} thread{'s' if threads > 1 else ''}"
    try:  # the commit of this file's checkout
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"  # not a git checkout, or no git
    return {"machine": machine, "commit": commit}


def tensorboard_writer(run_dir: Path):
    """A TensorBoard SummaryWriter on run_dir, or None (with a message) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the separate tensorboard package
        print("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
              "the scalars are in metrics.csv only", file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(run_dir))


def for_device(args: Args, device: torch.device) -> Args:
    """args with --vmap auto decided for device: vmap over tasks on a GPU, a loop over tasks on a CPU (faster there
    for convolutions); the MLP's tiny layers vmap-ed everywhere (on a CPU about 4x faster than the loop at 25 tasks)."""
    use_vmap = device.type == "cuda" or args.backbone == "mlp"
    return replace(args, vmap="on" if use_vmap else "off") if args.vmap == "auto" else args


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """--device's device; CUDA: GPU local_rank, the one torchrun's LOCAL_RANK gives this process (0 alone)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():  # modulo: srun may bind each task one GPU, the one it sees
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def _to(obj, device: torch.device):
    """Move the floating-point tensors inside nested dicts/lists to device, the others (a torch.Generator's state,
    counters) to the host, where they are used on every device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device if obj.is_floating_point() else torch.device("cpu"))
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def restore_params(params: dict[str, torch.Tensor], saved: dict, path: Path) -> None:
    """Copy a checkpoint's parameters into params, refusing any missing, extra or differently shaped tensor."""
    for name in sorted(set(params) | set(saved)):
        have, got = params.get(name), saved.get(name)
        if have is None or not isinstance(got, torch.Tensor) or got.shape != have.shape or got.dtype != have.dtype:
            want = f"{tuple(have.shape)} {have.dtype}" if have is not None else "nothing"
            found = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else repr(got)
            raise SystemExit(f"error: checkpoint {path} does not fit this run: parameter {name} is {found}, expected "
                             f"{want}; it comes from another configuration (delete it, or resume its own run)")
        have.data.copy_(got)


@contextlib.contextmanager
def deferred_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM noted in the list yielded, not acted on, until the block ends (Run acts on them); a second
    one exits at once."""
    stop: list[int] = []

    def note(signum: int, frame) -> None:
        if stop:  # a second signal: the user will not wait for the step to end (e.g. a long evaluation batch)
            print(f"error: a second {signal.Signals(signum).name}: stopped at once; the files are as the last "
                  f"checkpoint left them, and --resume continues from it", file=sys.stderr)
            raise SystemExit(128 + signum)
        stop.append(signum)
    handlers = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def foreign_files(run_dir: Path) -> list[str]:
    """The names in run_dir when it is not a run directory of this project (a config.json of ours), but the lock
    and the config's temp files, which a run killed before its config.json was written leaves."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no config.json, or not JSON of an object
        if "program" in json.loads((run_dir / "config.json").read_text()):
            return []
    with contextlib.suppress(OSError):  # no such folder (or no folder at all: lock_run_dir says so)
        return sorted(p.name for p in run_dir.iterdir()
                      if p.name != LOCK and not (p.name.startswith("config.json") and p.name.endswith(".tmp")))
    return []


def lock_run_dir(run_dir: Path) -> typing.IO:
    """Create run_dir and take its lock file (fcntl.flock, released when the file closes or the process ends):
    a second run or resume into a directory in use is refused instead of mixing two runs' files."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise SystemExit(f"error: cannot use {run_dir} as a run directory ({e.strerror}); choose another --out")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f"error: {run_dir} is in use by another running process; wait for it, or choose another --out")
    return lock


def out_of_memory(error: BaseException | None) -> bool:
    """CUDA's torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


class StepResult(NamedTuple):
    """What an algorithm file's meta_gradient returns for one meta-iteration: tensors only (no host reads)."""
    loss: torch.Tensor  # () outer (query) loss of this meta-iteration, detached
    accuracy: torch.Tensor  # () query accuracy (regression: MSE), the run's Score
    grads: dict[str, torch.Tensor | None]  # meta-gradient per meta-parameter; None: no gradient this step
    state: dict  # what the algorithm carries to the next meta-iteration (e.g. ĝ); kept only if the step was finite
    metrics: dict[str, torch.Tensor] = {}  # this step's own numbers, () tensors: Run logs their epoch means
    per_task: dict[str, torch.Tensor] = {}  # (tasks,) numbers of each task: Run logs some to tasks.csv


class Data(NamedTuple):
    sampler: TaskSampler  # training tasks: a fresh batch per meta-iteration
    val: EvalTasks  # the fixed meta-validation tasks
    test: EvalTasks  # the fixed meta-test tasks
    image_shape: tuple[int, ...]  # (C, H, W); regression: a point's, (1,)


class Run:
    """The plumbing of one run. An algorithm file's `main` calls, inside `with Run(...) as run`: load_data(),
    restore(params, state, adam, sampler), then `for epoch in epochs(): for tasks in iterations(sampler):`
    accept(result) before each outer step, validate(predict, tasks) after each epoch; meta_test(predict, tasks) last.
    In the block SIGINT and SIGTERM are deferred: the current step finishes, then the run saves last.pt (or writes
    nothing half-done) and exits with 128 + the signal; running out of memory is a message."""

    def __init__(self, args: Args, name: str):
        self.device = pick_device(args.device, process_env()[2])  # several processes: LOCAL_RANK's GPU each
        self.args = for_device(args, self.device)  # --vmap auto decided: on for CUDA (and the MLP), off for a CPU
        self.name = name  # e.g. maml_gs: in run directory names, config.json and checkpoints
        start_processes(args, self.device)  # torchrun, srun: join the others (one process: nothing)
        self.writes = process_rank() == 0  # the one writer of the run directory; the others only read it
        torch.manual_seed(args.seed)
        self.score = task_score(args.dataset)  # accuracy, or for regression MSE (lower is better)
        self.progress = Progress(args.quiet or not self.writes, args.epochs, args.iters_per_epoch, self.score)
        # Everything the loops need to continue exactly where they stopped lives in `loop` and the checkpoint.
        self.loop = {"epoch": 0, "iteration": 0, "sums": {}, "skipped": 0, "bad_streak": 0, "seconds": 0.0,
                     "history": [], "top": [], "status": "running"}
        self.stop: list[int] = []  # signals received, acted on between steps
        self.dir: Path | None = None
        self.variant, self.source = args.dataset, ""  # the data set variant (omniglot-small, ...) and its folder
        self.data: dict[str, dict] = {}  # each split's fingerprint, in config.json and every checkpoint
        self.loss = self.acc = math.nan  # the last meta-iteration's loss and score, for the progress line
        self.started = time.time()  # this session's start of the current epoch
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Run:
        self.stop = self._exit.enter_context(deferred_signals())
        return self

    def __exit__(self, kind, error, trace) -> None:
        self._exit.close()  # signal handlers back, TensorBoard closed, the run directory's lock released
        if processes() > 1:
            lost = isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
                word in str(error) for word in ("Gloo", "gloo", "NCCL", "Connection closed", "Timed out")))
            if not lost:
                dist.destroy_process_group()
            else:  # a process died or hung: the others stop here (after --process-timeout at most)
                raise SystemExit(f"error: process {process_rank()} lost the other processes of this run "
                                 f"({str(error).splitlines()[0][:200]}): one of them died, was killed or waited longer "
                                 f"than --process-timeout {self.args.process_timeout} s; " + (
                                 f"the run continues from its last checkpoint with --resume {self.dir}" if self.dir
                                 else "nothing was written; start it again")) from None
        if out_of_memory(error):
            raise SystemExit(f"error: out of {self.device.type} memory ({str(error).splitlines()[0]}). "
                             f"Lower --eval-batch (it may change on --resume), or start again with fewer --tasks, "
                             f"--queries or --filters, or with --recompute where the file offers it") from None

    def _stopping(self) -> bool:
        """Whether a signal asks the run to stop; several processes agree (each may have got it at another step)."""
        if processes() == 1:
            return bool(self.stop)
        flags = sum_over_processes([torch.tensor([float(bool(self.stop))], device=self.device)])[0]
        return bool(flags.item())

    def _interrupted(self, what: str) -> None:
        if self._stopping():
            self.progress.message(what)
            raise SystemExit(128 + (self.stop[0] if self.stop else signal.SIGTERM))

    def load_data(self) -> Data:
        """The three splits of --dataset on the run's device: the training task sampler (--seed) and the fixed
        validation and test task sets (--eval-seed, the same for every run and method)."""
        args = self.args
        if args.dataset in REGRESSION:
            return self._generated_data()
        if processes() > 1 and not self.writes:
            dist.barrier()  # process 0 loads first: it alone downloads and writes the caches, the others read them
        try:
            splits = {split: load_split(args.dataset, split, args.data_root, download=args.download,
                                        cache_dir=args.cache_dir or None, bbox_crop=args.bbox_crop,
                                        synthetic_shape=synthetic_shape(args.synthetic_shape), seed=args.eval_seed,
                                        verbose=not args.quiet) for split in SPLITS}
            self.data = {name: fingerprint(split) for name, split in splits.items()}  # checked on --resume
            self.variant, self.source = splits["train"].name.split("/")[0], splits["train"].source
            splits = {name: split.to(self.device) for name, split in splits.items()}
            task_shape = (args.ways, args.shots, args.queries)
            data = Data(TaskSampler(splits["train"], *task_shape, args.tasks, seed=args.seed),
                        EvalTasks(splits["val"], *task_shape, args.val_tasks, seed=args.eval_seed),
                        EvalTasks(splits["test"], args.ways, args.shots, args.test_queries or args.queries,
                                  args.test_tasks, seed=args.eval_seed), splits["train"].image_shape)
        except DataError as e:
            raise SystemExit(f"error: {e}")
        if processes() > 1 and self.writes:
            dist.barrier()
        if self.variant == "omniglot-small" and self.writes:  # said on every run: not full-Omniglot numbers
            classes = "/".join(str(self.data[split]["classes"]) for split in SPLITS)
            print(f"warning: no full Omniglot under --data-root {args.data_root}: this run uses the two small "
                  f"subsets (omniglot-small, {classes} train/val/test classes), not the full set's", file=sys.stderr)
        # during the data's loading or first conversion (its cache is written atomically): nothing started
        self._interrupted("interrupted before training started; nothing was written to a run directory")
        if min(data.image_shape[1:]) < POOL ** BLOCKS:  # both backbones pool BLOCKS times
            raise SystemExit(f"error: the backbone's {BLOCKS} poolings need images of at least {POOL ** BLOCKS}"
                             f"×{POOL ** BLOCKS} pixels; {args.dataset}'s are {data.image_shape}")
        return data

    def _generated_data(self) -> Data:
        """The sinusoid family's training sampler (drawn on the device) and its fixed validation and test sets (drawn
        once on the CPU, moved per batch)."""
        args = self.args
        self.data = {split: {**SINUSOID, "name": f"{args.dataset}/{split}"} for split in SPLITS}  # checked on --resume
        self.variant, self.source = args.dataset, "generated"
        try:
            return Data(SinusoidSampler(args.shots, args.queries, args.tasks, args.seed, self.device),
                        SinusoidEvalTasks("val", args.shots, args.queries, args.val_tasks, args.eval_seed, self.device),
                        SinusoidEvalTasks("test", args.shots, args.test_queries or args.queries, args.test_tasks,
                                          args.eval_seed, self.device), SINUSOID_SHAPE)
        except DataError as e:
            raise SystemExit(f"error: {e}")

    def restore(self, params: dict[str, torch.Tensor], state: dict, adam: torch.optim.Optimizer,
                sampler: TaskSampler) -> None:
        """Take the run directory (--resume, --out or a new name under runs/) and keep what its checkpoints hold. A
        new run writes config.json (every argument, the machine, the commit). --resume loads last.pt into params,
        state (a dict, updated in place), adam, sampler, the global RNG and the loops' position."""
        args, self.params, self.state, self.adam, self.sampler = self.args, params, state, adam, sampler
        stamp = time.strftime("%Y%m%d-%H%M%S")  # a new run's directory name ends with its start time
        new = f"{self.name}__{self.variant}__{args.ways}w{args.shots}s__t{args.tasks}__{args.seed}__{stamp}"
        self.dir = Path(args.resume or args.out or Path("runs") / new).expanduser()
        problem = self._take_dir() if self.writes else None
        if processes() > 1:  # the writer's directory (its stamp) and its verdict, for every process
            shared = [str(self.dir), problem]
            dist.broadcast_object_list(shared, src=0)
            self.dir, problem = Path(shared[0]), shared[1]
            if not problem and not (self.dir / LOCK).exists():  # process 0 made it: a node-local disk elsewhere
                raise SystemExit(f"error: process {process_rank()} does not see the run directory {self.dir} that "
                                 f"process 0 made: with several processes it must be on a file system all of them "
                                 f"see (e.g. the cluster's shared one), not a node's local disk")
        if problem:
            raise SystemExit(problem)
        last = self.dir / LAST
        if args.resume and last.exists():
            ckpt = load_checkpoint(last, args)
            if ckpt.get("data", self.data) != self.data:  # checkpoints before fingerprints: nothing to check
                raise SystemExit(f"error: {self.dir} was trained on other data than this command loads (--data-root "
                                 f"{args.data_root}): it recorded {describe_data(ckpt['data'])}, this command loads "
                                 f"{describe_data(self.data)}; resume with the run's own data (its --data-root was "
                                 f"{ckpt['args'].get('data_root')})")
            restore_params(params, ckpt["params"], last)
            state.clear()
            state.update(_to(ckpt["state"], self.device))
            adam.load_state_dict(ckpt["optimizer"])
            sampler_note = sampler.load_state_dict(ckpt["sampler"])
            torch.set_rng_state(ckpt["torch_rng"])
            self.loop = loop = _to(ckpt["loop"], self.device)
            at = f"epoch {loop['epoch'] + 1}, iteration {loop['iteration'] + 1}"
            if sampler_note:  # the numbers will differ from an uninterrupted run's
                self._note(f"resumed at {at}: {sampler_note}")
            self._repair_tasks_csv()
            self.progress.message(f"resuming {self.dir} at {at}")
            # Leftovers of a kill: checkpoints no longer (or not yet) in the top list (temp files: gone above).
            keep = {f"epoch{epoch:04d}.pt" for _, epoch in loop["top"]}
            for path in [p for p in self.dir.glob("epoch*.pt") if p.name not in keep and self.writes]:
                path.unlink()
        elif self.writes:  # a new run (or a resumed one killed before its first checkpoint: it starts again)
            write_json(self.dir / "config.json", {"program": program_name(args), "algorithm": self.name,
                                                  **dataclasses.asdict(args), "out": str(self.dir), "resume": "",
                                                  "torch": torch.__version__, **provenance(self.device),
                                                  "processes": processes(), "data_variant": self.variant,
                                                  "data": self.data})
        self.writer = tensorboard_writer(self.dir) if args.tensorboard and self.writes else None
        if self.writer is not None:
            self._exit.callback(self.writer.close)

    def _take_dir(self) -> str | None:
        """The writer's part of restore(): lock the run directory, clear a killed process's leftovers. Returns what
        forbids the run (a message), or None."""
        args, last = self.args, self.dir / LAST
        if not args.resume and (foreign := foreign_files(self.dir)):
            return (f"error: --out {self.dir} holds files that are not a run of this project ("
                    f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), which a run would "
                    f"overwrite or delete; choose a new or empty folder")
        try:
            self._exit.enter_context(lock_run_dir(self.dir))  # held until the block ends: one writer per directory
            for leftover in self.dir.glob("*.tmp"):  # of a process killed while writing here (none can write now)
                leftover.unlink()
        except SystemExit as e:
            return str(e)
        except OSError as e:
            return f"error: cannot clear {self.dir}'s unfinished files ({e}); check the folder's permissions"
        self.progress.message(self._start_line())
        if not args.resume and last.exists():
            return f"error: {self.dir} already holds a run; continue it with --resume {self.dir}"
        return None

    def _start_line(self) -> str:
        """Where a run writes, on what, from which data: the first line of its log."""
        args, device = self.args, self.device
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
        schedule = (f"{args.tasks} tasks per meta-iteration, {args.epochs} epochs x {args.iters_per_epoch} "
                    f"meta-iterations")
        if args.dataset in REGRESSION:
            return (f"run {self.dir}: {program_name(args)}.py on {device.type} ({machine}); data {self.variant}, "
                    f"generated (A in {SINUSOID['amplitude']}, phase in [0, pi], x in {SINUSOID['x']}); "
                    f"{args.shots} support and {args.queries} query points, {schedule}")
        counts = "/".join(f"{self.data[split]['classes']}" for split in SPLITS)
        return (f"run {self.dir}: {program_name(args)}.py on {device.type} ({machine}); data {self.variant} from "
                f"{self.source} ({counts} train/val/test classes); {args.ways}-way {args.shots}-shot, {args.queries} "
                f"queries, {schedule}")

    def _note(self, text: str) -> None:
        """What makes this run's files differ from an uninterrupted one's: said even with --quiet; in result.json."""
        if self.writes:
            print(f"warning: {text}", file=sys.stderr)
        self.loop.setdefault("notes", []).append(text)

    def _repair_tasks_csv(self) -> None:
        """tasks.csv cut to its last complete row where it lost bytes the last checkpoint counts (repair_csv)."""
        if (size := self.loop.get("tasks_size", 0)) and self.writes:
            self.loop["tasks_size"], note = repair_csv(self.dir / "tasks.csv", size)
            if note:
                self._note(f"epoch {self.loop['epoch'] + 1}: {note}")

    def save(self, path: Path) -> None:
        """A self-describing checkpoint of everything restore() fills, written atomically (by process 0 only)."""
        if not self.writes:
            return
        cpu = torch.device("cpu")
        ckpt = {"format": CHECKPOINT_FORMAT, "program": program_name(self.args), "algorithm": self.name,
                "args": dataclasses.asdict(self.args), "params": {n: p.detach().cpu() for n, p in self.params.items()},
                "state": _to(self.state, cpu), "optimizer": self.adam.state_dict(),
                "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(), "loop": _to(self.loop, cpu),
                "data": self.data}
        write_run_file(path, lambda f: torch.save(ckpt, f))

    def epochs(self) -> Iterator[int]:
        """The epochs still to run, from 0. After the last (or a divergence) the run is marked and last.pt saved."""
        loop = self.loop
        while loop["epoch"] < self.args.epochs and loop["status"] == "running":
            self.started = time.time()
            yield loop["epoch"]
        if loop["status"] == "running":
            loop["status"] = "finished"
        self.save(self.dir / LAST)  # also a diverged run: --resume then reports it again instead of training on
        if loop["history"] and self.writes:  # again: a kill between the last epoch's checkpoint and metrics.csv
            # loses no row
            write_csv(self.dir / "metrics.csv", loop["history"])
        # during the last validation or checkpoint: saved above
        self._interrupted(f"interrupted: saved {self.dir / LAST}; meta-test it with --resume {self.dir}")

    def iterations(self, sampler: TaskSampler) -> Iterator[Tasks]:
        """This epoch's meta-iterations still to run: a fresh batch of training tasks each. A signal received
        during the last one: last.pt saved, exit. Ends early when accept() has found the run diverged."""
        loop = self.loop
        while loop["iteration"] < self.args.iters_per_epoch:
            if self._stopping():
                loop["seconds"] += time.time() - self.started
                self.save(self.dir / LAST)
                self._interrupted(f"interrupted: saved {self.dir / LAST}; continue with --resume {self.dir}")
            yield sampler.sample()
            if loop["status"] != "running":
                return
            loop["iteration"] += 1
            self.progress.step(loop["epoch"], loop["iteration"] - 1, self.loss, self.acc)

    def accept(self, result: StepResult) -> bool:
        """Whether this meta-iteration's outer step may be taken: its loss and every meta-gradient finite (g² too: Adam
        squares it). One device-to-host read (flag, loss, accuracy), the step's only one: its numbers are summed on the
        device, read once per epoch. A non-finite step is skipped, counted; --max-bad-steps in a row stop the run
        (diverged)."""
        if processes() > 1:  # the loss, score and metrics of the whole batch (the meta-gradients are already its)
            result = self._over_processes(result)
        grads = [g for g in result.grads.values() if g is not None]
        finite = torch.stack([result.loss.isfinite()] + [g.square().isfinite().all() for g in grads]).all()
        finite, self.loss, self.acc = torch.stack([finite.to(result.loss.dtype), result.loss,
                                                   result.accuracy.to(result.loss.dtype)]).tolist()
        loop = self.loop
        if finite:
            numbers = {"train_loss": result.loss, f"train_{self.score.name}": result.accuracy, **result.metrics}
            for name, value in numbers.items():  # [sum, count]: a metric may come every n-th step only
                total = loop["sums"].setdefault(name, [0.0, 0])
                # a device tensor summed on the device; a host number (e.g. LWDGH's draw) on the host: no copy
                total[0], total[1] = total[0] + torch.as_tensor(value, dtype=torch.float64), total[1] + 1
            if result.per_task and loop["iteration"] < TASK_LOG:  # several processes: the whole batch's tasks, in order
                loop.setdefault("task_log", []).append([loop["iteration"] + 1, {
                    name: gather_over_processes(value.detach()) for name, value in result.per_task.items()}])
            loop["bad_streak"] = 0
            return True
        loop["skipped"] += 1  # a NaN or inf: skip this outer update, count it, stop after too many in a row
        loop["bad_streak"] += 1
        self.progress.message(f"epoch {loop['epoch'] + 1} iteration {loop['iteration'] + 1}: non-finite loss or "
                              f"meta-gradient, update skipped ({loop['bad_streak']} in a row)")
        if loop["bad_streak"] >= self.args.max_bad_steps:
            loop["status"] = "diverged"
        return False

    def _over_processes(self, result: StepResult) -> StepResult:
        """The loss, score and metrics of the batch from every process's over its equal share of tasks (or the same
        on all): their mean, in one all-reduce."""
        values = [result.loss, result.accuracy, *result.metrics.values()]
        means = sum_over_processes([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device)
                                                 for v in values])])[0] / processes()
        return result._replace(loss=means[0], accuracy=means[1], metrics=dict(zip(result.metrics, means[2:])))

    def _task_rows(self, epoch: int) -> list[dict]:
        """The epoch's logged per-task numbers as tasks.csv rows, read from the device at once."""
        rows, logged = self.loop.pop("tasks", []), self.loop.get("task_log", [])  # "tasks": rows of older versions
        if logged:
            names = list(logged[0][1])
            values = torch.stack([torch.stack([columns[name].to(self.device).double() for name in names])
                                  for _, columns in logged]).tolist()  # (iterations, names, tasks)
            rows += [{"epoch": epoch + 1, "iteration": iteration, "task": t, **dict(zip(names, task))}
                     for (iteration, _), numbers in zip(logged, values) for t, task in enumerate(zip(*numbers))]
        return rows

    def _stop_in_validation(self) -> None:
        """A signal during validation: save the epoch's training as last.pt (--resume validates it again), exit."""
        if self._stopping():
            self.loop["seconds"] += time.time() - self.started
            self.save(self.dir / LAST)
            self._interrupted(f"interrupted: saved {self.dir / LAST}; continue with --resume {self.dir}")

    def validate(self, predict: Callable[[Tasks], torch.Tensor], tasks: EvalTasks) -> None:
        """After an epoch: the score of `predict` (tasks -> query logits) on the fixed validation tasks, the
        epoch's row in metrics.csv, its per-task rows in tasks.csv, a checkpoint (kept while among the best
        --ensemble) and last.pt. Nothing when the run diverged in this epoch."""
        loop, args = self.loop, self.args
        if loop["status"] != "running":
            return
        epoch = loop["epoch"]
        score = self.score  # accuracy, or MSE: val_acc below is its value
        val_acc, val_ci = mean_ci(evaluate([predict], tasks, args.eval_batch, self._stop_in_validation)[0])
        sums = loop["sums"]  # the one read of the epoch's sums
        totals = torch.stack([torch.as_tensor(total, dtype=torch.float64, device=self.device)
                              for total, _ in sums.values()]).tolist() if sums else []
        means = {name: total / count for (name, (_, count)), total in zip(sums.items(), totals)}
        loop["history"].append({  # an epoch whose every update was skipped has no training numbers: NaN
            "epoch": epoch + 1, "train_loss": means.pop("train_loss", math.nan),
            f"train_{score.name}": means.pop(f"train_{score.name}", math.nan), f"val_{score.name}": val_acc,
            "val_ci": val_ci,
            "skipped_steps": loop["skipped"], "seconds": loop["seconds"] + time.time() - self.started, **means})
        if (rows := self._task_rows(epoch)) and self.writes:  # appended before the checkpoint that counts them
            self._repair_tasks_csv()  # the file may have been cut or deleted during the epoch
            loop["tasks_size"] = append_csv(self.dir / "tasks.csv", rows, loop.get("tasks_size", 0))
        loop.update(epoch=epoch + 1, iteration=0, sums={}, skipped=0, seconds=0.0, task_log=[])
        # Keep the best `ensemble` checkpoints by validation score; ties: the earlier epoch first, so that the
        # best checkpoint is max_val_epoch's, the earliest epoch of the best score (Chang & Lipson's
        # speed-up counts that epoch). The MAML++ reference (np.argsort(val_acc)[::-1]) orders ties the other way.
        ranked = sorted(loop["top"] + [[score.ranked(val_acc), epoch + 1]], key=lambda t: (-t[0], t[1]))
        loop["top"], evicted = ranked[:args.ensemble], ranked[args.ensemble:]
        if [score.ranked(val_acc), epoch + 1] in loop["top"]:
            self.save(self.dir / f"epoch{epoch + 1:04d}.pt")
        self.save(self.dir / LAST)  # written before the evicted files go: a crash in between loses nothing
        for _, old in evicted if self.writes else []:
            (self.dir / f"epoch{old:04d}.pt").unlink(missing_ok=True)
        if self.writes:
            write_csv(self.dir / "metrics.csv", loop["history"])
        if self.writer is not None:  # the same numbers as metrics.csv's row, one TensorBoard tag per column
            for key, value in loop["history"][-1].items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, epoch + 1)
            self.writer.flush()
        row = loop["history"][-1]
        self.progress.message(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f} {score.name} "
                              f"{score.text(row[f'train_{score.name}'])}, val {score.name} "
                              f"{score.interval(val_acc, val_ci)}")

    def meta_test(self, predict: Callable[[dict, dict, Tasks], torch.Tensor], tasks: EvalTasks) -> dict:
        """Meta-test the top checkpoints on the fixed test tasks, each model its own (params, state) in `predict`:
        their ensemble and the best one alone. Writes result.json and returns its dict."""
        args, loop, history = self.args, self.loop, self.loop["history"]
        # during the meta-test, between its batches: no result.json; the run is complete, --resume meta-tests it again
        interrupted = f"interrupted during the meta-test; its checkpoints are saved: --resume {self.dir}"
        # "best": the best validation score, the earliest epoch on ties, as the checkpoints' ranking (validate)
        score = self.score
        name, best_val = score.name, f"{score.best}_val"  # max_val_acc, min_val_mse
        best = max(history, key=lambda row: (score.ranked(row[f"val_{name}"]), -row["epoch"])) if history else None
        result = {"status": loop["status"], "data_variant": self.variant, "epochs_run": len(history),
                  f"{best_val}_{name}": best[f"val_{name}"] if best else None,
                  f"{best_val}_epoch": best["epoch"] if best else None,
                  f"test_{name}_ensemble": None, "test_ci_ensemble": None, f"test_{name}_best": None,
                  "test_ci_best": None, "ensemble_epochs": [epoch for _, epoch in loop["top"]],
                  "test_tasks": len(tasks)}
        if loop.get("notes"):  # what made this run differ from an uninterrupted one (a resume on another device)
            result["notes"] = loop["notes"]
        if processes() > 1:  # every process reads the checkpoints process 0 has finished writing
            dist.barrier()
        if loop["top"]:
            models = []
            for _, epoch in loop["top"]:
                path = self.dir / f"epoch{epoch:04d}.pt"
                params = {name: torch.empty_like(p) for name, p in self.params.items()}
                ckpt = load_checkpoint(path, args)
                restore_params(params, ckpt["params"], path)
                models.append(functools.partial(predict, params, _to(ckpt["state"], self.device)))
            (acc_ens, ci_ens), (acc_best, ci_best) = map(mean_ci, evaluate(
                models, tasks, args.eval_batch, functools.partial(self._interrupted, interrupted)))
            result.update({f"test_{name}_ensemble": acc_ens, "test_ci_ensemble": ci_ens, f"test_{name}_best": acc_best,
                           "test_ci_best": ci_best})
            self.progress.message(f"meta-test{'' if score.percent else ' MSE'}: ensemble of {len(models)} "
                                  f"{score.interval(acc_ens, ci_ens)}, best single {score.interval(acc_best, ci_best)}"
                                  + (" (result.json: fractions)" if score.percent else ""))
        self._interrupted(interrupted)  # a signal while loading the checkpoints, or with none to test
        if loop["status"] == "diverged":
            self.progress.message(f"diverged: {args.max_bad_steps} non-finite meta-iterations in a row; stopped")
        if self.writes:
            write_json(self.dir / "result.json", result)
        self.progress.message(f"run directory: {self.dir}")
        return result
