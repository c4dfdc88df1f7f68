"""Export weights as a BioImage Model Zoo package (model description format 0.5), for Fiji's
deepImageJ, ilastik, napari and anything else that runs bioimage.io models.

The description is built with ``bioimageio.spec``'s own classes and written by its packager, so the
package is what the zoo's validator expects rather than hand-written YAML. The pytorch_state_dict
weights point at this bundle's ``double_decoder.py`` (the packager copies the file into the package:
the architecture is not duplicated here). TorchScript is scripted (any slice size); ONNX comes from
``scripts.network.export`` (traced: sizes in steps of 16, which the description demands anyway).

CLI (from ``bundle/``): ``python -m scripts.network.bioimageio models/model.pt OUT_DIR``
(``--sample TOMOGRAM`` takes the test slice from a tomogram instead of a simulated one; needs the
``bioimageio`` extra).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scripts.io.atomic import atomic_output
from scripts.io.volume import VolumeError, open_volume
from scripts.network import double_decoder
from scripts.network.bioimageio_card import CardFacts, write_cover, write_readme
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.network.export import export_onnx
from scripts.network.weights import WeightsError, WeightsInfo, load_weights, weights_info

__all__ = ["DOI", "HALO", "export_bioimageio", "standardise"]

DOI = "10.1073/pnas.2209938120"  # Dyhr, Sadeghi et al., PNAS 2023 (as in the project's method notes)
# Measured with the shipped weights (README of the package): tiles with 96 px of context give the
# whole slice's masks; 32 px change ~2 % of mask pixels, 64 px ~0.4 %.
HALO = 96
GRID = 16  # four 2x2 poolings
# The bundle divides by the standard deviation alone; the spec's step divides by (std + eps). The
# spec's default eps is the one bioimageio.core 0.11 applies whatever a description says, so every
# consumer agrees on it. Its effect relative to the bundle is eps / std: ~1e-5 on slices in 1/um
# (outputs move by up to ~2e-4, masks unchanged in the tests), nothing for integer-stored tomograms.
# (A scale_linear step before it cannot help: bioimageio.core computes the statistics on the raw input.)
EPS = 1e-6
TEST_SIZE = 256  # side of the test slice (a multiple of GRID)
ONNX_OPSET = 17
TAGS = ["cryo-SXT", "soft X-ray tomography", "membrane", "semi-supervised", "segmentation",
        "double-decoder", "2d", "pytorch"]  # fmt: skip
_INPUT, _OUTPUT = "raw", "membrane"


def standardise(image: np.ndarray) -> np.ndarray:
    """What the package's preprocessing does to a slice: ``(x - mean) / (std + EPS)``, float32."""
    image = np.asarray(image, dtype=np.float32)
    return ((image - image.mean()) / (image.std() + np.float32(EPS))).astype(np.float32)


def _min_size(halo: int) -> int:
    """The smallest size in steps of GRID that leaves at least one pixel after cropping the halo."""
    return GRID * (2 * halo // GRID + 1)


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size]


