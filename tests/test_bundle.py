"""The bundle meets the MONAI Bundle Specification: metadata, network in/out, workflow properties."""

import json
import subprocess
import sys

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from scripts.io.volume import write_volume

from conftest import REPO

CONFIGS = REPO / "bundle" / "configs"
MANDATORY = [
    "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
    "required_packages_version", "task", "description", "authors", "copyright", "network_data_format",
]  # fmt: skip


def test_metadata_has_the_mandatory_keys():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert [k for k in MANDATORY if k not in meta] == []
    assert meta["version"] in meta["changelog"]
    for io in ("inputs", "outputs"):
        for spec in meta["network_data_format"][io].values():
            assert len(spec["spatial_shape"]) == 2
    assert (CONFIGS / "logging.conf").is_file()


def test_verify_net_in_out_passes():
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
         "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--n", "4"],
        cwd=REPO / "bundle", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("configs", "workflow_type"),
    [(["inference.json"], "infer"), (["train.json"], "train")],
)
def test_workflow_configs_have_every_required_property(configs, workflow_type, tmp_path):
    # A real (tiny) dataset: the workflow evaluates its dataset entries.
    for folder, value in (("images", 0.5), ("labels", 1), ("unlabeled", 0.5)):
        (tmp_path / folder).mkdir()
        data = np.full((2, 32, 32), value, np.float32 if folder != "labels" else np.uint8)
        data[:, :16] = 0
        write_volume(tmp_path / folder / f"{folder}.mrc", data, voxel_size_nm=10.0)
    (tmp_path / "labels" / "labels.mrc").rename(tmp_path / "labels" / "images.mrc")
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"), workflow_type=workflow_type,
        dataset_dir=str(tmp_path / ("images" if workflow_type == "infer" else "")),
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    workflow.initialize()
    assert workflow.check_properties() == []
