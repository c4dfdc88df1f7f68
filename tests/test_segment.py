"""The slice-segmentation core shared by the folder segmenter and MONAI Label, into in-memory sinks."""

import numpy as np
import torch
from scripts.infer.postprocess import PostProcessing
from scripts.infer.predict import SlicePredictor
from scripts.infer.segment import segment_volume
from scripts.io.sinks import ArraySink
from scripts.network.double_decoder import DoubleDecoderNet


def test_segment_volume_writes_every_kind_inside_the_range_and_zeros_outside():
    torch.manual_seed(0)
    predictor = SlicePredictor(DoubleDecoderNet(width=2, outputs="label"), tta=True, max_window=64)
    post = PostProcessing(threshold=0.0)
    volume = np.random.default_rng(0).normal(size=(7, 32, 48)).astype(np.float32)
    outputs = {"mask": np.zeros(volume.shape, np.uint8), "prob": np.zeros(volume.shape, np.uint8),
               "uncertainty": np.zeros(volume.shape, np.float16)}  # fmt: skip
    sinks = {kind: [ArraySink(array)] for kind, array in outputs.items()}

    foreground = segment_volume(volume, predictor, post, sinks, (2, 6), batch_size=3)

    expected = predictor.predict(volume[2:6])
    assert np.array_equal(outputs["mask"][2:6], post.slices(expected.label.numpy()))
    assert foreground == int(outputs["mask"].sum())
    prob = np.clip(np.rint((expected.label.numpy() + 1) / 2 * 255), 0, 255)
    assert np.array_equal(outputs["prob"][2:6], prob.astype(np.uint8))
    assert np.allclose(outputs["uncertainty"][2:6], expected.variance.numpy(), atol=1e-3)
    assert outputs["prob"][2:6].max() > 1 and (outputs["uncertainty"][2:6] > 0).any()
    for array in outputs.values():
        assert not array[:2].any() and not array[6:].any()
