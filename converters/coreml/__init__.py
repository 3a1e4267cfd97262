"""Torch segmentation network -> Core ML ML Program (.mlpackage) an iOS or macOS app calls on a frame.

    from converters.coreml import convert_coreml, convert_to_bundle, validate_package
    res = convert_coreml(model, "seg.mlpackage", preprocess=pre, labels=labels, palette=palette,
                         precision="palettize4", output="mask", input_sizes=[(256, 256), (384, 512)])
    report = validate_package(res.path, torch_model=model)

The package's input is an image (`ct.ImageType`, RGB or BGR as the network expects) with
scale 1 and bias 0: Core ML hands the graph raw 0..255 pixel values and the graph itself computes
(x / 255 - mean) / std per channel. The normalisation is folded into the model instead of the
ImageType's scale/bias because ImageType has one scale for all channels, so a per-channel std
cannot be expressed there. An app passes a CVPixelBuffer and needs nothing else: labels, palette
and the preprocessing description travel in the package's metadata.

The package, in the order a conversion runs through it:

    schemes.py      fixed names, precisions and the deployment target each needs
    frontend.py     the wrapped network -> torch.export (or trace) -> ct.convert, failures explained
    compression.py  weight compression (linear, palettized) and W8A8's torch-side calibration
    metadata.py     descriptions, labels, palette and preprocessing written into the package
    conversion.py   CoreMLConverter: export once, one package per precision, atomic write + validation
    bundle.py       convert_to_bundle: the package added to an edgeseg bundle
    validation.py   validate_package: spec, metadata and input checks without running the model
    weights.py      stored weights read back and compared with the torch weights
    errors.py       what conversion refuses, each naming the fix
"""
from converters.coreml.bundle import convert_to_bundle
from converters.coreml.compression import compress, kmeans_lut
from converters.coreml.conversion import CoreMLConverter, CoreMLResult, convert_coreml, convert_variants, package_size
from converters.coreml.errors import (CoreMLConversionError, DeploymentTargetError, DynamicShapeError,
                                      PackageValidationError, UnsupportedOpError)
from converters.coreml.schemes import (COMPUTE_UNITS, INPUT_NAME, OUTPUTS, PRECISIONS, SCHEMES, WEIGHT_THRESHOLD, Scheme,
                                       check_target, resolve_target, scheme_for)
from converters.coreml.validation import validate_package
from edgeseg.errors import ConversionError  # the base of every error above

__all__ = [
    "CoreMLConversionError", "UnsupportedOpError", "DynamicShapeError", "DeploymentTargetError", "PackageValidationError",
    "CoreMLResult", "CoreMLConverter", "PRECISIONS", "OUTPUTS", "COMPUTE_UNITS", "SCHEMES", "WEIGHT_THRESHOLD",
    "convert_coreml", "convert_variants", "convert_to_bundle", "validate_package", "compress", "kmeans_lut",
    "check_target", "resolve_target", "package_size", "scheme_for", "Scheme", "INPUT_NAME", "ConversionError",
]
