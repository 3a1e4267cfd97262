"""Datasets: readers of the field's formats and the synthetic scene generator.

Readers return (BGR uint8 image, uint8 class mask) pairs so the same preprocessing as the runtime
applies; none of them imports torch. `open_dataset("voc:/path/VOC2012", split="val")` opens any
of them from one string (see `edgeseg.data.registry`).
"""
from edgeseg.data.base import DatasetError
from edgeseg.data.instances import InstanceAnnotations
from edgeseg.data.registry import open_dataset, open_instances
from edgeseg.data.synthetic import LABELS as SYNTHETIC_LABELS
from edgeseg.data.synthetic import PALETTE as SYNTHETIC_PALETTE
from edgeseg.data.synthetic import SyntheticClip, SyntheticInstances, SyntheticScenes

__all__ = ["SyntheticScenes", "SyntheticInstances", "SyntheticClip", "InstanceAnnotations", "open_instances", "SYNTHETIC_LABELS", "SYNTHETIC_PALETTE", "open_dataset", "DatasetError"]
