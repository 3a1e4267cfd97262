"""Instance training data and held-out scoring (edgeseg.train_instances), and `edgeseg train` on an
instance architecture."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseg.data import SyntheticInstances
from edgeseg.spec import Preprocess
from edgeseg.train_instances import InstanceReaderDataset, collate_instances, evaluate_instances, place_instances

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_targets_are_placed_like_the_image():
    """A 96 x 160 frame letterboxed into 128 x 128: boxes and masks land where the image does."""
    reader = SyntheticInstances(size=(96, 160), length=3, split="test")
    pre = Preprocess(size=(128, 128), resize="letterbox")
    lb = pre.letterbox((96, 160))
    for stride in (1, 4):
        ds = InstanceReaderDataset(reader, pre, mask_stride=stride)
        for i in range(len(ds)):
            x, t = ds[i]
            _, ann = reader[i]
            assert x.shape == (3, 128, 128) and t["masks"].shape[1:] == (128 // stride, 128 // stride)
            assert t["masks"].dtype == torch.uint8 and t["classes"].tolist() == ann.class_id.tolist()
            for box, m, fbox in zip(t["boxes"].numpy(), t["masks"].numpy(), ann.xyxy):
                ys, xs = np.nonzero(m > 0)
                # the pixels the object covers span its box (to a mask pixel), and the box is the frame box scaled
                np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box / stride, atol=1.01)
                s = np.array([lb.width / 160, lb.height / 96] * 2)  # the image's own scale per axis
                np.testing.assert_allclose(box, fbox * s + np.array([lb.left, lb.top] * 2), atol=1e-4)


def test_flip_moves_boxes_with_the_masks():
    reader = SyntheticInstances(size=(128, 128), length=8, split="test")
    pre = Preprocess(size=(128, 128))
    plain = InstanceReaderDataset(reader, pre)
    aug = InstanceReaderDataset(reader, pre, augment=True, seed=3)
    flipped = 0
    for i in range(len(reader)):
        (x0, t0), (x1, t1) = plain[i], aug[i]
        if torch.equal(t0["masks"], t1["masks"].flip(-1)) and not torch.equal(t0["masks"], t1["masks"]):
            flipped += 1
            torch.testing.assert_close(t1["boxes"][:, [0, 2]], 128 - t0["boxes"][:, [2, 0]])
        else:
            assert torch.equal(t0["masks"], t1["masks"]) and torch.equal(t0["boxes"], t1["boxes"])
    assert 0 < flipped < len(reader)
    again = InstanceReaderDataset(reader, pre, augment=True, seed=3)
    assert torch.equal(again[5][0], aug[5][0])  # sample i of an epoch is fixed by (seed, epoch, i)


def test_collate_pads_with_minus_one():
    reader = SyntheticInstances(size=(64, 64), length=6, split="train", max_objects=4)
    ds = InstanceReaderDataset(reader, Preprocess(size=(64, 64)))
    items = [ds[i] for i in range(6)]
    x, t = collate_instances(items)
    g = max(len(it[1]["classes"]) for it in items)
    assert x.shape == (6, 3, 64, 64) and t["boxes"].shape == (6, g, 4) and t["masks"].shape == (6, g, 16, 16)
    for i, (_, ti) in enumerate(items):
        n = len(ti["classes"])
        assert t["classes"][i, :n].tolist() == ti["classes"].tolist() and (t["classes"][i, n:] == -1).all()


class Oracle(torch.nn.Module):
    """Returns the ground truth of the frames it is given, in the box-relative detections layout."""

    def __init__(self, reader, pre: Preprocess, k: int = 8, m: int = 28):
        super().__init__()
        import cv2

        self.k, self.m, self.calls = k, m, 0
        self.outputs = []
        for i in range(len(reader)):
            img, ann = reader[i]
            boxes, masks = place_instances(ann, pre, img.shape[:2])
            o = [np.zeros((k, 4), np.float32), np.zeros(k, np.float32), np.zeros(k, np.int64), np.zeros((k, m, m), np.float32)]
            for j, (b, mk) in enumerate(zip(boxes, masks)):
                x0, y0, x1, y1 = (int(round(v)) for v in b)
                o[0][j], o[1][j], o[2][j] = b, 0.9, ann.class_id[j]
                o[3][j] = cv2.resize(mk[y0:y1, x0:x1].astype(np.float32) / 255, (m, m), interpolation=cv2.INTER_AREA)
            self.outputs.append(o)

    def instance_layout(self):
        from edgeseg.instance_layout import InstanceLayout

        return InstanceLayout("detections", 4, mask_space="box", max_detections=self.k, score_threshold=0.05).to_dict()

    def forward(self, x):
        rows = self.outputs[self.calls: self.calls + len(x)]
        self.calls += len(x)
        return tuple(torch.from_numpy(np.stack([r[i] for r in rows])) for i in range(4))


def test_held_out_scores_go_through_the_runtime_postprocessing():
    pytest.importorskip("pycocotools")
    reader = SyntheticInstances(size=(96, 128), length=6, split="test")
    pre = Preprocess(size=(128, 128), resize="letterbox")
    s = evaluate_instances(Oracle(reader, pre), reader, pre, batch_size=4)
    assert s["images"] == 6 and s["objects"] == s["detections"]
    assert s["mask"]["AP50"] > 0.99 and s["box"]["AP50"] > 0.99 and s["mask"]["AP"] > 0.6


def test_edgeseg_train_runs_an_instance_model(tmp_path):
    from edgeseg import models
    from edgeseg.train import TrainError, train_model

    kw = dict(width=0.25, fpn_channels=32, representation_size=64, mask_channels=16, rpn_pre_nms_top_n=(100, 50),
              rpn_post_nms_top_n=(50, 20), detections_per_img=10)
    out = tmp_path / "m.pt"
    r = train_model("maskrcnn_resnet", "synthetic?n=4&size=64", val_data="synthetic:val?n=2&size=64", out=out, epochs=1,
                    batch_size=2, size=(64, 64), model_kwargs={"preset": "compact", **kw}, progress=False)
    assert r["metric"] == "mask AP50" and 0.0 <= r["best"] <= 1.0
    model, ckpt = models.load_checkpoint(out)
    assert ckpt["labels"] == SyntheticInstances.labels and model.detections_per_img == 10
    assert set(ckpt["extra"]["history"][0]) >= {"train_loss", "val_mask_ap50", "val_box_ap50"}
    assert ckpt["extra"]["train_state"]["settings"]["loss"] == "model"
    assert (tmp_path / "m.curves.png").stat().st_size > 0
    with pytest.raises(TrainError, match="own objective"):
        train_model("maskrcnn_resnet", "synthetic?n=4&size=64", out=out, loss="dice", size=(64, 64), progress=False)
    assert models.task("maskrcnn_resnet") == "instance-segmentation" and models.task("unet") == "semantic-segmentation"
