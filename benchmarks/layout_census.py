"""Count the NHWC maps that Inductor's generated code stores with H innermost (``attnzoo.blocks.tokens``).

Reads ``TORCH_LOGS=output_code`` logs (or the generated modules) and lists every ``empty_strided_*`` buffer
``[B, H, W, C]`` with H == W != C > 1 whose strides are NCHW channels-last strides of that logical shape, i.e.
stride 1 on H. The round-12 counts in ``NOTES_timm_twins.md`` came from

    TORCH_LOGS=output_code python -m benchmarks.tokens_layout --variant nhwc --warm davit_t 2> davit_t_nhwc.log
    python -m benchmarks.layout_census davit_t_nhwc.log
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

_BUFFER = re.compile(r"(buf\d+) = empty_strided_\w+\(\(([\d, ]+)\), \(([\d, ]+)\)")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def h_innermost_maps(code: str, nhwc_shape: tuple[int, ...] | None = None) -> list[tuple[str, list[int], list[int]]]:
    """``(buffer, shape, strides)`` of each stored NHWC map whose fastest axis is H.

    Those strides equal an NCHW map's channels-last strides, so without ``nhwc_shape`` (a shape known to be
    NHWC) only square maps whose channel count differs from their side are taken as NHWC.
    """
    found = []
    for name, shape, stride in ((m[1], _ints(m[2]), _ints(m[3])) for m in _BUFFER.finditer(code)):
        if len(shape) != 4 or (nhwc_shape is not None and tuple(shape) != tuple(nhwc_shape)):
            continue
        B, H, W, C = shape
        nhwc = nhwc_shape is not None or (H == W and H != C and C > 1)
        if nhwc and stride == [H * W * C, 1, H * C, H]:
            found.append((name, shape, stride))
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("logs", nargs="+", type=Path)
    for path in ap.parse_args(argv).logs:
        maps = h_innermost_maps(path.read_text())
        for name, shape, stride in maps:
            print(f"  {name} {shape} {stride}")
        print(f"{path}: {len(maps)} maps with H innermost")


if __name__ == "__main__":
    main()
