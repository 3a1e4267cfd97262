"""The embedded default model really segments: held-out synthetic scenes, measured now."""
import numpy as np
import torch

from edgeseg.data.synthetic import LABELS, SyntheticScenes
from edgeseg.metrics import ConfusionMatrix
from edgeseg.spec import Preprocess
from edgeseg.train import DEFAULT_CHECKPOINT, DEFAULT_RECIPE


def test_held_out_miou(default_model):
    model, ckpt = default_model
    pre = Preprocess.from_dict(ckpt["preprocess"])
    assert ckpt["labels"] == LABELS and ckpt["arch"]["name"] == DEFAULT_RECIPE["model"]
    # the test split never overlaps the training split (different seed offsets)
    scenes = SyntheticScenes(size=pre.size, length=48, seed=DEFAULT_RECIPE["seed"], split="test")
    imgs, masks = zip(*(scenes[i] for i in range(len(scenes))))
    with torch.no_grad():
        pred = model(torch.from_numpy(pre.apply_batch(list(imgs)))).argmax(1).numpy()
    cm = ConfusionMatrix(len(LABELS)).update(pred, np.stack(masks))
    assert cm.miou() >= 0.85, cm.summary(LABELS)
    assert min(v for v in cm.summary(LABELS)["per_class_iou"].values()) > 0.75


def test_shipped_files_are_small_and_labelled():
    assert DEFAULT_CHECKPOINT.stat().st_size < 8e6
    labels = (DEFAULT_CHECKPOINT.parent / "labels.txt").read_text().split()
    assert labels == LABELS
    assert np.isclose(torch.load(DEFAULT_CHECKPOINT, weights_only=True)["extra"]["test"]["miou"], 0.95, atol=0.05)
