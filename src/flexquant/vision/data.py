"""Images in ImageFolder layout (root/<class>/<image>) as normalised tensors, read with PIL or numpy.

Pictures (PNG, JPEG, ...) need Pillow; ``.npy`` arrays (H×W, H×W×C or C×H×W; uint8 0–255 or float 0–1)
need only numpy and are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import VisionError

log = logging.getLogger(__name__)

PICTURE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
IMAGE_EXTS = PICTURE_EXTS | {".npy"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their class indices and the sorted class names of an ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise VisionError(f"image folder not found: {root} (expected root/<class>/<image files>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for idx, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                paths.append(f)
                labels.append(idx)
    if not paths:
        raise VisionError(
            f"no images found in {root}: expected class sub-folders holding {', '.join(sorted(IMAGE_EXTS))} files"
        )
    return paths, labels, classes


def _read_array(path: Path) -> np.ndarray:
    """H×W×3 float32 in [0, 1]."""
    if path.suffix.lower() == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise VisionError(f"cannot read {path} as a numpy array ({exc})") from None
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)  # C×H×W → H×W×C
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    else:
        try:
            from PIL import Image
        except ImportError:
            raise VisionError(
                f"reading {path.suffix} images needs Pillow (pip install pillow), or give .npy arrays"
            ) from None
        try:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except OSError as exc:
            raise VisionError(f"cannot read image {path} ({exc})") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise VisionError(f"{path}: expected an H×W, H×W×1 or H×W×3 image, got shape {a.shape}")
    return np.repeat(a, 3, axis=2) if a.shape[-1] == 1 else a


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a [C, H, W] image so its shorter side is `size`, then crop the centre square."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top : top + size, left : left + size]


def _normaliser(mean: Iterable[float], std: Iterable[float]):
    mean_t = torch.tensor(list(mean), dtype=torch.float32).reshape(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).reshape(3, 1, 1)
    return lambda img: (img - mean_t) / std_t


def _load(path: Path, image_size: int, norm) -> torch.Tensor:
    img = torch.from_numpy(np.ascontiguousarray(_read_array(path).transpose(2, 0, 1)))
    return norm(resize_center_crop(img, image_size))


def iter_image_folder(
    root: str | Path,
    image_size: int,
    batch_size: int = 64,
    mean: Iterable[float] = IMAGENET_MEAN,
    std: Iterable[float] = IMAGENET_STD,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream an ImageFolder tree as (images, labels) batches, for evaluation sets too large for memory."""
    paths, labels, _ = list_image_folder(root)
    norm = _normaliser(mean, std)
    for i in range(0, len(paths), batch_size):
        chunk = range(i, min(i + batch_size, len(paths)))
        yield torch.stack([_load(paths[j], image_size, norm) for j in chunk]), torch.tensor([labels[j] for j in chunk])


def load_image_folder(
    root: str | Path,
    image_size: int,
    mean: Iterable[float] = IMAGENET_MEAN,
    std: Iterable[float] = IMAGENET_STD,
    limit: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load an ImageFolder tree into (X [N, 3, S, S] normalised, y [N], class names).

    With `limit`, a seeded random subset of that many images is taken (e.g. for calibration).
    """
    paths, labels, classes = list_image_folder(root)
    order = np.arange(len(paths))
    if limit is not None and limit < len(paths):
        order = np.sort(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False))
    norm = _normaliser(mean, std)
    X = torch.empty(len(order), 3, image_size, image_size)
    for j, i in enumerate(order):
        X[j] = _load(paths[i], image_size, norm)
    y = torch.tensor([labels[i] for i in order], dtype=torch.long)
    log.info("loaded %d images of %d classes from %s", len(X), len(classes), root)
    return X, y, classes
