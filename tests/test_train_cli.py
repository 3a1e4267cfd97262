"""`edgeseg train` end to end on a tiny image/mask folder: checkpoint + curves PNG each epoch,
`--resume` continuing exactly, user errors reported with exit status 2."""
from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch

from edgeseg.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def folder(tmp_path):
    """8 scenes of 40x48: a bright square (class 1) on a dark noisy background (class 0)."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for k in range(8):
        img = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        y, x = rng.integers(0, 20), rng.integers(0, 28)
        img[y:y + 18, x:x + 18] = (40, 200, 240)
        mask[y:y + 18, x:x + 18] = 1
        cv2.imwrite(str(root / "images" / f"s{k}.png"), img)
        cv2.imwrite(str(root / "masks" / f"s{k}.png"), mask)
    (root / "labels.txt").write_text("ground 0 0 0\nsign 255 200 40\n")
    return root


def train_args(folder, out, *extra):
    return ["train", "--model", "unet", "--model-arg", "base=4", "--model-arg", "depth=2", "--data", str(folder),
            "--val-data", str(folder), "--batch-size", "4", "--size", "32", "32", "--loss", "dice+ce", "--lr", "0.01",
            "--out", str(out), "--quiet", *extra]


def test_train_writes_checkpoint_and_curves_and_resumes(folder, tmp_path, capsys):
    from edgeseg.models import load_checkpoint

    out = tmp_path / "run" / "unet.pt"
    assert main(train_args(folder, out, "--epochs", "1")) == 0
    assert "trained 1 epochs" in capsys.readouterr().out
    curves = tmp_path / "run" / "unet.curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, ckpt = load_checkpoint(out)
    assert ckpt["arch"] == {"name": "unet", "num_classes": 2, "kwargs": {"base": 4, "depth": 2}}
    assert ckpt["labels"] == ["ground", "sign"] and ckpt["palette"] == [[0, 0, 0], [255, 200, 40]]
    assert ckpt["preprocess"]["size"] == [32, 32]
    (first,) = ckpt["extra"]["history"]
    assert first["epoch"] == 1 and 0 <= first["val_miou"] <= 1 and np.isfinite(first["train_loss"])
    assert ckpt["extra"]["train_state"]["settings"]["loss"] == "dice+ce"

    # resume to 2 epochs; settings come from the checkpoint
    resumed = tmp_path / "run" / "resumed.pt"
    assert main(["train", "--data", str(folder), "--val-data", str(folder), "--resume", str(out), "--epochs", "2",
                 "--out", str(resumed), "--quiet"]) == 0
    _, ck2 = load_checkpoint(resumed)
    assert [e["epoch"] for e in ck2["extra"]["history"]] == [1, 2] and ck2["extra"]["history"][0] == first
    assert (tmp_path / "run" / "resumed.curves.png").is_file()

    # a finished run says how to go on
    assert main(["train", "--data", str(folder), "--resume", str(resumed), "--epochs", "2", "--out", str(resumed)]) == 2
    assert "already finished 2 epochs; pass --epochs above 2" in capsys.readouterr().err


def test_interrupted_run_resumes_exactly(folder, tmp_path, monkeypatch):
    from edgeseg import train
    from edgeseg.models import load_checkpoint

    straight = tmp_path / "straight.pt"
    assert main(train_args(folder, straight, "--epochs", "2")) == 0

    # the same run, interrupted right after epoch 1 was saved
    real_plot = train.plot_curves

    def plot_then_stop(history, path, title="", **kw):
        real_plot(history, path, title, **kw)
        raise KeyboardInterrupt

    run = tmp_path / "run.pt"
    monkeypatch.setattr(train, "plot_curves", plot_then_stop)
    assert main(train_args(folder, run, "--epochs", "2")) == 130
    monkeypatch.setattr(train, "plot_curves", real_plot)
    assert [e["epoch"] for e in load_checkpoint(run)[1]["extra"]["history"]] == [1]
    assert main(["train", "--data", str(folder), "--val-data", str(folder), "--resume", str(run), "--out", str(run), "--quiet"]) == 0
    _, a = load_checkpoint(run)
    _, b = load_checkpoint(straight)
    assert a["extra"]["history"][1]["train_loss"] == pytest.approx(b["extra"]["history"][1]["train_loss"], rel=1e-5)
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, msg=lambda m, k=k: f"{k}: {m}")


def test_backbone_weights_initialise_but_do_not_bind_the_checkpoint(folder, tmp_path):
    from edgeseg.models import load_checkpoint
    from edgeseg.models.resnet import ResNet

    weights = tmp_path / "encoder.pth"
    torch.save(ResNet(18, width=0.25).state_dict(), weights)
    out = tmp_path / "dl.pt"
    args = ["train", "--model", "deeplabv3plus_resnet", "--data", str(folder), "--size", "32", "32", "--epochs", "1",
            "--batch-size", "4", "--out", str(out), "--quiet", "--backbone-weights", str(weights)]
    for kv in ("depth=18", "width=0.25", "aspp_channels=16", "decoder_channels=16", "low_channels=8"):
        args += ["--model-arg", kv]
    assert main(args) == 0
    weights.unlink()  # the checkpoint must rebuild without the file it started from
    model, ckpt = load_checkpoint(out)
    assert "backbone_weights" not in ckpt["arch"]["kwargs"] and ckpt["arch"]["kwargs"]["depth"] == 18


def test_checkpoint_converts(folder, tmp_path):
    out = tmp_path / "m.pt"
    assert main(train_args(folder, out, "--epochs", "1", "--no-augment")) == 0
    assert main(["convert", str(out), "--out", str(tmp_path / "bundle")]) == 0
    assert (tmp_path / "bundle" / "manifest.json").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["--loss", "dice+nope"], "unknown loss 'nope'"),
    (["--size", "30", "30"], "multiples of 4"),
    (["--backbone-weights", "w.pth"], "does not take these options"),
    (["--num-classes", "1"], "fewer than the dataset's 2 classes"),
    (["--model-arg", "=3"], "KEY=VALUE"),
    (["--data", "voc:/nonexistent/VOC2012"], "not found"),
])
def test_user_errors_exit_2(folder, tmp_path, capsys, extra, message):
    args = train_args(folder, tmp_path / "x.pt", "--epochs", "1")
    for i, a in enumerate(extra):
        if a.startswith("--") and a in args and a not in ("--model-arg",):
            j = args.index(a)
            del args[j:j + (3 if a == "--size" else 2)]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
