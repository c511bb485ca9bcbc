"""Smoke run: build every registered attnzoo model and run one small forward pass on CPU."""
import time

import timm
import torch

import attnzoo


def main() -> None:
    names = attnzoo.list_models()
    print(f"attnzoo {attnzoo.__version__}: {len(names)} registered models")
    for name in names:
        t0 = time.perf_counter()
        model = timm.create_model(name).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        with torch.no_grad():
            out = model(torch.randn(1, *size))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"  {name:28s} {params:7.1f} M params  logits {tuple(out.shape)}  {time.perf_counter() - t0:5.1f} s")


if __name__ == "__main__":
    main()
