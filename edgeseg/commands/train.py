"""edgeseg train --model NAME --data D [--val-data D2] --loss dice+ce --epochs N --out CKPT [--resume CKPT]"""
from __future__ import annotations

import argparse
import ast

from edgeseg.train import TrainError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train or fine-tune a zoo model. Writes the checkpoint after every epoch (weights, labels, "
        "palette, preprocessing and optimizer state) and a PNG of the loss/mIoU curves beside it; "
        "`edgeseg convert CKPT` deploys it, `--resume CKPT` continues it."
    )
    from edgeseg import models  # training needs torch anyway

    p.add_argument("--model", help=f"'default' (fine-tune the embedded model) or a zoo architecture: {', '.join(models.available())}; "
                                   "the same names as `edgeseg convert`; not needed with --resume")
    p.add_argument("--data", required=True,
                   help="training data: voc:PATH, cityscapes:PATH, camvid:PATH, coco:ANN.json:IMAGES, an images/+masks/ "
                        "folder, or synthetic (the 'train' split is read)")
    p.add_argument("--val-data", help="held-out data for mIoU after each epoch (default: the 'val' split of --data, if it has one)")
    p.add_argument("--loss", help="loss expression, e.g. ce, dice+ce, 0.5*focal(gamma=3)+dice (default ce)")
    p.add_argument("--epochs", type=int, help="total epochs (default 10; with --resume, the run's own)")
    p.add_argument("--batch-size", type=int, help="default 8")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (default 1e-3)")
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="network input size (default 256 256)")
    p.add_argument("--out", required=True, help="checkpoint to write (.pt); the curves go to <out stem>.curves.png")
    p.add_argument("--resume", metavar="CKPT", help="continue a run from its checkpoint")
    p.add_argument("--num-classes", type=int, help="classes of the model (default: the dataset's labels)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, e.g. depth=18 or width=0.5 (repeatable)")
    p.add_argument("--backbone-weights", metavar="PATH", help="encoder weights from a local file (state_dict)")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no flips, scale or colour jitter")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (default 0: in the main process)")


def parse_model_args(items: list[str]) -> dict:
    """KEY=VALUE pairs; values read as Python literals (18, 0.5, True, (6, 12, 18)) or kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise TrainError(f"--model-arg expects KEY=VALUE with a Python name as KEY, got {item!r}")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from edgeseg.train import train_model

    if args.resume is None and not args.model:
        from edgeseg import models

        raise TrainError(f"name a model with --model (or continue a run with --resume CKPT); available: "
                         f"{', '.join(models.names())}")
    for name in ("epochs", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.lr is not None and not args.lr > 0:
        raise TrainError(f"--lr must be positive, got {args.lr}")
    result = train_model(
        args.model, args.data, out=args.out, val_data=args.val_data, loss=args.loss, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, size=args.size, resume=args.resume, num_classes=args.num_classes,
        model_kwargs=parse_model_args(args.model_arg), backbone_weights=args.backbone_weights, seed=args.seed,
        augment=args.augment, num_workers=args.workers, progress=not args.quiet,
    )
    best = result["best"]
    best_text = f", best held-out {result['metric']} {best:.4f}" if best == best else ""
    print(f"trained {result['epochs']} epochs{best_text}; checkpoint {result['checkpoint']}, curves {result['curves']}")
    return 0
