"""edgeseg eval BUNDLE_OR_CHECKPOINT --data D [--json out.json]"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeseg.errors import EdgesegError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a bundle folder (every artifact this machine runs, each with its own engine) or a checkpoint (.pt, torch)")
    p.add_argument("--data", required=True,
                   help="held-out labelled data: synthetic:test?n=200, voc:/path, cityscapes:/path, a folder with images/ and masks/ ...; "
                        "instance bundles: synthetic:test?n=200 or coco:ANN.json:IMAGES (box and mask AP, needs pycocotools)")
    p.add_argument("--max-images", type=int, default=200, help="frames to evaluate, spread over the data (default 200; 0 = all)")
    p.add_argument("--split", help="split for specs that name none (default: test for synthetic, else val)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    from edgeseg.cluster.cli import add_cluster_arguments

    add_cluster_arguments(p, "shards the frames over Ray workers; same figures")


def _is_instance_bundle(path: Path) -> bool:
    from edgeseg.bundle import Bundle

    return Bundle.load(path).manifest.task == "instance-segmentation"


def run(args) -> int:
    from calibration.evaluate import evaluate_bundle, evaluate_checkpoint, format_table

    path = Path(args.model)
    limit = args.max_images or None
    if args.cluster:
        from edgeseg.cluster.evaluate import evaluate_bundle_on_cluster

        if not path.is_dir():
            raise EdgesegError(f"--cluster evaluates bundle folders; {path} is not one (convert it with `edgeseg convert`)")
        result = evaluate_bundle_on_cluster(path, args.data, cluster=args.cluster, workers=args.workers,
                                            worker_cpus=args.worker_cpus, max_images=limit, split=args.split)
    elif path.is_dir() and _is_instance_bundle(path):
        from calibration.instance_accuracy import evaluate_instance_bundle, format_instance_table

        result = evaluate_instance_bundle(path, args.data, max_images=limit, split=args.split)
        format_table = format_instance_table  # noqa: F811  box and mask AP instead of mIoU
    elif path.is_dir():
        result = evaluate_bundle(path, args.data, max_images=limit, split=args.split)
    elif path.is_file():
        result = evaluate_checkpoint(path, args.data, max_images=limit, split=args.split)
    else:
        raise EdgesegError(f"{path} is neither a bundle folder nor a checkpoint file")
    print(format_table(result))
    if args.json:
        from calibration.report import json_safe
        from edgeseg.bundle import write_text_atomic

        write_text_atomic(args.json, json.dumps(json_safe(result), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
