"""The zoo: export-friendly segmentation architectures behind one registry.

    from edgeseg import models
    models.available()                      # ['lraspp_mobilenetv3', 'unet', ...]
    net = models.create("unet", num_classes=5)

Every model takes (N, 3, H, W) float input with H and W multiples of `model.input_multiple`
and returns logits (N, num_classes, H, W). Upsampling uses fixed scale factors, so exported
graphs carry no data-dependent shapes.
"""
from edgeseg.models.registry import (
    DEFAULT,
    ModelError,
    available,
    create,
    describe,
    load_checkpoint,
    names,
    read_checkpoint,
    register,
    save_checkpoint,
    suggest,
    task,
    unknown_model,
)

# Importing the architecture modules registers them.
from edgeseg.models import deeplabv3plus, fastfcn, gscnn, lraspp, maskrcnn, resnet, unet, yoloseg  # noqa: E402,F401

__all__ = ["DEFAULT", "ModelError", "available", "create", "describe", "load_checkpoint", "names", "read_checkpoint", "register",
           "save_checkpoint", "suggest", "task", "unknown_model"]
