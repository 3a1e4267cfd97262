"""The embedded default instance model: its recipe and the script that trains it.

    python -m edgeseg.train_default_instance        # writes edgeseg/assets/default_instance.pt

Images go through the deployment preprocessing (`Preprocess.resize_image` / `normalize`), and
each object's box and mask are placed like the image (letterbox included). A batch is padded to
a fixed number of objects: `InstanceReaderDataset` gives (image (3, H, W), {"boxes" (G, 4) xyxy
input pixels, "classes" (G,) with -1 for padding, "masks" (G, H/s, W/s) uint8 0..255: the share
of each pixel the object covers}), which the default collate stacks and every instance model's
`training_loss(images, targets)` takes. After each epoch the model is scored with COCO box and
mask AP (pycocotools) on held-out scenes through the runtime's own post-processing, so the
figure is the one a bundle gives.

Scenes are generated once and kept in memory, and training runs on one thread: on the shared
two-core machine the model was made on, one thread trained 4x faster than two (measured).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from edgeseg.errors import EdgesegError
from edgeseg.progress import Bar, bar
from edgeseg.spec import Preprocess

ASSETS = Path(__file__).parent / "assets"
DEFAULT_INSTANCE_CHECKPOINT = ASSETS / "default_instance.pt"
# The recipe of the embedded default instance model: change it only together with the shipped weights.
DEFAULT_INSTANCE_RECIPE = {
    "model": "yoloseg",
    "model_kwargs": {"encoder": "mobilenetv3_small", "width": 0.5, "channels": 32, "num_masks": 16, "proto_channels": 32},
    "size": [192, 320],  # 16:9-ish, so the 640x360 demo clip is barely distorted
    "train_scenes": 1200,
    "val_scenes": 100,
    "epochs": 10,
    "batch_size": 16,
    "lr": 4e-3,
    "seed": 0,
    "threads": 1,
}
MAX_OBJECTS = 32  # objects per image a batch holds (more are dropped, largest kept)


class InstanceTrainError(EdgesegError, ValueError):
    """A training set or model output the recipe cannot use."""


# -- targets -------------------------------------------------------------------------------------
def place_targets(ann, pre: Preprocess, frame_hw, max_objects: int = MAX_OBJECTS, mask_stride: int = 4):
    """An image's InstanceAnnotations placed in the network input: boxes (G, 4) float32 input
    pixels, classes (G,) int64 (-1 padding), masks (G, H/s, W/s) uint8 coverage 0..255."""
    H, W = pre.size
    lb = pre.letterbox(tuple(frame_hw))
    sx, sy = lb.width / frame_hw[1], lb.height / frame_hw[0]
    mh, mw = H // mask_stride, W // mask_stride
    boxes = np.zeros((max_objects, 4), np.float32)
    classes = np.full(max_objects, -1, np.int64)
    masks = np.zeros((max_objects, mh, mw), np.uint8)
    order = np.argsort(-ann.areas, kind="stable")[:max_objects]
    for g, i in enumerate(order):
        placed = np.zeros((H, W), np.float32)
        placed[lb.top:lb.top + lb.height, lb.left:lb.left + lb.width] = cv2.resize(
            ann.masks[i].astype(np.float32), (lb.width, lb.height), interpolation=cv2.INTER_LINEAR)
        masks[g] = np.clip(np.rint(cv2.resize(placed, (mw, mh), interpolation=cv2.INTER_AREA) * 255), 0, 255).astype(np.uint8)
        x0, y0, x1, y1 = ann.xyxy[i]
        boxes[g] = (x0 * sx + lb.left, y0 * sy + lb.top, x1 * sx + lb.left, y1 * sy + lb.top)
        classes[g] = ann.class_id[i]
    return boxes, classes, masks


def _jitter(img: np.ndarray, rng: np.random.Generator, strength: float = 0.2) -> np.ndarray:
    b, c, s = 1 + rng.uniform(-1, 1, 3) * strength
    img = img * b
    m = img.mean()
    img = (img - m) * c + m
    grey = img.mean(2, keepdims=True)
    return np.clip((img - grey) * s + grey, 0, 255)


class InstanceReaderDataset(torch.utils.data.Dataset):
    """An instance reader as a torch Dataset of (image, padded targets); `augment`: horizontal
    flips and colour jitter drawn from rng(seed, epoch, index)."""

    def __init__(self, reader, pre: Preprocess, augment: bool = False, seed: int = 0, max_objects: int = MAX_OBJECTS,
                 mask_stride: int = 4, cache: bool = False):
        if pre.dtype != "float32" or pre.layout != "nchw":
            raise InstanceTrainError("training needs a float32 NCHW preprocessing")
        self.reader, self.pre, self.augment, self.seed = reader, pre, bool(augment), int(seed)
        self.max_objects, self.mask_stride, self.epoch = int(max_objects), int(mask_stride), 0
        self._cache = {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.reader)

    def _sample(self, i: int):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img, ann = self.reader[i]
        sample = (self.pre.resize_image(img), *place_targets(ann, self.pre, img.shape[:2], self.max_objects, self.mask_stride))
        if self._cache is not None:
            self._cache[i] = sample
        return sample

    def __getitem__(self, i: int):
        x, boxes, classes, masks = self._sample(int(i))
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            if rng.random() < 0.5:
                W = self.pre.size[1]
                x, masks = x[:, ::-1], masks[:, :, ::-1]
                live = classes >= 0
                boxes = boxes.copy()
                boxes[live, 0], boxes[live, 2] = W - boxes[live, 2], W - boxes[live, 0]
            x = _jitter(x, rng)
        x = self.pre.normalize(np.ascontiguousarray(x, np.float32)).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(x)), {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes)), "classes": torch.from_numpy(classes),
            "masks": torch.from_numpy(np.ascontiguousarray(masks))}


# -- scoring ------------------------------------------------------------------------------------
def model_outputs(model, x: torch.Tensor, layout) -> dict:
    """An instance model's eval outputs by the names its layout gives them (numpy)."""
    from edgeseg.instance_layout import OUTPUT_ROLES, InstanceLayout

    L = InstanceLayout.from_dict(layout)
    with torch.no_grad():
        out = model(x)
    if isinstance(out, dict):
        return {k: v.numpy() for k, v in out.items()}
    roles = OUTPUT_ROLES[L.layout]
    if len(out) != len(roles):
        raise InstanceTrainError(f"the model returned {len(out)} outputs; its {L.layout!r} layout has {len(roles)} ({', '.join(roles)})")
    return {L.outputs[r]: v.float().numpy() if v.is_floating_point() else v.numpy() for r, v in zip(roles, out)}