def _sample_slice(sample: str | os.PathLike, min_size: int) -> tuple[np.ndarray, str]:
    volume = open_volume(sample, allow_2d=True)
    image = np.asarray(volume.data[volume.shape[0] // 2], dtype=np.float32)
    size = min(TEST_SIZE, image.shape[0] // GRID * GRID, image.shape[1] // GRID * GRID)
    if size < min_size:
        raise VolumeError(
            f"{sample}: its slices ({image.shape[0]} x {image.shape[1]}) are smaller than the "
            f"model's minimum input of {min_size} x {min_size} pixels"
        )
    return _centre_crop(image, size), f"the middle slice of {Path(sample).name} ({size} x {size}, centre)"


def _simulated_slice(voxel_size_nm: float) -> tuple[np.ndarray, str]:
    try:  # the simulator is installed beside the bundle, not part of it: imported only here
        from cryosxt_sim.simulate import get_instrument, simulate_tomogram
    except ImportError as err:
        raise ValueError(
            "the simulator (cryosxt_sim) is not installed: pass --sample TOMOGRAM to take the "
            "test slice from a tomogram of yours"
        ) from err
    instrument = get_instrument("bessy", voxel_size_nm=voxel_size_nm)
    tomogram = simulate_tomogram((16, TEST_SIZE, TEST_SIZE), instrument, seed=0)
    what = (f"the middle slice of a simulated tomogram (cryosxt_sim, instrument 'bessy' at "
            f"{voxel_size_nm:g} nm voxels, seed 0, {TEST_SIZE} x {TEST_SIZE})")  # fmt: skip
    return tomogram.image[tomogram.image.shape[0] // 2].astype(np.float32), what


def _check_output(output: Path) -> None:
    """Never replace a folder of the user's: only a missing or empty one, or an earlier package."""
    if output.exists() and not output.is_dir():
        raise OSError(f"{output}: is a file; the package is written as a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / "rdf.yaml").is_file():
        raise OSError(f"{output}: folder is not empty and holds no earlier package (rdf.yaml); "
                      "choose a new or empty folder")  # fmt: skip


def _torchscript(net: DoubleDecoderNet, path: Path) -> None:
    with warnings.catch_warnings():  # torch 2.13 marks torch.jit deprecated; it is what consumers run
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(path))


def _onnx(weights: Path, path: Path, width: int) -> None:
    # The tracer warns that the padding is fixed: true, and harmless for sizes in steps of 16.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        export_onnx(weights, path, width=width, opset=ONNX_OPSET)


def _axes(voxel_size_nm: float, min_size: int, halo: int, output: bool) -> list:
    from bioimageio.spec.model import v0_5 as spec

    # Picometres, a whole number: bioimageio.spec 0.5.12 sizes an output as int(size * scale / scale),
    # which floors 240 * 9.8 / 9.8 to 239 and fails `bioimageio test` for the published 9.8 nm weights
    # (28.465 nm fails at 688, 912, ... pixels). Whole-number scales make that product exact.
    unit, scale = "picometer", max(1, round(voxel_size_nm * 1000))
    channel = spec.Identifier(_OUTPUT if output else _INPUT)
    axes: list = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[channel])]
    for name in ("y", "x"):
        axis_id = spec.AxisId(name)
        if output:
            size = spec.SizeReference(tensor_id=spec.TensorId(_INPUT), axis_id=axis_id)
            axes.append(spec.SpaceOutputAxisWithHalo(id=axis_id, size=size, halo=halo, unit=unit, scale=scale))
        else:
            size = spec.ParameterizedSize(min=min_size, step=GRID)
            axes.append(spec.SpaceInputAxis(id=axis_id, size=size, unit=unit, scale=scale))
    return axes


def _describe(stage: Path, info: WeightsInfo, width: int, voxel_size_nm: float, halo: int, bundle: Path):
    """The model description, every file in ``stage`` except the architecture and the licence (the
    bundle's files)."""
    from bioimageio.spec.model import v0_5 as spec

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text(encoding="utf-8"))
    min_size = _min_size(halo)
    torch_version = spec.Version(torch.__version__.split("+")[0])
    proc_axes = [spec.AxisId("channel"), spec.AxisId("y"), spec.AxisId("x")]  # per sample: all but batch
    inputs = spec.InputTensorDescr(
        id=spec.TensorId(_INPUT),
        description="cryo-SXT slice, any intensity unit; standardised per slice by the preprocessing",
        axes=_axes(voxel_size_nm, min_size, halo, output=False),
        test_tensor=spec.FileDescr(source=stage / "test_input.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(axes=proc_axes, eps=EPS)),
        ],
    )  # fmt: skip
    outputs = spec.OutputTensorDescr(
        id=spec.TensorId(_OUTPUT),
        description="label branch, tanh in [-1, 1]; threshold at 0: above 0 is membrane",
        axes=_axes(voxel_size_nm, min_size, halo, output=True),
        test_tensor=spec.FileDescr(source=stage / "test_output.npy"),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(-1.0, 1.0)),
    )
    kwargs = {"width": width, "outputs": "label", "pad_mode": "reflect"}
    architecture = spec.ArchitectureFromFileDescr(
        source=Path(double_decoder.__file__), callable=spec.Identifier("DoubleDecoderNet"), kwargs=kwargs
    )
    weights = spec.WeightsDescr(
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=stage / "weights.pt", architecture=architecture, pytorch_version=torch_version,
            comment=f"state dict of {info.path.name} (width {width})",
        ),
        torchscript=spec.TorchscriptWeightsDescr(
            source=stage / "weights.torchscript.pt", pytorch_version=torch_version,
            parent="pytorch_state_dict", comment="torch.jit.script: any slice size",
        ),
        onnx=spec.OnnxWeightsDescr(
            source=stage / "weights.onnx", opset_version=ONNX_OPSET, parent="pytorch_state_dict",
            comment="traced: height and width in steps of 16",
        ),
    )  # fmt: skip
    return spec.ModelDescr(
        name="Cryo-SXT membrane segmentation (double decoder)",
        description="Membranes in cryo-soft X-ray tomogram slices: the label branch of the semi-supervised "
                    "double-decoder network of Dyhr, Sadeghi et al., PNAS 2023.",
        authors=[spec.Author(name=metadata["authors"])],
        cite=[spec.CiteEntry(
            text="Dyhr, Sadeghi et al. 3D-surface reconstruction of cellular cryo-soft X-ray microscopy "
                 "tomograms using semi-supervised deep learning. PNAS 120(24), e2209938120 (2023).",
            doi=spec.Doi(DOI))],
        license=spec.LicenseId("MIT"),
        attachments=[spec.FileDescr(source=bundle / "LICENSE")],
        documentation=spec.FileDescr(source=stage / "README.md"),
        covers=[spec.FileDescr(source=stage / "cover.png")],
        tags=TAGS,
        inputs=[inputs],
        outputs=[outputs],
        weights=weights,
        version=metadata["version"],  # the bundle's
    )  # fmt: skip


