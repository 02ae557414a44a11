"""The training loop: targets, joint augmentation, loss going down, checkpoints, resume."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from train_samples import disk_samples

from vrn.data.voxelize import volume_from_runs
from vrn.model import VRNConfig, load_checkpoint
from vrn.train.loop import (FLIP_68, Augmentation, TrainConfig, augment_sample,
                            heatmap_targets, train, volume_targets)

@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


TINY = VRNConfig(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1, residuals_b=1,
                 residuals_b_innermost=1, out_depth=8, input_size=32)


def _samples(n=4):
    return disk_samples(n)


def test_volume_targets_match_volume_from_runs():
    bounds = np.sort(np.random.default_rng(0).integers(0, 9, (4, 2, 32, 32)), axis=0)
    runs = torch.from_numpy(bounds.transpose(1, 0, 2, 3).reshape(2, 2, 2, 32, 32)
                            .astype(np.uint8))  # (N, K=2, 2, S, S): 2 runs per column
    full = volume_targets(runs, depth=8, size=32)
    np.testing.assert_array_equal(full.numpy().astype(bool),
                                  volume_from_runs(runs.numpy(), depth=8))
    assert full.sum() > 0
    coarse = volume_targets(runs, depth=8, size=16)
    idx = np.round(np.arange(16) * 31 / 15).astype(int)
    np.testing.assert_array_equal(coarse.numpy(), full.numpy()[:, :, idx][:, :, :, idx])


def test_heatmap_targets_peak_at_landmarks():
    lm = torch.tensor([[[10.0, 20.0]] * 68])
    heat = heatmap_targets(lm, input_size=32, size=32)
    assert heat.shape == (1, 68, 32, 32)
    assert np.unravel_index(int(heat[0, 0].argmax()), (32, 32)) == (20, 10)


def test_identity_augmentation_keeps_sample():
    image, runs, lm = _samples(1)[0]
    none = Augmentation(rotation=0, translation=0, scale=(1, 1), flip=0, color=(1, 1))
    img, runs2, lm2 = augment_sample(image, runs, lm, none, np.random.default_rng(0), depth=8)
    np.testing.assert_array_equal(runs2, runs)
    np.testing.assert_allclose(img, image / 255, atol=1e-6)
    np.testing.assert_allclose(lm2, lm, atol=1e-4)


def test_flip_mirrors_image_target_and_landmarks():
    image, runs, lm = _samples(1)[0]
    flip = Augmentation(rotation=0, translation=0, scale=(1, 1), flip=1.0, color=(1, 1))
    img, runs2, lm2 = augment_sample(image, runs, lm, flip, np.random.default_rng(0), depth=8)
    np.testing.assert_array_equal(runs2, runs[..., ::-1])
    np.testing.assert_allclose(lm2[FLIP_68[0]], [31 - lm[0, 0], lm[0, 1], lm[0, 2]], atol=1e-4)
    assert sorted(FLIP_68) == list(range(68)) and FLIP_68[36] == 45 and FLIP_68[48] == 54


def test_scaling_keeps_front_anchor():
    runs = np.zeros((2, 2, 32, 32), np.uint8)
    runs[0, 1, 8:24, 8:24] = 200 - 8  # the anchor: nearest point of the volume
    runs[0, 0, 8:24, 8:24] = 152
    runs[0, 1, 15, 15] = 150
    runs[1, 0, 18:23, 18:23], runs[1, 1, 18:23, 18:23] = 100, 120  # a second run behind
    grow = Augmentation(rotation=0, translation=0, scale=(1.2, 1.2), flip=0, color=(1, 1))
    _, out, _ = augment_sample(np.zeros((32, 32, 3), np.uint8), runs, None, grow,
                               np.random.default_rng(0), depth=200)
    assert out[0, 1].max() == 192
    assert out[0, 1, 15, 15] < 150  # 42 voxels behind the front become about 50
    assert out[0, 0, 12, 12] == 144  # the run's back end moves away from the anchor too
    assert tuple(out[1, :, 20, 20]) == (round(192 - 1.2 * 92), round(192 - 1.2 * 72))
    assert not out[..., 0, 0].any() and not out[1, :, 12, 12].any()


def test_a_few_steps_lower_the_loss(tmp_path):
    config = TrainConfig(model=TINY, epochs=30, batch_size=4, lr=1e-3,
                         augmentation=None, save_every=1000)
    losses = []
    result = train(_samples(), config, tmp_path, progress=False,
                   log=lambda step, loss: losses.append(loss))
    assert result["steps"] == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    model = load_checkpoint(tmp_path / "last.safetensors")
    assert model.info.trained and model.info.bn_mode == "instance"
    assert model.info.extra["step"] == "30"
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and float(rows[-1]["loss"]) > 0

    # Resume: continues the step count and the optimizer state.
    more = TrainConfig(model=TINY, epochs=32, batch_size=4, lr=1e-3,
                       augmentation=None, save_every=1000)
    result = train(_samples(), more, tmp_path, resume=True, progress=False)
    assert result["steps"] == 32
    with open(tmp_path / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 32

    # Fine-tuning: a new run that starts from those weights starts at their loss.
    tuned = []
    fine = TrainConfig(model=VRNConfig(features=8), epochs=1, batch_size=4, lr=1e-3,
                       augmentation=None, init_weights=str(tmp_path / "last.safetensors"))
    train(_samples(), fine, tmp_path / "fine", progress=False,
          log=lambda step, loss: tuned.append(loss))
    assert tuned[0] < 0.9 * losses[0]
    assert load_checkpoint(tmp_path / "fine" / "last.safetensors").config == TINY


@pytest.mark.parametrize("architecture", ["VRNMultitask", "VRNGuided"])
def test_landmark_variants_train(tmp_path, architecture):
    cfg = TINY if architecture == "VRNMultitask" else VRNConfig(
        **{**TINY.to_dict(), "in_channels": 71})
    config = TrainConfig(architecture=architecture, model=cfg, epochs=2, batch_size=2,
                         save_every=1000)
    losses = []
    result = train(_samples(2), config, tmp_path, progress=False,
                   log=lambda step, loss: losses.append(loss))
    assert result["steps"] == 2 and all(np.isfinite(losses))
    with open(tmp_path / "log.csv") as f:
        assert float(list(csv.DictReader(f))[-1]["landmark_loss"]) > 0
    assert load_checkpoint(tmp_path / "last.safetensors").architecture == architecture


def test_vrn_train_cli_on_an_aflw_folder(tmp_path, capsys):
    from fake_bfm import write_aflw_sample, write_bfm
    from vrn.cli.train import main

    basis, face = write_bfm(tmp_path / "bfm")
    write_aflw_sample(tmp_path / "data")
    code = main(["--aflw", str(tmp_path / "data"), "--bfm", str(basis), "--bfm-face", str(face),
                 "-o", str(tmp_path / "run"), "--features", "8", "--stacks", "1",
                 "--hourglass-depth", "1", "--residuals", "1", "1", "1", "--epochs", "2",
                 "--batch-size", "1", "--loss-size", "48", "--no-progress"])
    assert code == 0
    assert "2 steps" in capsys.readouterr().out
    model = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert model.config.out_depth == 200 and model.config.input_size == 192


def test_vrn_train_cli_needs_data(tmp_path, capsys):
    from vrn.cli.train import main

    assert main(["-o", str(tmp_path)]) == 2
    assert "--cache" in capsys.readouterr().err


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    from vrn.train import loop

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    loop._distributed()  # joins the process group
    # Every process writes its own checkpoint (normally only rank 0 does), to compare.
    loop._distributed = lambda: (0, world, rank)
    config = TrainConfig(model=TINY, epochs=2, batch_size=2, lr=1e-3, augmentation=None,
                         save_every=1000, device="cpu", seed=rank)  # different init and data
    train(_samples(), config, f"{out_dir}/rank{rank}", progress=False)


def test_distributed_processes_keep_identical_weights(tmp_path):
    """Under torchrun each process starts from its own seed and sees its own batches;
    DistributedDataParallel must broadcast the first weights and average the gradients,
    so every process ends with the same weights (gloo on CPU, two processes)."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    first, second = (load_file(str(tmp_path / f"rank{r}" / "last.safetensors"))
                     for r in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