def evaluate_instances(model, reader, pre: Preprocess, labels, layout=None, palette=None, limit: int | None = None,
                       progress: bool = False) -> dict:
    """COCO box and mask AP of a torch instance model on a reader, through the runtime's
    post-processing at each image's own size (edgeseg.instance_metrics)."""
    from edgeseg.bundle import default_palette
    from edgeseg.instance_metrics import InstanceEvaluator
    from runtime.instance_postprocess import InstancePostprocessor

    layout = layout or model.instance_layout()
    post = InstancePostprocessor(labels, palette or default_palette(len(labels)), pre, layout)
    ev = InstanceEvaluator(labels)
    model.eval()
    n = len(reader) if limit is None else min(limit, len(reader))
    with (bar("held-out AP", total=n, unit="images") if progress else Bar()) as b:
        for i in range(n):
            img, ann = reader[i]
            x = torch.from_numpy(pre.apply(img))
            ev.add(post(model_outputs(model, x, layout), img.shape[:2]), ann)
            b.update()
    return ev.summary()


# -- the loop -------------------------------------------------------------------------------------
def fit_instances(model, train, val_reader=None, *, pre: Preprocess, labels, epochs: int, batch_size: int = 8,
                  lr: float = 2e-3, seed: int = 0, on_epoch=None, progress: bool = True, start_epoch: int = 0,
                  optimizer_state: dict | None = None, history: list | None = None, val_limit: int | None = 200) -> list:
    """Train with AdamW and a one-cycle schedule; mask AP50 on `val_reader` after each epoch."""
    torch.manual_seed(seed)
    n = len(train)
    if n == 0:
        raise InstanceTrainError("the training set is empty")
    steps = max(1, n // batch_size)
    total = epochs * steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    if optimizer_state:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
    history = list(history or [])
    for epoch in range(start_epoch, epochs):
        model.train()
        if hasattr(train, "set_epoch"):
            train.set_epoch(epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=order[: steps * batch_size].tolist())
        t0, running = time.time(), 0.0
        with (bar(f"epoch {epoch + 1}/{epochs}", total=steps, unit="batches") if progress else Bar()) as b:
            for s, (xb, tb) in enumerate(loader):
                loss = model.training_loss(xb, tb)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {s}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
                sched.step()
                running += loss.item()
                b.note(f"loss {running / (s + 1):.3f}")
                b.update()
        record = {"epoch": epoch + 1, "train_loss": running / steps, "seconds": round(time.time() - t0, 1)}
        if val_reader is not None:
            summary = evaluate_instances(model, val_reader, pre, labels, limit=val_limit)
            record.update({"val_mask_AP50": summary["mask"]["AP50"], "val_mask_AP": summary["mask"]["AP"],
                           "val_box_AP50": summary["box"]["AP50"]})
        history.append(record)
        if progress:
            extra = f" held-out mask AP50 {record['val_mask_AP50']:.3f}" if "val_mask_AP50" in record else ""
            print(f"epoch {epoch + 1}/{epochs} loss {record['train_loss']:.4f}{extra} ({record['seconds']} s)", flush=True)
        if on_epoch:
            on_epoch({**record, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": list(history)})
    return history


# -- the embedded default instance model ----------------------------------------------------------
class _Scenes:
    """Pre-generated synthetic instance scenes (generation costs more than a training step)."""

    def __init__(self, reader):
        self.labels, self.palette = reader.labels, reader.palette
        self.items = [reader[i] for i in range(len(reader))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def train_default_instance(out=DEFAULT_INSTANCE_CHECKPOINT, recipe: dict | None = None, progress: bool = True) -> dict:
    """Train the embedded default instance model on synthetic instance scenes; saved with its
    held-out (test split) box and mask AP."""
    from edgeseg import models
    from edgeseg.data.synthetic import SyntheticInstances

    r = {**DEFAULT_INSTANCE_RECIPE, **(recipe or {})}
    torch.set_num_threads(int(r["threads"]))
    t0 = time.time()
    size = tuple(r["size"])
    pre = Preprocess(size=size)
    train = _Scenes(SyntheticInstances(size=size, length=r["train_scenes"], seed=r["seed"], split="train"))
    val = SyntheticInstances(size=size, length=r["val_scenes"], seed=r["seed"], split="val")
    test = SyntheticInstances(size=size, length=r["val_scenes"], seed=r["seed"], split="test")
    print(f"generated {len(train)} training scenes in {time.time() - t0:.0f} s", flush=True)
    torch.manual_seed(r["seed"])
    net = models.create(r["model"], num_classes=len(train.labels), **r["model_kwargs"])
    ds = InstanceReaderDataset(train, pre, augment=True, seed=r["seed"], cache=True)
    history = fit_instances(net, ds, val, pre=pre, labels=train.labels, epochs=r["epochs"], batch_size=r["batch_size"],
                            lr=r["lr"], seed=r["seed"], progress=progress, val_limit=r["val_scenes"])
    summary = evaluate_instances(net, test, pre, train.labels)
    figures = {"test": {"box": summary["box"], "mask": summary["mask"], "images": summary["images"]}, "history": history,
               "recipe": r, "train_seconds": round(time.time() - t0)}
    models.save_checkpoint(net, out, labels=train.labels, palette=train.palette, preprocess=pre,
                           extra={**figures, "task": "instance-segmentation"})
    print(f"held-out (test split) mask AP50 {summary['mask']['AP50']:.4f}, box AP50 {summary['box']['AP50']:.4f}; saved {out}")
    return figures


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m edgeseg.train_default_instance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_INSTANCE_CHECKPOINT))
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (for quick checks)")
    ap.add_argument("--scenes", type=int, help="override the number of training scenes")
    args = ap.parse_args(argv)
    recipe = {}
    if args.epochs:
        recipe["epochs"] = args.epochs
    if args.scenes:
        recipe["train_scenes"] = args.scenes
    figures = train_default_instance(args.out, recipe)
    print(json.dumps(figures["test"], indent=2))


if __name__ == "__main__":
    main()
