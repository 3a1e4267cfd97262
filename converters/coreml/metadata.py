"""What an app reads from the package: descriptions, labels, palette, preprocessing, precision."""
from __future__ import annotations

import json

from converters.coreml.schemes import INPUT_NAME, Scheme
from edgeseg.spec import Preprocess


def set_metadata(mlmodel, *, labels, palette, preprocess: Preprocess, precision, output, color, sizes, scheme: Scheme,
                  target_name: str, metadata: dict | None, output_shape):
    from edgeseg import __version__

    md = dict(metadata or {})
    mlmodel.author = str(md.pop("author", "edgeseg"))
    mlmodel.license = str(md.pop("license", ""))
    mlmodel.version = str(md.pop("version", __version__))
    desc = md.pop("description", None) or md.pop("short_description", None)
    mlmodel.short_description = str(
        desc or f"Semantic segmentation, {len(labels)} classes ({', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''}); "
        f"output '{output}'; labels, palette and preprocessing in the metadata"
    )
    H, W = preprocess.size
    mlmodel.input_description[INPUT_NAME] = (
        f"{color.upper()} image, {W}x{H} (width x height)"
        + (f" or one of {', '.join(f'{w}x{h}' for h, w in sizes)}" if len(sizes) > 1 else "")
        + f"; resize mode '{preprocess.resize}'. Raw 0-255 pixels: normalisation is inside the model"
    )
    out_desc = {
        "logits": f"class scores (1, {len(labels)}, H, W); argmax over axis 1 gives the class map",
        "probs": f"class probabilities (1, {len(labels)}, H, W), softmax over axis 1",
        "mask": "class index per pixel (1, H, W), int32; see the 'labels' metadata",
    }[output]
    mlmodel.output_description[output] = out_desc
    ud = mlmodel.user_defined_metadata
    ud["labels"] = json.dumps(list(labels))
    ud["palette"] = json.dumps([list(map(int, c)) for c in palette])
    ud["preprocess"] = json.dumps(preprocess.to_dict())
    ud["output"] = output
    ud["output_shape"] = json.dumps(list(output_shape))
    ud["precision"] = precision
    ud["color"] = color
    ud["input_sizes"] = json.dumps([list(s) for s in sizes])
    ud["compression"] = json.dumps(scheme.describe())
    ud["minimum_deployment_target"] = target_name
    ud["edgeseg_version"] = __version__
    for k, v in md.items():
        ud[str(k)] = v if isinstance(v, str) else json.dumps(v)
