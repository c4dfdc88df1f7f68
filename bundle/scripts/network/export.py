"""ONNX export of the segmentation network (TorchScript export is MONAI's ``ckpt_export``).

CLI (from ``bundle/``): ``python -m scripts.network.export models/model.pt model.onnx`` (the width is
read from the weights; ``--width N`` overrides it).

The exported graph takes ``(N, 1, H, W)`` float32 standardised slices with H and W multiples of 16
(batch, height and width are dynamic) and returns the tanh label map. Tracing fixes the network's own
padding to the example's size, so callers pad to a multiple of 16 themselves.
"""

from __future__ import annotations

import os

import torch
from scripts.io.atomic import atomic_output
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.weights import load_weights, weights_info

__all__ = ["export_onnx"]


def export_onnx(
    weights: str | os.PathLike,
    output: str | os.PathLike,
    width: int | None = None,
    opset: int = 17,
    outputs: str = "label",
) -> str:
    """Export ``weights`` as an ONNX model with dynamic batch, height and width (``width``: the weights')."""
    width = weights_info(weights).width if width is None else int(width)
    net = load_weights(DoubleDecoderNet(width=width, outputs=outputs), weights).eval()
    example = torch.zeros(1, 1, 64, 64)
    names = ["pred"] if outputs != "both" else ["pred", "image"]
    axes = {name: {0: "batch", 2: "height", 3: "width"} for name in ["image_in", *names]}
    with atomic_output(output) as tmp:
        # The TorchScript-based exporter handles this network's control flow without onnxscript.
        torch.onnx.export(
            net, (example,), str(tmp), input_names=["image_in"], output_names=names, dynamic_axes=axes,
            opset_version=opset, dynamo=False,
        )  # fmt: skip
    print(f"wrote {output} (width {width}, outputs {outputs})")
    return str(output)


if __name__ == "__main__":
    import fire

    fire.Fire(export_onnx)