def _voxel_size(info: WeightsInfo, given: float | None) -> float:
    """The weights' pixel size in nm: the package states it on every spatial axis."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, (int, float)) or not 0 < given < 1e6:
            raise ValueError(f"voxel_size_nm must be a positive number of nanometres, got {given!r}")
        if info.voxel_size_nm is not None and abs(given - info.voxel_size_nm) > 1e-6 * info.voxel_size_nm:
            raise WeightsError(
                f"{info.path}: trained at {info.voxel_size_nm:g} nm (its sidecar), but "
                f"--voxel_size_nm {given:g} was given; drop the option"
            )
        return float(given)
    if info.voxel_size_nm is None:
        raise WeightsError(
            f"{info.path}: pixel size unknown (no sidecar {info.path.name}.json, or one that "
            "describes other weights); give the size it was trained at: --voxel_size_nm N"
        )
    return info.voxel_size_nm


def export_bioimageio(
    weights: str | os.PathLike,
    output: str | os.PathLike,
    sample: str | os.PathLike | None = None,
    halo: int = HALO,
    voxel_size_nm: float | None = None,
) -> str:
    """Write ``weights`` as a bioimage.io model package folder ``output`` (``output/rdf.yaml``).

    Args:
        weights: a weights file the bundle reads (its sidecar ``WEIGHTS.json`` gives the voxel size).
        output: the package folder: new, empty, or an earlier package (replaced whole, atomically).
        sample: a tomogram (any format the bundle reads) whose middle slice, cut to at most 256 x 256,
            becomes the test input; default: a slice simulated at the weights' voxel size.
        halo: pixels per side a tiling consumer discards (see ``HALO``).
        voxel_size_nm: the pixel size the weights were trained at, for weights without a sidecar
            (the sidecar's value otherwise; giving both requires them to agree).
    """
    try:  # an optional extra: the bundle runs without it
        import bioimageio.spec as bioimageio_spec
    except ImportError as err:
        raise RuntimeError(
            "bioimageio.spec is not installed: pip install -e '.[bioimageio]' (from the repository root)"
        ) from err
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 1:
        raise ValueError(f"halo must be a positive whole number of pixels, got {halo!r}")
    output = Path(output)
    _check_output(output)
    info = weights_info(weights)
    voxel = _voxel_size(info, voxel_size_nm)
    net = load_weights(DoubleDecoderNet(width=info.width, outputs="label"), info.path).eval()
    min_size = _min_size(halo)
    image, what = (_sample_slice(sample, min_size) if sample is not None
                   else _simulated_slice(voxel))  # fmt: skip
    with torch.no_grad():
        label = net(torch.from_numpy(standardise(image))[None, None]).numpy()
    bundle = Path(double_decoder.__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="bioimageio-") as tmp:
        stage = Path(tmp)
        np.save(stage / "test_input.npy", image[None, None])
        np.save(stage / "test_output.npy", label.astype(np.float32))
        torch.save(net.state_dict(), stage / "weights.pt")  # a plain state dict, whatever the input held
        _torchscript(net, stage / "weights.torchscript.pt")
        _onnx(stage / "weights.pt", stage / "weights.onnx", info.width)
        write_cover(stage / "cover.png", image, label[0, 0])
        write_readme(stage / "README.md", CardFacts(
            weights_name=info.path.name, width=info.width, voxel_size_nm=voxel, halo=halo,
            min_size=min_size, recipe=info.recipe, trained_on=info.trained_on, test_slice=what, doi=DOI,
        ))  # fmt: skip
        descr = _describe(stage, info, info.width, voxel, halo, bundle)
        with atomic_output(output) as folder:
            bioimageio_spec.save_bioimageio_package_as_folder(descr, output_path=folder)
    print(f"wrote {output / 'rdf.yaml'} (width {info.width}, {voxel:g} nm pixels, halo {halo})")
    return str(output / "rdf.yaml")


def main() -> None:
    """Command line: bad input ends on one ``ERROR:`` line naming the file."""
    from scripts.cli import run_main

    run_main(export_bioimageio, name="python -m scripts.network.bioimageio")


if __name__ == "__main__":
    main()
