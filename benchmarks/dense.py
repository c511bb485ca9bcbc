"""Mask R-CNN training step on attnzoo kernels vs the reference paths: NAT-T and BiFormer-S backbones.

One forward+backward (``model.loss`` on synthetic 1333x800 images with boxes and masks, batch 2, fp16
autocast) built from the shipped 1x configs without pretrained weights; the same model is timed with
``set_attention_backend(model, "auto")`` (the attnzoo kernels) and ``"reference"``. Peak memory is the
CUDA high-water mark of one step above what the model and inputs already hold. Target (issue 11): kernels
>= 2x faster and <= 1/2 the peak memory of the reference path.

    python -m benchmarks.dense [--quick] [--out DIR]      # needs the 'dense' extra and a CUDA device
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from attnzoo.blocks import set_attention_backend
from benchmarks.harness import RESULTS_DIR, Report, peak_memory_mib, time_ms

CONFIGS = {
    "NAT-T": "configs/mmdet/nat/mask-rcnn_nat-tiny_fpn_1x_coco.py",
    "BiFormer-S": "configs/mmdet/biformer/mask-rcnn_biformer-small_fpn_1x_coco.py",
}
REPO = Path(__file__).resolve().parents[1]


def build(config: str, device: str) -> torch.nn.Module:
    """The detector of ``config`` (random init, no checkpoint download) in training mode on ``device``."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(str(REPO / config))
    init_default_scope(cfg.default_scope)
    from mmdet.registry import MODELS

    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model).to(device).train()


def batch(model: torch.nn.Module, n: int, h: int, w: int, boxes: int = 8) -> dict:
    """A preprocessed batch of ``n`` random ``h``x``w`` images with ``boxes`` boxes and box-shaped masks each."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 32 + torch.rand(boxes, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25])
        bboxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(boxes, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(bboxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        inst = InstanceData(bboxes=bboxes, labels=torch.randint(0, 80, (boxes,), generator=g),
                            masks=BitmapMasks(masks.numpy(), h, w))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        sample.gt_instances = inst
        samples.append(sample)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for _ in range(n)]
    # the detector's own preprocessor: normalisation, padding to stride 32, batch_input_shape (not timed)
    return model.data_preprocessor(dict(inputs=images, data_samples=samples), True)


def step(model: torch.nn.Module, data: dict, dtype: torch.dtype) -> None:
    """One forward+backward under autocast; gradients are dropped so repeated calls do not accumulate."""
    with torch.autocast("cuda", dtype=dtype):
        losses = model.loss(data["inputs"], data["data_samples"])
    loss, _ = model.parse_losses(losses)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small image and few repetitions (a smoke run)")
    # fp16 by default: mmcv 2.1's CUDA RoIAlign has no bfloat16 kernel (bf16 fails inside the RoI head).
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="fp16")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.dense needs a CUDA device (the reference path on CPU is not the comparison)")
    import attnzoo.openmmlab  # noqa: F401  (registers AttnZooBackbone)

    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    n, h, w = (1, 320, 512) if args.quick else (2, 800, 1333)
    report = Report("dense", f"Mask R-CNN forward+backward, {n}x{h}x{w}, {args.dtype} autocast",
                    columns=["backbone", "backend", "ms", "peak MiB", "speed-up", "memory ratio"],
                    notes="Random init, synthetic boxes/masks (8 per image), shipped 1x configs; "
                          "peak = CUDA high-water mark of one step above model + inputs.")
    for name, config in CONFIGS.items():
        model = build(config, "cuda")
        data = batch(model, n, h, w)
        results = {}
        for backend in ("reference", "auto"):
            set_attention_backend(model, backend)
            run = functools.partial(step, model, data, dtype)
            ms = time_ms(run, warmup=100 if not args.quick else 10, rep=500 if not args.quick else 20)
            mib = peak_memory_mib(run)
            results[backend] = (ms, mib)
        ref_ms, ref_mib = results["reference"]
        for backend, (ms, mib) in results.items():
            report.add(backbone=name, backend=backend, ms=ms, **{"peak MiB": mib,
                       "speed-up": ref_ms / ms, "memory ratio": mib / ref_mib if ref_mib else None})
        del model, data
        torch.cuda.empty_cache()
    js, md = report.save(args.out)
    print(report.markdown())
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
