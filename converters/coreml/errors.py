"""What Core ML conversion refuses: each error names the model part or option and the fix."""
from __future__ import annotations

from edgeseg.errors import ConversionError


class CoreMLConversionError(ConversionError):
    """A model or option that Core ML conversion cannot take; the message names what and the fix."""


class UnsupportedOpError(CoreMLConversionError):
    """An operator coremltools has no converter for; names the op and the layer that uses it."""

    def __init__(self, message: str, op: str = "", layer: str = ""):
        super().__init__(message)
        self.op, self.layer = op, layer


class DynamicShapeError(CoreMLConversionError):
    """A shape Core ML cannot take (several input sizes through a size-dependent layer, sizes
    that are not a multiple of the network's stride, ...)."""

    def __init__(self, message: str, layer: str = ""):
        super().__init__(message)
        self.layer = layer


class DeploymentTargetError(CoreMLConversionError):
    """A deployment target too old for the requested format or compression."""


class PackageValidationError(CoreMLConversionError):
    """A package that does not pass `validate_package`; the message lists the failed checks."""


def first_line(e: BaseException | None, limit: int = 300) -> str:
    if e is None:
        return ""
    s = str(e).strip().splitlines()
    s = s[0] if s else type(e).__name__
    return s if len(s) <= limit else s[:limit] + "..."
