"""Fine-tuning loop used by `edgeseg train` and to make the embedded default model.

Images go through the deployment preprocessing (`Preprocess.apply`), so the network is trained on
exactly what the runtime will feed it. Reproduce the default model with:

    python -m edgeseg.train --default            # writes edgeseg/assets/default.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.metrics import ConfusionMatrix
from edgeseg.spec import Preprocess

ASSETS = Path(__file__).parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "default.pt"
# The recipe of the embedded default model: change it only together with the shipped weights.
DEFAULT_RECIPE = {
    "model": "lraspp_mobilenetv3_small",
    "model_kwargs": {"low_stride": 4, "head_channels": 96},
    "size": [256, 256],
    "train_scenes": 2000,
    "val_scenes": 200,
    "epochs": 10,
    "batch_size": 12,
    "crop": 192,
    "lr": 4e-3,
    "seed": 0,
}


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)

    def best(self, key: str = "val_miou") -> float:
        vals = [e[key] for e in self.epochs if e.get(key) is not None]
        return max(vals) if vals else float("nan")


def to_tensors(samples: Sequence, pre: Preprocess, ignore_index: int = 255):
    """(BGR image, mask) pairs -> preprocessed float tensor (N,3,H,W) and long masks (N,H,W)."""
    if pre.dtype != "float32" or pre.layout != "nchw":
        raise ValueError("training needs a float32 NCHW preprocessing")
    xs, ys = [], []
    for img, mask in samples:
        xs.append(pre.apply(img)[0])
        box = pre.letterbox(img.shape[:2])
        m = np.full(pre.size, ignore_index, np.uint8)
        m[box.top : box.top + box.height, box.left : box.left + box.width] = cv2.resize(
            mask, (box.width, box.height), interpolation=cv2.INTER_NEAREST
        )
        ys.append(m)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def augment(x: torch.Tensor, y: torch.Tensor, crop: int | None, gen: torch.Generator):
    """Random crop and horizontal flip, applied identically to images and masks."""
    if crop and crop < x.shape[-1]:
        H, W = x.shape[-2:]
        i = int(torch.randint(0, H - crop + 1, (1,), generator=gen))
        j = int(torch.randint(0, W - crop + 1, (1,), generator=gen))
        x, y = x[..., i : i + crop, j : j + crop], y[..., i : i + crop, j : j + crop]
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, batch_size: int = 16, ignore_index: int = 255) -> ConfusionMatrix:
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    for i in range(0, len(x), batch_size):
        pred = model(x[i : i + batch_size]).argmax(1)
        cm.update(pred.numpy(), y[i : i + batch_size].numpy())
    return cm


def fit(model, train: tuple, val: tuple | None, *, num_classes: int, epochs: int, batch_size: int = 8, lr: float = 1e-3,
        crop: int | None = None, loss_fn: Callable | None = None, seed: int = 0, ignore_index: int = 255,
        on_epoch: Callable[[dict], None] | None = None, progress: bool = True, start_epoch: int = 0,
        optimizer_state: dict | None = None) -> History:
    """Train `model` on preprocessed tensors `train=(x, y)`; evaluate mIoU on `val` after each epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = train
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, ignore_index=ignore_index))
    steps_per_epoch = max(1, len(x) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    if optimizer_state:
        opt.load_state_dict(optimizer_state["optimizer"])
        sched.load_state_dict(optimizer_state["scheduler"])
    history = History()
    for epoch in range(start_epoch, epochs):
        model.train()
        t0, total = time.time(), 0.0
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            xb, yb = augment(x[idx], y[idx], crop, gen)
            loss = loss_fn(model(xb), yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {s}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            if progress:
                _bar(epoch, epochs, s + 1, steps_per_epoch, total / (s + 1), time.time() - t0)
        record = {"epoch": epoch + 1, "train_loss": total / steps_per_epoch, "seconds": round(time.time() - t0, 1)}
        if val is not None:
            cm = evaluate(model, val[0], val[1], num_classes, ignore_index=ignore_index)
            record["val_miou"] = cm.miou()
            record["val_pixel_accuracy"] = cm.pixel_accuracy()
        history.epochs.append(record)
        if progress:
            extra = f" val mIoU {record['val_miou']:.4f}" if "val_miou" in record else ""
            print(f"\r epoch {epoch + 1}/{epochs} loss {record['train_loss']:.4f}{extra} ({record['seconds']} s)" + " " * 20, flush=True)
        if on_epoch:
            on_epoch({**record, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    return history


def _bar(epoch, epochs, step, steps, loss, secs):
    width = 24
    done = int(width * step / steps)
    eta = secs / step * (steps - step)
    sys.stdout.write(f"\r epoch {epoch + 1}/{epochs} [{'#' * done}{'.' * (width - done)}] {step}/{steps} loss {loss:.4f} eta {eta:4.0f}s")
    sys.stdout.flush()


def train_default(out: str | Path = DEFAULT_CHECKPOINT, recipe: dict | None = None, progress: bool = True) -> dict:
    """Train the embedded default model on synthetic scenes and save it with its held-out figures."""
    from edgeseg import models
    from edgeseg.data.synthetic import LABELS, PALETTE, SyntheticScenes

    r = {**DEFAULT_RECIPE, **(recipe or {})}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pre = Preprocess(size=tuple(r["size"]))
    t0 = time.time()
    train_set = SyntheticScenes(size=r["size"], length=r["train_scenes"], seed=r["seed"], split="train")
    val_set = SyntheticScenes(size=r["size"], length=r["val_scenes"], seed=r["seed"], split="val")
    test_set = SyntheticScenes(size=r["size"], length=r["val_scenes"], seed=r["seed"], split="test")
    train, val, test = (to_tensors([s[i] for i in range(len(s))], pre) for s in (train_set, val_set, test_set))
    print(f"generated {len(train[0])} train / {len(val[0])} val / {len(test[0])} test scenes in {time.time() - t0:.0f} s")
    torch.manual_seed(r["seed"])
    model = models.create(r["model"], num_classes=len(LABELS), **r["model_kwargs"])
    history = fit(model, train, val, num_classes=len(LABELS), epochs=r["epochs"], batch_size=r["batch_size"],
                  lr=r["lr"], crop=r["crop"], seed=r["seed"], progress=progress)
    cm = evaluate(model, *test, len(LABELS))
    figures = {"test": cm.summary(LABELS), "history": history.epochs, "recipe": r, "train_seconds": round(time.time() - t0)}
    models.save_checkpoint(model, out, labels=LABELS, palette=PALETTE, preprocess=pre, extra=figures)
    print(f"held-out (test split) mIoU {cm.miou():.4f}, pixel accuracy {cm.pixel_accuracy():.4f}; saved {out}")
    return figures


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m edgeseg.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--default", action="store_true", help="train the embedded default model (fixed recipe and seed)")
    ap.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--epochs", type=int, help="override the recipe's epochs (for quick checks)")
    ap.add_argument("--scenes", type=int, help="override the number of training scenes")
    args = ap.parse_args(argv)
    if not args.default:
        ap.error("use `edgeseg train` for your own models; --default reproduces the embedded one")
    recipe = {}
    if args.epochs:
        recipe["epochs"] = args.epochs
    if args.scenes:
        recipe["train_scenes"] = args.scenes
    figures = train_default(args.out, recipe)
    print(json.dumps(figures["test"], indent=2))


if __name__ == "__main__":
    main()
