"""How an instance-segmentation graph lays out its outputs (the manifest's `instances` field).

    yolo        predictions (1, 4 + nc + nm, A): per anchor cx, cy, w, h in input pixels, nc class
                scores in 0..1 and nm mask coefficients; protos (1, nm, H/s, W/s) mask prototypes.
                The layout of Ultralytics YOLO-seg exports and of edgeseg's `yoloseg`.
    detections  the tail inside the graph (`convert --instance-tail`): boxes (1, K, 4) xyxy input
                pixels, scores (1, K), classes (1, K), masks (1, K, H/s, W/s) probabilities cropped
                to their box (plus `mask_margin` prototype pixels) at prototype resolution. Rows are
                sorted by score; padding rows have score 0. K = max_detections, fixed.
                With `mask_space` "box" (Mask R-CNN), masks are (1, K, M, M) probabilities over each
                object's own box instead: resized onto the box, they give its mask.

`score_threshold` / `iou_threshold` are the defaults the runtime uses (for `detections`, the ones
baked into the graph: the runtime can only raise the score threshold). Manifests are untrusted:
`InstanceLayout.from_dict` checks every field and names the bad one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from edgeseg.errors import EdgesegError

LAYOUTS = ("yolo", "detections")
OUTPUT_ROLES = {"yolo": ("predictions", "protos"), "detections": ("boxes", "scores", "classes", "masks")}
MAX_CLASSES = 10_000
MAX_MASKS = 1024
MAX_DETECTIONS = 10_000
MASK_SPACES = ("image", "box")  # masks over the input at prototype resolution | over each object's box


class LayoutError(EdgesegError, ValueError):
    """An instance output layout that cannot be used."""


@dataclass(frozen=True)
class InstanceLayout:
    layout: str
    num_classes: int
    num_masks: int = 32
    outputs: dict = field(default_factory=dict)  # role -> output name
    score_threshold: float = 0.25
    iou_threshold: float = 0.7
    max_detections: int = 100
    mask_margin: int = 1  # detections: prototype pixels kept around each box
    mask_space: str = "image"  # detections: "box" when each mask spans its own box (M x M)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise LayoutError(f"instances.layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name, value, hi in (("num_classes", self.num_classes, MAX_CLASSES), ("num_masks", self.num_masks, MAX_MASKS),
                                ("max_detections", self.max_detections, MAX_DETECTIONS), ("mask_margin", self.mask_margin, 64)):
            if isinstance(value, bool) or not isinstance(value, int) or not (0 if name == "mask_margin" else 1) <= value <= hi:
                raise LayoutError(f"instances.{name} must be an integer up to {hi}, got {value!r}")
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise LayoutError(f"instances.{name} must be a number in 0..1, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.mask_space not in MASK_SPACES or (self.layout == "yolo" and self.mask_space != "image"):
            raise LayoutError(f"instances.mask_space must be one of {MASK_SPACES} ('box' only for the 'detections' layout), "
                              f"got {self.mask_space!r}")
        roles = OUTPUT_ROLES[self.layout]
        outputs = dict(self.outputs or {})
        if not outputs:
            outputs = {r: r for r in roles}
        if set(outputs) != set(roles) or not all(isinstance(v, str) and v for v in outputs.values()):
            raise LayoutError(f"instances.outputs of the {self.layout!r} layout maps {list(roles)} to output names, got {self.outputs!r}")
        object.__setattr__(self, "outputs", {r: outputs[r] for r in roles})

    @property
    def channels(self) -> int:
        """Rows of the yolo predictions: 4 box values, the class scores, the mask coefficients."""
        return 4 + self.num_classes + self.num_masks

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "instances") -> "InstanceLayout":
        if isinstance(d, InstanceLayout):
            return d
        if not isinstance(d, dict):
            raise LayoutError(f"{where}: expected an object describing the output layout, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise LayoutError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        if "layout" not in d or "num_classes" not in d:
            raise LayoutError(f"{where}: needs 'layout' and 'num_classes'")
        try:
            return cls(**d)
        except LayoutError as e:
            raise LayoutError(f"{where}: {e}") from None


__all__ = ["InstanceLayout", "LayoutError", "LAYOUTS", "OUTPUT_ROLES"]
