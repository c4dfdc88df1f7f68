"""Semi-supervised training: engine, data pipeline and the bundle configs, on tiny simulated data."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts.io.labels import LabelError
from scripts.io.volume import write_volume
from scripts.network.double_decoder import DoubleDecoderNet
from scripts.train.engine import (
    LABELED,
    UNLABELED,
    AlternatingLoader,
    SemiSupervisedTrainer,
    unlabeled_parameters,
)
from scripts.train.labels import label_to_target
from scripts.train.losses import LabeledLoss, UnlabeledLoss
from scripts.train.slices import LoadSliced
from scripts.train.workflow import prepare_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
TINY = [  # 4 px wide network, 64 px crops, no worker processes
    "--width",
    "4",
    "--patch_size",
    "64",
    "--num_workers",
    "0",
    "--progress_bar",
    "false",
    "--learning_rate",
    "0.001",
    "--labeled_repeats",
    "2",
]


def _env() -> dict[str, str]:
    # One thread per process: the CPU is shared, and oversubscribed threads run far slower.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _bundle(args: list[str], cwd: Path, timeout: int = 240, launcher: list[str] | None = None) -> str:
    cmd = [*(launcher or [sys.executable, "-m"]), "monai.bundle", "run", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def _history(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 labeled + 1 unlabeled simulated tomograms of 8 x 64 x 64 (one slice left unannotated)."""
    from cryosxt_sim.simulate import main as simulate

    root = tmp_path_factory.mktemp("tiny")
    simulate(out=str(root), count=2, shape="8,64,64", seed=0, instrument="bessy", unlabeled=1)
    label_path = sorted((root / "labels").glob("*.mrc"))[0]
    from scripts.io.volume import open_volume

    label = np.array(open_volume(label_path).data)
    label[3] = 255
    write_volume(label_path, label, 9.8)
    return root


