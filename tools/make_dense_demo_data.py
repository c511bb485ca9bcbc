"""Make a tiny detection set (COCO format) and a matching ADE20K-style segmentation set from Fashion-MNIST.

Each image is a noisy grey canvas with a few Fashion-MNIST items pasted at random places and scales
(no overlaps). Because every item is pasted from its own 28x28 glyph, the boxes, instance masks and
class maps are exact: an item's mask is its glyph's foreground (pixels above ``FOREGROUND``) after the
same nearest-neighbour resize.

Layout under ``OUT``::

    det/images/{train,val}/000000.png       det/annotations/instances_{train,val}.json  (COCO, RLE masks)
    seg/images/{train,val}/000000.png       seg/annotations/{train,val}/000000.png       (0 = background,
                                                                                          k + 1 = class k)

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` or ``$ATTNZOO_FASHION_MNIST_DIR`` (as the
classification demo); with ``--allow-random-glyphs`` a machine without it gets random blob glyphs instead (the
tests do this and say so).
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from attnzoo.training.data import FASHION_MNIST_SYSTEM_DIR as FASHION_MNIST_DIR  # noqa: E402

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
FOREGROUND = 32  # glyph pixels above this grey level belong to the item


def load_glyphs(n: int, rng: np.random.Generator, allow_random: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """``n`` glyphs ``[n, 28, 28]`` uint8 with labels, from Fashion-MNIST's test split (or random blobs)."""
    images, labels = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    if images.is_file() and labels.is_file():
        with gzip.open(images) as f:
            glyphs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(labels) as f:
            classes = np.frombuffer(f.read(), np.uint8, offset=8)
        idx = rng.choice(len(glyphs), size=n, replace=False)
        return glyphs[idx], classes[idx].astype(np.int64), "fashion-mnist"
    if not allow_random:
        raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: `sudo apt-get install "
                                "dataset-fashion-mnist`, or pass --allow-random-glyphs")
    yy, xx = np.mgrid[:28, :28]
    glyphs = []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(10, 18), rng.uniform(10, 18), rng.uniform(5, 12), rng.uniform(5, 12)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        glyphs.append(np.where(blob, rng.integers(80, 256), 0).astype(np.uint8))
    return np.stack(glyphs), rng.integers(0, len(CLASSES), size=n), "random-glyphs"


def make_split(out: Path, split: str, n_images: int, size: tuple[int, int], max_items: int,
               rng: np.random.Generator, allow_random: bool, start_id: int = 0) -> str:
    """Write ``n_images`` canvases of ``size`` (H, W) for ``split`` to the det and seg folders."""
    h, w = size
    glyphs, labels, source = load_glyphs(n_images * max_items, rng, allow_random)
    det_dir, seg_img_dir, seg_ann_dir = (out / "det/images" / split, out / "seg/images" / split,
                                         out / "seg/annotations" / split)
    for d in (det_dir, seg_img_dir, seg_ann_dir, out / "det/annotations"):
        d.mkdir(parents=True, exist_ok=True)
    images, annotations, g = [], [], 0
    for i in range(n_images):
        canvas = rng.integers(0, 40, size=(h, w), dtype=np.uint8)  # dark noise: items stay separable
        classmap = np.zeros((h, w), np.uint8)
        occupied = np.zeros((h, w), bool)
        for _ in range(int(rng.integers(1, max_items + 1))):
            glyph, label = glyphs[g], int(labels[g])
            g += 1
            side = int(rng.integers(max(16, min(h, w) // 6), max(17, min(h, w) // 2)))
            idx = (np.arange(side) * 28) // side  # nearest-neighbour resize
            big = glyph[idx][:, idx]
            mask = big > FOREGROUND
            if not mask.any():
                continue
            for _attempt in range(20):
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                if not occupied[y:y + side, x:x + side].any():
                    break
            else:
                continue
            occupied[y:y + side, x:x + side] = True
            full = np.zeros((h, w), bool)
            full[y:y + side, x:x + side] = mask
            canvas[full] = big[mask]
            classmap[full] = label + 1
            ys, xs = np.nonzero(full)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append(dict(
                id=len(annotations) + 1, image_id=start_id + i, category_id=label, iscrowd=0,
                bbox=[x0, y0, x1 - x0, y1 - y0], area=int(full.sum()), segmentation=_rle(full)))
        name = f"{start_id + i:06d}.png"
        rgb = np.repeat(canvas[..., None], 3, axis=2)
        Image.fromarray(rgb).save(det_dir / name)
        Image.fromarray(rgb).save(seg_img_dir / name)
        Image.fromarray(classmap).save(seg_ann_dir / name)
        images.append(dict(id=start_id + i, file_name=name, height=h, width=w))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=k, name=c) for k, c in enumerate(CLASSES)])
    (out / "det/annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return source


def _rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE of ``mask`` (column-major run lengths, starting with a background run): exact,
    unlike a polygon outline."""
    flat = mask.flatten(order="F")
    change = np.nonzero(np.diff(flat.astype(np.int8)))[0] + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return dict(size=[int(mask.shape[0]), int(mask.shape[1])], counts=[int(c) for c in counts])


def main(argv: list[str] | None = None) -> str:
    """Write the sets as ``argv`` asks; returns where the glyphs came from ("fashion-mnist" or "random-glyphs")."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--train", type=int, default=64, help="training images")
    p.add_argument("--val", type=int, default=16, help="validation images")
    p.add_argument("--size", type=int, nargs=2, default=(160, 192), metavar=("H", "W"), help="canvas size")
    p.add_argument("--max-items", type=int, default=4, help="items per image (at least one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-random-glyphs", action="store_true",
                   help="use random blobs when Fashion-MNIST is not installed")
    args = p.parse_args(argv)
    if min(args.size) < 32:
        p.error(f"--size: each side must be at least 32 pixels, got {tuple(args.size)}")
    if args.train < 1 or args.val < 1 or args.max_items < 1:
        p.error("--train, --val and --max-items must be at least 1")
    rng = np.random.default_rng(args.seed)
    source = make_split(args.out, "train", args.train, tuple(args.size), args.max_items, rng, args.allow_random_glyphs)
    make_split(args.out, "val", args.val, tuple(args.size), args.max_items, rng, args.allow_random_glyphs,
               start_id=args.train)
    print(f"wrote {args.train}+{args.val} images ({source}) to {args.out}")
    return source


if __name__ == "__main__":
    main()
