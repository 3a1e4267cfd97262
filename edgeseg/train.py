"""Fine-tuning loop used by `edgeseg train` and to make the embedded default model.

Images go through the deployment preprocessing (`Preprocess.apply`), so the network is trained on
exactly what the runtime will feed it. Reproduce the default model with:

    python -m edgeseg.train --default            # writes edgeseg/assets/default.pt

`fit` trains on in-memory tensors (the default model's path) or streams any dataset reader through
`ReaderDataset` (augmentation at input resolution, then the deployment normalisation).
`train_model` is what `edgeseg train` runs: a loss from `edgeseg.losses.build_loss`, a checkpoint
after every epoch (atomic, with optimizer state for `--resume`), held-out mIoU per epoch and a PNG
of the curves.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from edgeseg.errors import EdgesegError
from edgeseg.metrics import ConfusionMatrix
from edgeseg.progress import Bar, bar
from edgeseg.spec import Preprocess

ASSETS = Path(__file__).parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "default.pt"
# The recipe of the embedded default model: change it only together with the shipped weights.
DEFAULT_RECIPE = {
    "model": "lraspp_mobilenetv3_small",
    "model_kwargs": {"low_stride": 4, "head_channels": 96},
    "size": [256, 256],
    "train_scenes": 1200,
    "val_scenes": 200,
    "epochs": 5,
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
        ys.append(resize_mask(mask, pre, img.shape[:2], ignore_index))
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


class ReaderDataset(torch.utils.data.Dataset):
    """A dataset reader as a torch Dataset: (BGR image, mask) -> (float (3, H, W), long (H, W)).

    The image is resized by the deployment preprocessing (`Preprocess.resize_image`) and the mask
    by nearest neighbour to the same placement (letterbox padding = ignore); `augment`
    (`edgeseg.data.augment.Augment`) then runs at input resolution with rng(seed, epoch, index),
    and the image is normalised exactly as at run time.
    """

    def __init__(self, reader, pre: Preprocess, augment=None, seed: int = 0, ignore_index: int = 255):
        if pre.dtype != "float32" or pre.layout != "nchw":
            raise ValueError("training needs a float32 NCHW preprocessing")
        self.reader, self.pre, self.augment = reader, pre, augment
        self.seed, self.epoch, self.ignore_index = int(seed), 0, ignore_index

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        img, mask = self.reader[i]
        x = self.pre.resize_image(img)
        m = resize_mask(mask, self.pre, img.shape[:2], self.ignore_index)
        if self.augment is not None:
            x, m = self.augment(x, m, np.random.default_rng([self.seed, self.epoch, int(i)]))
        x = self.pre.normalize(x).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(m.astype(np.int64))


def resize_mask(mask: np.ndarray, pre: Preprocess, frame_hw, ignore_index: int = 255) -> np.ndarray:
    """A class mask placed like the image in the network input (letterbox padding = ignore).

    Nearest with half-pixel centres (INTER_NEAREST_EXACT) samples the points the bilinear image
    resize does; plain INTER_NEAREST is offset by up to half a source pixel."""
    box = pre.letterbox(tuple(frame_hw))
    m = np.full(pre.size, ignore_index, np.uint8)
    m[box.top : box.top + box.height, box.left : box.left + box.width] = cv2.resize(
        mask, (box.width, box.height), interpolation=cv2.INTER_NEAREST_EXACT
    )
    return m


def _is_tensors(data) -> bool:
    return isinstance(data, (tuple, list))


def _step_loss(model, xb, yb, loss_fn, ignore_index):
    # models with auxiliary outputs (Gated-SCNN's edges) supply their own training objective
    hook = getattr(model, "training_loss", None)
    if hook is not None:
        return hook(xb, yb, loss_fn, ignore_index=ignore_index)
    return loss_fn(model(xb), yb)


@torch.no_grad()
def evaluate_dataset(model, dataset, num_classes: int, batch_size: int = 8, ignore_index: int = 255,
                     num_workers: int = 0) -> ConfusionMatrix:
    """Confusion matrix of `model` over a torch Dataset of (input, mask) pairs, streamed."""
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for xb, yb in loader:
        cm.update(model(xb).argmax(1).numpy(), yb.numpy())
    return cm


def fit(model, train, val, *, num_classes: int, epochs: int, batch_size: int = 8, lr: float = 1e-3,
        crop: int | None = None, loss_fn: Callable | None = None, seed: int = 0, ignore_index: int = 255,
        on_epoch: Callable[[dict], None] | None = None, progress: bool = True, start_epoch: int = 0,
        optimizer_state: dict | None = None, num_workers: int = 0, history: History | None = None,
        collate_fn: Callable | None = None, validate: Callable | None = None, clip_grad: float | None = None) -> History:
    """Train `model` and evaluate mIoU on `val` after each epoch.

    `train`/`val`: preprocessed tensors `(x, y)` (random `crop` and flips applied per batch), or
    torch Datasets such as `ReaderDataset` (streamed; their own augmentation, reseeded per epoch).
    `start_epoch`/`optimizer_state`/`history` continue an interrupted run. Instance models
    (`edgeseg.train_instances`) give their batching as `collate_fn` and their held-out scoring as
    `validate(model) -> {figure: value}` instead of `val`; `clip_grad` caps the gradient norm.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = _is_tensors(train)
    n = len(train[0]) if tensors else len(train)
    if n == 0:
        raise ValueError("the training set is empty")
    loss_fn = loss_fn or (lambda logits, t: F.cross_entropy(logits, t, ignore_index=ignore_index))
    steps_per_epoch = max(1, n // batch_size)
    total_steps = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    if optimizer_state:
        opt.load_state_dict(optimizer_state["optimizer"])
        if optimizer_state.get("scheduler", {}).get("total_steps") == total_steps:
            sched.load_state_dict(optimizer_state["scheduler"])
        else:
            # the run was extended (or the data changed size): follow the new schedule from here
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(min(start_epoch * steps_per_epoch, total_steps - 1)):
                    sched.step()
    history = history or History()
    for epoch in range(start_epoch, epochs):
        model.train()
        t0, total = time.time(), 0.0
        with (bar(f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch, unit="batches") if progress else Bar()) as steps:
            for s, (xb, yb) in enumerate(_batches(train, batch_size, steps_per_epoch, crop, gen, seed, epoch, num_workers,
                                                  collate_fn)):
                loss = _step_loss(model, xb, yb, loss_fn, ignore_index)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {s}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                opt.step()
                sched.step()
                total += loss.item()
                steps.note(f"loss {total / (s + 1):.4f}")
                steps.update()
        record = {"epoch": epoch + 1, "train_loss": total / steps_per_epoch, "seconds": round(time.time() - t0, 1)}
        if val is not None:
            if _is_tensors(val):
                cm = evaluate(model, val[0], val[1], num_classes, ignore_index=ignore_index)
            else:
                cm = evaluate_dataset(model, val, num_classes, batch_size, ignore_index, num_workers)
            record["val_miou"] = cm.miou()
            record["val_pixel_accuracy"] = cm.pixel_accuracy()
        if validate is not None:
            record.update(validate(model))
        history.epochs.append(record)
        if progress:
            extra = f" val mIoU {record['val_miou']:.4f}" if "val_miou" in record else ""
            extra += f" val mask AP50 {record['val_mask_ap50']:.4f}" if "val_mask_ap50" in record else ""
            print(f"epoch {epoch + 1}/{epochs} loss {record['train_loss']:.4f}{extra} ({record['seconds']} s)", flush=True)
        if on_epoch:
            on_epoch({**record, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": list(history.epochs)})
    return history


def _batches(train, batch_size, steps, crop, gen, seed, epoch, num_workers, collate_fn=None):
    if _is_tensors(train):
        # the default model's path: one generator drives order, crops and flips (keep it unchanged)
        x, y = train
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            yield augment(x[idx], y[idx], crop, gen)
        return
    if hasattr(train, "set_epoch"):
        train.set_epoch(epoch)
    # the order depends on (seed, epoch) only, so a resumed run sees the batches it would have seen
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=order[: steps * batch_size].tolist(),
                                         num_workers=num_workers, collate_fn=collate_fn)
    yield from loader


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
    Path(out).with_name("labels.txt").write_text("\n".join(LABELS) + "\n")
    print(f"held-out (test split) mIoU {cm.miou():.4f}, pixel accuracy {cm.pixel_accuracy():.4f}; saved {out}")
    return figures


def _default_to_fine_tune(num_classes: int, kwargs: dict):
    """The embedded model's architecture and weights; layers whose shape depends on the number of
    classes (the classifier) start fresh when the dataset has another count than its 5."""
    from edgeseg import models

    if kwargs:
        raise TrainError(f"the default model has a fixed architecture; drop --model-arg / --backbone-weights ({sorted(kwargs)}), "
                         "or train a zoo architecture that takes them")
    ckpt = models.read_checkpoint(DEFAULT_CHECKPOINT)
    arch = ckpt["arch"]
    net = models.create(arch["name"], num_classes=num_classes, **arch.get("kwargs", {}))
    own = net.state_dict()
    fits = {k: v for k, v in ckpt["state_dict"].items() if k in own and own[k].shape == v.shape}
    net.load_state_dict(fits, strict=False)
    return net


class TrainError(EdgesegError, ValueError):
    """A training request that cannot run as given (mismatched resume, unknown option, ...)."""


def curves_path(out: str | Path) -> Path:
    """Where the curves PNG of checkpoint `out` goes: model.pt -> model.curves.png."""
    out = Path(out)
    return out.with_name(out.stem + ".curves.png")


def plot_curves(history: list[dict], path: str | Path, title: str = "", metric=("val_miou", "mIoU")) -> Path:
    """Training loss and the held-out figure (`metric`: record key, name) per epoch as a PNG
    (matplotlib, Agg; written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from edgeseg.bundle import atomic_path

    epochs = [e["epoch"] for e in history]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [e["train_loss"] for e in history], "o-", color="tab:blue")
    ax1.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax1.grid(alpha=0.3)
    key, name = metric
    val = [(e["epoch"], e[key]) for e in history if e.get(key) is not None and e[key] == e[key]]
    if val:
        ax2.plot([v[0] for v in val], [v[1] for v in val], "o-", color="tab:green")
        best = max(val, key=lambda v: v[1])
        ax2.annotate(f"best {best[1]:.3f}", best, textcoords="offset points", xytext=(0, 8), ha="center")
        ax2.set_ylim(0, 1)
    else:
        ax2.text(0.5, 0.5, "no held-out data\n(--val-data)", ha="center", va="center", transform=ax2.transAxes)
    ax2.set(xlabel="epoch", ylabel=name, title=f"held-out {name}")
    ax2.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


DEFAULT_AUGMENT = {"hflip": 0.5, "scale": (0.75, 1.25), "brightness": 0.2, "contrast": 0.2, "saturation": 0.2}
INSTANCE_LOSS = "model"  # instance models' settings name no loss: they bring their own
_SETTINGS_DEFAULTS = {"loss": "ce", "epochs": 5, "batch_size": 8, "lr": 1e-3, "size": (256, 256), "seed": 0, "augment": True}


def train_model(model: str | None, data, *, out: str | Path, val_data=None, loss: str | None = None,
                epochs: int | None = None, batch_size: int | None = None, lr: float | None = None, size=None,
                resume: str | Path | None = None, num_classes: int | None = None, model_kwargs: dict | None = None,
                backbone_weights: str | None = None, seed: int | None = None, augment: bool | None = None,
                num_workers: int = 0, progress: bool = True) -> dict:
    """Train (or resume training) a zoo model on a dataset; what `edgeseg train` runs.

    `data`/`val_data`: `open_dataset` specs or reader objects. Without `val_data`, a dataset with
    splits is evaluated on its "val" split. The checkpoint at `out` is rewritten (atomically)
    after every epoch with weights, labels, palette, preprocessing, history and optimizer state;
    `resume` continues from such a checkpoint (settings not given are taken from it).
    Returns {"history", "checkpoint", "curves", "best_val_miou", ...}.
    """
    from edgeseg import models
    from edgeseg.data import DatasetError, open_dataset, open_instances
    from edgeseg.data.augment import Augment
    from edgeseg.losses import build_loss

    given = {"loss": loss, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "size": tuple(size) if size is not None else None, "seed": seed, "augment": augment}
    ckpt, state = None, {}
    if resume is not None:
        ckpt = models.read_checkpoint(resume)
        state = (ckpt.get("extra") or {}).get("train_state")
        if not state:
            raise TrainError(f"{resume} holds no training state (it was not written by `edgeseg train`); "
                             "start a new run with --model and fine-tune from its weights instead")
        if model and model not in (ckpt["arch"]["name"], models.DEFAULT):
            raise TrainError(f"--model {model} differs from the checkpoint's {ckpt['arch']['name']}; drop --model to resume")
    arch_name = ckpt["arch"]["name"] if ckpt is not None else model
    # instance models (Mask R-CNN) read instance data and minimise their own objective
    instance = arch_name in models.available() and models.task(arch_name) == "instance-segmentation"
    if instance:
        if loss is not None:
            raise TrainError(f"{arch_name} trains on its own objective (its detection and mask losses); drop --loss")
        given["loss"] = INSTANCE_LOSS
    settings = {k: (v if v is not None else state.get("settings", {}).get(k, _SETTINGS_DEFAULTS[k])) for k, v in given.items()}
    settings["size"] = tuple(int(v) for v in settings["size"])
    if ckpt is not None and ckpt.get("preprocess") and tuple(ckpt["preprocess"]["size"]) != settings["size"]:
        raise TrainError(f"--size {settings['size']} differs from the checkpoint's {tuple(ckpt['preprocess']['size'])}; "
                         "a run resumes at its own input size")
    opener = open_instances if instance else open_dataset
    train_reader = opener(data, split="train") if isinstance(data, str) else data
    if val_data is not None:
        val_reader = opener(val_data, split="val") if isinstance(val_data, str) else val_data
    elif isinstance(data, str) and getattr(train_reader, "has_splits", False):
        try:
            val_reader = opener(data, split="val")
        except DatasetError:
            val_reader = None
    else:
        val_reader = None
    if val_reader is None and progress:
        print(f"no held-out data (give --val-data): {'mask AP' if instance else 'mIoU'} is not measured during training", flush=True)
    labels = list(train_reader.labels)
    palette = getattr(train_reader, "palette", None)
    if ckpt is not None:
        k = ckpt["arch"]["num_classes"]
        if num_classes is not None and num_classes != k:
            raise TrainError(f"--num-classes {num_classes} differs from the checkpoint's {k}")
        num_classes = k
    if num_classes is None:
        num_classes = len(labels)
    if num_classes < len(labels):
        raise TrainError(f"--num-classes {num_classes} is fewer than the dataset's {len(labels)} classes ({', '.join(labels[:5])}...)")
    if num_classes > len(labels):
        labels += [f"class_{i}" for i in range(len(labels), num_classes)]
        palette = None
    if val_reader is not None and len(val_reader.labels) > num_classes:
        raise TrainError(f"the held-out data has {len(val_reader.labels)} classes, the model {num_classes}; "
                         "evaluate on data with the same labels")

    if ckpt is not None:
        arch = ckpt["arch"]
        net = models.create(arch["name"], num_classes=arch["num_classes"], **arch.get("kwargs", {}))
        net.load_state_dict(ckpt["state_dict"])
    else:
        if not model:
            raise TrainError(f"name a model with --model; available: {', '.join(models.names())}")
        kwargs = dict(model_kwargs or {})
        if backbone_weights:
            kwargs["backbone_weights"] = str(backbone_weights)
        torch.manual_seed(settings["seed"])  # the initial weights are part of the run's reproducibility
        try:
            net = _default_to_fine_tune(num_classes, kwargs) if model == models.DEFAULT else models.create(model, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise TrainError(f"model {model} does not take these options {sorted(kwargs)}: {e}") from None
        except (ValueError, RuntimeError) as e:
            if isinstance(e, EdgesegError):
                raise
            raise TrainError(f"cannot build {model} with {kwargs}: {e}") from None
        # the weights file served initialisation; checkpoints must rebuild without it
        net.edgeseg_arch["kwargs"].pop("backbone_weights", None)
    multiple = getattr(net, "input_multiple", 1)
    if any(v % multiple for v in settings["size"]):
        raise TrainError(f"--size {settings['size'][0]} {settings['size'][1]}: {net.edgeseg_arch['name']} needs "
                         f"multiples of {multiple}")

    pre = Preprocess(size=settings["size"])
    if instance:
        from edgeseg.train_instances import InstanceReaderDataset, collate_instances, validation

        loss_fn, val_ds = None, None
        train_ds = InstanceReaderDataset(train_reader, pre, augment=settings["augment"], seed=settings["seed"])
        fit_options = {"collate_fn": collate_instances, "clip_grad": 10.0,
                       "validate": validation(val_reader, pre, labels) if val_reader is not None else None}
        metric = ("val_mask_ap50", "mask AP50")
    else:
        loss_fn = build_loss(settings["loss"], ignore_index=255)
        aug = Augment(**DEFAULT_AUGMENT) if settings["augment"] else None
        train_ds = ReaderDataset(train_reader, pre, aug, seed=settings["seed"])
        val_ds = ReaderDataset(val_reader, pre) if val_reader is not None else None
        fit_options, metric = {}, ("val_miou", "mIoU")
    start_epoch = int(state.get("epoch", 0))
    if start_epoch >= settings["epochs"]:
        raise TrainError(f"{resume} already finished {start_epoch} epochs; pass --epochs above {start_epoch} to train on")
    out, curves = Path(out), curves_path(out)
    settings_out = {**settings, "size": list(settings["size"])}
    prior = History([dict(e) for e in (ckpt or {}).get("extra", {}).get("history", [])])

    def save(rec: dict) -> None:
        hist = rec["history"]
        extra = {
            "history": hist,
            "train_state": {"epoch": rec["epoch"], "optimizer": rec["optimizer"], "scheduler": rec["scheduler"],
                            "settings": settings_out},
            "data": data if isinstance(data, str) else type(data).__name__,
            "val_data": val_data if isinstance(val_data, str) or val_data is None else type(val_data).__name__,
        }
        models.save_checkpoint(net, out, labels=labels, palette=palette, preprocess=pre, extra=extra)
        plot_curves(hist, curves, title=f"{net.edgeseg_arch['name']} - {settings['loss']}", metric=metric)

    history = fit(net, train_ds, val_ds, num_classes=num_classes, epochs=settings["epochs"],
                  batch_size=settings["batch_size"], lr=settings["lr"], loss_fn=loss_fn, seed=settings["seed"],
                  on_epoch=save, progress=progress, start_epoch=start_epoch,
                  optimizer_state=state or None, num_workers=num_workers, history=prior, **fit_options)
    return {"history": history.epochs, "checkpoint": str(out), "curves": str(curves),
            "best_val_miou": history.best(), "metric": metric[1], "best": history.best(metric[0]),
            "epochs": settings["epochs"], "resumed_from": start_epoch}


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