@pytest.fixture(scope="module")
def trained_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four epochs through the real bundle runner, from the repository root."""
    out = tmp_path_factory.mktemp("run")
    _bundle(
        [
            "training",
            "--config_file",
            str(CONFIGS / "train.json"),
            "--dataset_dir",
            str(tiny_dataset),
            "--output_dir",
            str(out),
            "--train#trainer#max_epochs",
            "4",
            *TINY,
        ],
        cwd=REPO,
    )
    return out


# ----------------------------------------------------------------------------- engine


def _batches(n: int, labeled: bool, size: int = 32) -> list[dict]:
    gen = torch.Generator().manual_seed(n + labeled)
    out = []
    for _ in range(n):
        image = torch.randn(2, 1, size, size, generator=gen)
        batch = {"image": image}
        if labeled:
            batch["label"] = torch.where(image > 0.5, 1.0, -1.0)
            batch["mask"] = torch.ones_like(image)
        out.append(batch)
    return out


def _trainer(net: DoubleDecoderNet) -> SemiSupervisedTrainer:
    return SemiSupervisedTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=_batches(2, True),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3, eps=1e-7),
        loss_function=LabeledLoss(),
        unlabeled_data_loader=_batches(2, False),
        unlabeled_optimizer=torch.optim.Adam(unlabeled_parameters(net), 1e-3, eps=1e-7),
        unlabeled_loss_function=UnlabeledLoss(data_range=8.0),
    )


def _segmentation_state(net: DoubleDecoderNet, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {}
    for prefix in ("label_decoder", "label_head"):
        for name, value in [*getattr(net, prefix).named_parameters(), *getattr(net, prefix).named_buffers()]:
            state[f"{prefix}.{name}"] = value.detach().clone()
    for i, p in enumerate(net.segmentation_parameters()):
        for key, value in optimizer.state.get(p, {}).items():
            state[f"adam.{i}.{key}"] = value.clone()
    return state


def test_unlabeled_step_leaves_segmentation_decoder_untouched():
    torch.manual_seed(0)
    net = DoubleDecoderNet(width=2)
    trainer = _trainer(net)
    trainer._iteration(trainer, {**_batches(1, True)[0], "phase": LABELED})  # Adam moments now exist
    before = _segmentation_state(net, trainer.optimizer)
    assert any(k.startswith("adam.") for k in before)
    encoder_before = copy.deepcopy(net.encoder.state_dict())

    output = trainer._iteration(trainer, {**_batches(1, False)[0], "phase": UNLABELED})

    assert output["phase"] == UNLABELED and torch.isfinite(output["loss"])
    after = _segmentation_state(net, trainer.optimizer)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key  # weights, BN running stats, Adam moments
    seg_ids = {id(p) for p in net.segmentation_parameters()}
    assert not any(id(p) in seg_ids for p in trainer.unlabeled_optimizer.state)
    changed = [k for k, v in net.encoder.state_dict().items() if not torch.equal(v, encoder_before[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)
    assert net.outputs == "both"  # the image-only switch is undone


def test_alternating_plans():
    labeled, unlabeled = list(range(4)), list(range(3))
    blocks = AlternatingLoader(labeled, unlabeled, schedule="blocks")
    assert blocks.plan() == [LABELED] * 4 + [UNLABELED] * 3
    capped = AlternatingLoader(labeled, unlabeled, schedule="blocks", unlabeled_steps_per_epoch=5)
    assert capped.plan() == [LABELED] * 4 + [UNLABELED] * 5
    ratio = AlternatingLoader(labeled, unlabeled, schedule="ratio", labeled_steps=2, unlabeled_steps=1)
    assert ratio.plan() == [LABELED, LABELED, UNLABELED] * 2
    assert AlternatingLoader(labeled, None).plan() == [LABELED] * 4
    assert AlternatingLoader(labeled, []).plan() == [LABELED] * 4


# ----------------------------------------------------------------------------- data pipeline


def test_label_mapping_and_lazy_slice_loading(tmp_path: Path):
    raw = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    target, mask = label_to_target(raw)
    assert target.tolist() == [[-1, 1], [-1, 1]] and mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(LabelError, match=r"cell.mrc: label values 2 \(first at slice z=4\)"):
        label_to_target(np.array([[0, 1], [255, 2]], dtype=np.uint8), "cell.mrc", 4)  # not membrane
    image = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    label = np.zeros((3, 4, 5), np.uint8)
    label[1, 0, 0], label[1, 3, :] = 1, 255
    write_volume(tmp_path / "i.mrc", image, 10.0)
    write_volume(tmp_path / "l.mrc", label, 10.0)
    out = LoadSliced()({"image": str(tmp_path / "i.mrc"), "label": str(tmp_path / "l.mrc"), "z": 1})
    assert out["image"].shape == (1, 4, 5) and out["image"].dtype == torch.float32
    assert torch.equal(out["image"][0], torch.from_numpy(image[1]))
    assert out["label"][0, 0, 0] == 1 and out["label"][0, 1, 1] == -1
    assert out["mask"][0, 3].sum() == 0 and out["mask"][0, :3].min() == 1
    assert out["image_path"] == str(tmp_path / "i.mrc")


def test_load_sliced_refuses_a_label_slice_with_other_values(tmp_path: Path):
    write_volume(tmp_path / "i.mrc", np.zeros((3, 4, 5), np.float32), 10.0)
    label = np.zeros((3, 4, 5), np.uint8)
    label[2, 1, 1] = 7
    write_volume(tmp_path / "l.mrc", label, 10.0)
    item = {"image": str(tmp_path / "i.mrc"), "label": str(tmp_path / "l.mrc"), "z": 2}
    with pytest.raises(LabelError, match=r"l.mrc: label values 7 \(first at slice z=2\)"):
        LoadSliced()(item)


def _parser(reference: bool = False, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    extra = [str(CONFIGS / "reference_recipe.json")] if reference else []
    parser.read_config([str(CONFIGS / "train.json"), *extra])
    parser.update(overrides)
    return parser


def test_augmentation_moves_image_label_and_mask_together(tmp_path: Path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 40, 52)).astype(np.float32)
    label = (image > 0.3).astype(np.uint8)
    label[:, :5] = 255  # unannotated rows must follow the geometry too
    write_volume(tmp_path / "i.mrc", image, 10.0)
    write_volume(tmp_path / "l.mrc", label, 10.0)
    # the reference recipe's geometry (the robust recipe's own tests are in test_augment.py)
    transform = _parser(reference=True, patch_size=48).get_parsed_content("train#preprocessing")
    transform.set_random_state(seed=1)
    for _ in range(8):
        d = transform({"image": str(tmp_path / "i.mrc"), "label": str(tmp_path / "l.mrc"), "z": 1})
        assert d["image"].shape == d["label"].shape == d["mask"].shape == (1, 48, 48)
        # standardised image > 0.3 threshold maps to label +1 wherever the pixel is annotated and not pad
        real = d["image"] != 0
        std_threshold = (0.3 - image[1].mean()) / image[1].std()
        annotated = (d["mask"] > 0) & real
        assert torch.equal((d["image"] > std_threshold)[annotated], (d["label"] > 0)[annotated])
        assert d["mask"][~real].sum() == 0  # padding is never annotated


def test_rotation_k_is_uniform_over_four_values():
    from monai.transforms import RandRotate90d

    transforms = _parser().get_parsed_content("train#preprocessing").transforms
    (rot,) = [t for t in transforms if isinstance(t, RandRotate90d)]
    rot.set_random_state(seed=0)
    counts = np.zeros(4)
    for _ in range(4000):
        rot.randomize(None)
        counts[rot._rand_k if rot._do_transform else 0] += 1
    assert np.all(np.abs(counts / 4000 - 0.25) < 0.03), counts


# ----------------------------------------------------------------------------- bundle runs


def test_train_config_properties_and_supervised_only_switch(tiny_dataset: Path, tmp_path: Path):
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow = ConfigWorkflow(
            config_file=str(CONFIGS / "train.json"),
            workflow_type="train",
            dataset_dir=str(tiny_dataset),
            output_dir=str(tmp_path),
            width=2,
            num_workers=0,
        )
        workflow.initialize()
        assert workflow.check_properties() == []
        assert UNLABELED in workflow.trainer.data_loader.plan()
        # the ablation: one override, same network and labeled data, no unlabeled branch
        supervised = ConfigWorkflow(
            config_file=str(CONFIGS / "train.json"),
            workflow_type="train",
            dataset_dir=str(tiny_dataset),
            output_dir=str(tmp_path),
            width=2,
            num_workers=0,
            semi_supervised="false",
        )
        supervised.initialize()
        trainer = supervised.trainer
    assert trainer.unlabeled_data_loader is None
    assert set(trainer.data_loader.plan()) == {LABELED}
    assert len(trainer.data_loader.plan()) == len(workflow.trainer.labeled_data_loader)


def test_multi_class_label_stops_the_bundle_run_before_training(tiny_dataset: Path, tmp_path: Path):
    import shutil

    from scripts.io.volume import open_volume

    dataset, out = tmp_path / "D", tmp_path / "run"
    shutil.copytree(tiny_dataset, dataset)
    label_path = sorted((dataset / "labels").glob("*.mrc"))[-1]
    label = np.array(open_volume(label_path).data)
    label[5, :4, :4] = 3  # a third class
    write_volume(label_path, label, 9.8)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(dataset),
        "--output_dir",
        str(out),
        *TINY,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{label_path}: label values 3 (first at slice z=5) are not allowed" in log, log[-3000:]
    assert not any(out.glob("*.pt")) and not (out / "history.jsonl").exists()  # nothing trained


def test_training_lowers_loss_and_writes_outputs(trained_run: Path):
    history = _history(trained_run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_labeled_loss"] < history[0]["train_labeled_loss"]
    assert "train_unlabeled_loss" in history[0] and "val_f1" in history[0]
    for name in ("last.pt", "model.pt"):
        assert (trained_run / name).is_file()
    assert any((trained_run / "tensorboard").iterdir())
    state = torch.load(trained_run / "model.pt", weights_only=True)
    DoubleDecoderNet(width=4).load_state_dict(state)  # a plain state dict of the network
    last = torch.load(trained_run / "last.pt", weights_only=True)
    assert {"network", "optimizer", "unlabeled_optimizer", "trainer", "evaluator"} <= set(last)
    assert last["trainer"]["iteration"] == 4 * last["trainer"]["epoch_length"]  # Ignite derives the epoch


def test_resume_continues_from_saved_epoch(trained_run: Path, tiny_dataset: Path, tmp_path: Path):
    run = tmp_path / "resumed"
    run.mkdir()
    for name in ("last.pt", "history.jsonl", "model.pt"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    # From bundle/, with the plain `run` id and a relative config path.
    log = _bundle(
        [
            "--config_file",
            "configs/train.json",
            "--dataset_dir",
            str(tiny_dataset),
            "--output_dir",
            str(run),
            "--train#trainer#max_epochs",
            "5",
            "--resume",
            "true",
            *TINY,
        ],
        cwd=REPO / "bundle",
    )
    assert "Restored all variables" in log
    assert [h["epoch"] for h in _history(run)] == [1, 2, 3, 4, 5]
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 5 * _history(trained_run)[0]["iteration"]


def test_evaluate_config_writes_json_and_csv(trained_run: Path, tiny_dataset: Path, tmp_path: Path):
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow = ConfigWorkflow(
            config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
            workflow_type=None,
            run_id="evaluating",
            dataset_dir=str(tiny_dataset),
            output_dir=str(tmp_path),
            ckpt_path=str(trained_run / "model.pt"),
            num_workers=0,
        )
        workflow.initialize()
        workflow.run()
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["overall"]["slices"] == 15  # 2 x 8 slices, one unannotated
    assert len(report["per_volume"]) == 2
    assert set(report["overall"]) >= {"accuracy", "precision", "recall", "f1", "dice", "image_accuracy"}
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("volume,slices,accuracy") and rows[-1].startswith("overall,15,")


def test_ddp_gloo_two_processes(tiny_dataset: Path, tmp_path: Path):
    """torchrun, 2 CPU processes (gloo), one semi-supervised epoch of the multi-GPU config."""
    out = tmp_path / "ddp"
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launcher.append("-m")
    log = _bundle(
        [
            "training",
            "--config_file",
            configs,
            "--dataset_dir",
            str(tiny_dataset),
            "--output_dir",
            str(out),
            "--train#trainer#max_epochs",
            "1",
            *TINY,
        ],
        cwd=REPO,
        launcher=launcher,
    )
    history = _history(out)  # written by rank 0 only
    assert len(history) == 1 and "train_unlabeled_loss" in history[0]
    split = prepare_data(tiny_dataset)  # train slices x 2 repeats, then the unlabeled slices, halved per rank
    n_labeled, n_unlabeled = 2 * len(split["train"]), len(split["unlabeled"])
    assert history[0]["iteration"] == math.ceil(n_labeled / 2) + math.ceil(n_unlabeled / 2)
    assert (out / "last.pt").is_file() and "Traceback" not in log


def test_fine_tuning_starts_from_init_weights_with_their_width(trained_run: Path, tiny_dataset: Path, tmp_path: Path):
    from monai.bundle import ConfigWorkflow
    from scripts.io.weights_metadata import read_metadata
    from scripts.network.weights import read_state_dict

    start = trained_run / "last.pt"  # a run's checkpoint: only its network is taken
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow = ConfigWorkflow(
            config_file=str(CONFIGS / "train.json"),
            workflow_type="train",
            dataset_dir=str(tiny_dataset),
            output_dir=str(tmp_path / "w"),
            num_workers=0,
            init_weights=str(start),  # no width: the file's
        )
        workflow.initialize()
    loaded = workflow.parser.get_parsed_content("network").state_dict()
    for key, value in read_state_dict(start).items():
        torch.testing.assert_close(loaded[key], value, msg=key)

    out = tmp_path / "tuned"
    args = [a for a in TINY if a not in ("--width", "4")]
    log = _bundle(
        [
            "training",
            "--config_file",
            str(CONFIGS / "train.json"),
            "--dataset_dir",
            str(tiny_dataset),
            "--output_dir",
            str(out),
            "--train#trainer#max_epochs",
            "1",
            "--init_weights",
            str(start),
            *args,
        ],
        cwd=REPO,
    )
    assert "training starts from the weights of" in log
    tuned, scratch = _history(out), _history(trained_run)
    assert [h["epoch"] for h in tuned] == [1]  # a new run (resume would have continued at epoch 5)
    assert tuned[0]["train_labeled_loss"] < scratch[0]["train_labeled_loss"]
    meta = read_metadata(out / "model.pt")
    assert meta.width == 4 and meta.init_weights.startswith("last.pt (sha256 ")
    assert "starting from last.pt" in meta.trained_on


def test_init_weights_of_another_width_fail_before_training(trained_run: Path, tiny_dataset: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--dataset_dir",
        str(tiny_dataset),
        "--output_dir",
        str(out),
        "--init_weights",
        str(trained_run / "model.pt"),
        *TINY[2:],
        "--width",
        "8",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "is a width-4 network but width 8 was asked for" in last, last
    assert not (out / "history.jsonl").exists()
