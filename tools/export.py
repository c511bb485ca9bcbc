#!/usr/bin/env python3
"""Export a model for deployment: ONNX (checked with onnx.checker and in ONNX Runtime against PyTorch) or
a torch.export ExportedProgram (.pt2). The graph takes normalised [B, C, H, W] images; B is dynamic.

    python tools/export.py --model nat_tiny --format onnx --input-size 3 224 224 --output nat_tiny.onnx
    python tools/export.py --model dinat_tiny --pretrained-path dinat_tiny_in1k_224.pth --format onnx \\
        --input-size 3 224 224 --dynamic-size --output dinat_tiny.onnx
    python tools/export.py --model biformer_small --features-only --format export --input-size 3 512 512 \\
        --output biformer_small_backbone.pt2
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parser() -> argparse.ArgumentParser:
    from attnzoo.export import FORMATS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="registered model name, e.g. nat_tiny")
    p.add_argument("--checkpoint", metavar="FILE", help="attnzoo training checkpoint (.pth.tar) to load")
    p.add_argument("--pretrained-path", metavar="FILE", help="official weights file to load (timm's pretrained path)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx: .onnx file; export: torch.export .pt2")
    p.add_argument("--input-size", required=True, nargs=3, type=int, metavar=("C", "H", "W"),
                   help="input channels, height and width of the example (and the checked) input")
    p.add_argument("--dynamic-size", action="store_true",
                   help="make H and W dynamic too (refused for models whose graph would only hold at some sizes)")
    p.add_argument("--features-only", action="store_true",
                   help="export the backbone's feature maps, not the classifier")
    p.add_argument("--output", required=True, metavar="FILE", help="file to write (.onnx or .pt2)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from attnzoo.export import ExportError, build_model, export

    try:
        model = build_model(args.model, args.checkpoint, args.pretrained_path, args.features_only)
        result = export(model, args.format, args.input_size, args.output, dynamic_size=args.dynamic_size,
                        overwrite=args.overwrite)
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    size = "x".join(map(str, result.input_size[1:]))
    if result.dynamic_size:
        size = "dynamic, " + ", ".join(f"{k} >= {lo}" + (f" and <= {hi}" if hi else "")
                                       for k, (lo, hi) in result.size_range.items())
    print(f"wrote {result.path} ({result.format}; batch dynamic, size {size}); checked against PyTorch: "
          f"relative L2 {result.rel_l2:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
