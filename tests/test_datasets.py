"""Dataset readers on small fixtures written in each format's real on-disk layout; corrupt and
mislabelled files give errors that name them; augmentation is deterministic and keeps masks aligned."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeseg.data import DatasetError, open_dataset
from edgeseg.data.augment import Augment, AugmentedDataset
from edgeseg.data.camvid import CamVid
from edgeseg.data.cityscapes import Cityscapes
from edgeseg.data.coco import COCOSegmentation, _have_pycocotools, polygon_mask, rle_decode, rle_encode
from edgeseg.data.folder import FolderDataset
from edgeseg.data.voc import PALETTE as VOC_PALETTE
from edgeseg.data.voc import VOCSegmentation, voc_colormap

ROOT = Path(__file__).resolve().parents[1]


def blocks_image(h, w, seed):
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(img)


def write_palette_png(path: Path, ids: np.ndarray, palette) -> None:
    from PIL import Image

    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    flat = [v for rgb in palette for v in rgb]
    im.putpalette(flat + [0] * (768 - len(flat)))
    im.save(path)


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


# --- PASCAL VOC ------------------------------------------------------------------------------
@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    masks = {}
    for k, name in enumerate(["2007_000032", "2007_000039", "2007_000063"]):
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"), blocks_image(40, 56, k))
        m = np.zeros((40, 56), np.uint8)
        m[5:30, 10:40] = [15, 1, 12][k]  # person, aeroplane, dog
        m[5:30, 9] = 255                  # VOC's object outline: ignore
        m[32:, :20] = 20
        write_palette_png(root / "SegmentationClass" / f"{name}.png", m, voc_colormap())
        masks[name] = m
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000039\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000063\n")
    return root, masks


def test_voc_round_trip(voc):
    root, masks = voc
    ds = VOCSegmentation(root, "train")
    assert len(ds) == 2 and ds.labels[15] == "person" and len(ds.labels) == 21
    assert ds.palette[1] == [128, 0, 0] and voc_colormap()[255] == [224, 224, 192]
    for i, name in enumerate(["2007_000032", "2007_000039"]):
        img, mask = ds[i]
        assert img.dtype == np.uint8 and img.shape == (40, 56, 3)
        np.testing.assert_array_equal(img, cv2.imread(str(root / "JPEGImages" / f"{name}.jpg")))
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, masks[name])
    val = open_dataset(f"voc:{root}", split="val")
    np.testing.assert_array_equal(val[0][1], masks["2007_000063"])


def test_voc_colour_masks_without_pil(voc, monkeypatch):
    root, masks = voc
    # masks re-saved as RGB colour PNGs, read without PIL: colours map back through the VOC palette
    monkeypatch.setattr("edgeseg.data.voc.read_palette_indices", lambda path: None)
    cmap = np.array(voc_colormap(), np.uint8)
    m = masks["2007_000032"]
    cv2.imwrite(str(root / "SegmentationClass" / "2007_000032.png"), cmap[m][..., ::-1])
    np.testing.assert_array_equal(VOCSegmentation(root, "train")[0][1], m)


def test_voc_errors_name_the_file(voc):
    root, _ = voc
    bad = root / "JPEGImages" / "2007_000039.jpg"
    corrupt(bad)
    with pytest.raises(DatasetError, match="2007_000039.jpg"):
        VOCSegmentation(root, "train")[1]
    m = np.zeros((40, 56), np.uint8)
    m[0, 0] = 33  # not a VOC class
    write_palette_png(root / "SegmentationClass" / "2007_000032.png", m, voc_colormap())
    with pytest.raises(DatasetError, match=r"2007_000032\.png.*33"):
        VOCSegmentation(root, "train")[0]
    with pytest.raises(DatasetError, match="split file not found.*trainaug.*splits here: train, val"):
        VOCSegmentation(root, "trainaug")
    with pytest.raises(DatasetError, match="JPEGImages"):
        VOCSegmentation(root.parent, "train")


# --- Cityscapes ------------------------------------------------------------------------------
@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    ids = np.array([[7, 8, 26, 23], [0, 9, 33, 24], [11, 21, 31, 1]], np.uint8)
    label = cv2.resize(ids, (32, 24), interpolation=cv2.INTER_NEAREST)
    for split, city, n in (("train", "aachen", 2), ("val", "frankfurt", 1)):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        for k in range(n):
            stem = f"{city}_{k:06d}_000019"
            cv2.imwrite(str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"), blocks_image(24, 32, k))
            cv2.imwrite(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"), label)
    return root, label


def test_cityscapes_label_ids_to_train_ids(cityscapes):
    root, label = cityscapes
    ds = Cityscapes(root, "train")
    assert len(ds) == 2 and len(ds.labels) == 19
    assert ds.labels[0] == "road" and ds.labels[13] == "car" and ds.labels[18] == "bicycle"
    assert ds.palette[13] == [0, 0, 142]
    img, mask = ds[0]
    assert img.shape == (24, 32, 3)
    # official table: road 7->0, sidewalk 8->1, car 26->13, sky 23->10, unlabeled 0->255, parking 9->255,
    # bicycle 33->18, person 24->11, building 11->2, vegetation 21->8, train 31->16, ego vehicle 1->255
    expected = {7: 0, 8: 1, 26: 13, 23: 10, 0: 255, 9: 255, 33: 18, 24: 11, 11: 2, 21: 8, 31: 16, 1: 255}
    for label_id, train_id in expected.items():
        assert set(np.unique(mask[label == label_id])) == {train_id}
    assert len(open_dataset(f"cityscapes:{root}", "val")) == 1


def test_cityscapes_errors_name_the_file(cityscapes):
    root, label = cityscapes
    gt = root / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    bad = label.copy()
    bad[0, 0] = 40  # beyond the 34 label ids
    cv2.imwrite(str(gt), bad)
    with pytest.raises(DatasetError, match=r"aachen_000001_000019_gtFine_labelIds\.png.*40"):
        Cityscapes(root, "train")[1]
    img = root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    corrupt(img)
    with pytest.raises(DatasetError, match="aachen_000000_000019_leftImg8bit.png"):
        Cityscapes(root, "train")[0]
    gt.unlink()
    with pytest.raises(DatasetError, match="mask not found.*aachen_000001_000019_gtFine_labelIds.png"):
        Cityscapes(root, "train")[1]


# --- CamVid ----------------------------------------------------------------------------------
@pytest.fixture
def camvid(tmp_path):
    root = tmp_path / "CamVid"
    masks = {}
    for split, names in (("train", ["0001TP_006690", "0001TP_006720"]), ("val", ["0016E5_07959"]), ("test", ["Seq05VD_f00000"])):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for k, name in enumerate(names):
            cv2.imwrite(str(root / split / f"{name}.png"), blocks_image(36, 48, k))
            m = (np.arange(36 * 48).reshape(36, 48) // 157 % 12).astype(np.uint8)  # every id 0..11
            cv2.imwrite(str(root / f"{split}annot" / f"{name}.png"), m)
            masks[name] = m
    return root, masks


def test_camvid_round_trip(camvid):
    root, masks = camvid
    ds = CamVid(root, "train")
    assert len(ds) == 2 and len(ds.labels) == 11 and ds.labels[3] == "road" and ds.palette[0] == [128, 128, 128]
    img, mask = ds[1]
    assert img.shape == (36, 48, 3)
    expected = masks["0001TP_006720"].copy()
    expected[expected == 11] = 255  # void
    np.testing.assert_array_equal(mask, expected)
    assert len(open_dataset(f"camvid:{root}", "test")) == 1


def test_camvid_errors_name_the_file(camvid):
    root, _ = camvid
    m = np.full((36, 48), 12, np.uint8)
    cv2.imwrite(str(root / "valannot" / "0016E5_07959.png"), m)
    with pytest.raises(DatasetError, match=r"0016E5_07959\.png.*12"):
        CamVid(root, "val")[0]
    corrupt(root / "test" / "Seq05VD_f00000.png")
    with pytest.raises(DatasetError, match="Seq05VD_f00000.png"):
        CamVid(root, "test")[0]
    with pytest.raises(DatasetError, match="trainannot"):
        (root / "trainannot" / "0001TP_006690.png").unlink()
        (root / "trainannot" / "0001TP_006720.png").unlink()
        (root / "trainannot").rmdir()
        CamVid(root, "train")


# --- COCO ------------------------------------------------------------------------------------
def coco_fixture(tmp_path):
    images = tmp_path / "val2017"
    images.mkdir()
    cv2.imwrite(str(images / "000000000139.jpg"), blocks_image(20, 30, 0))
    cv2.imwrite(str(images / "000000000285.jpg"), blocks_image(16, 16, 1))
    h, w = 20, 30
    # image 139: a person box (polygon), a smaller dog box on top of it (compressed RLE string),
    # a crowd of cars (uncompressed RLE); expected semantic mask by hand:
    expected = np.zeros((h, w), np.uint8)
    person = np.zeros((h, w), np.uint8)
    person[2:12, 3:15] = 1                       # polygon x 3..15, y 2..12
    dog = np.zeros((h, w), np.uint8)
    dog[6:10, 10:20] = 1
    crowd = np.zeros((h, w), np.uint8)
    crowd[14:18, 20:28] = 1
    expected[person == 1] = 1                    # person: category 1 -> class 1
    expected[dog == 1] = 3                       # dog: category 18 -> class 3 (smaller, painted last)
    expected[crowd == 1] = 255                   # crowd -> ignore
    doc = {
        "images": [{"id": 139, "file_name": "000000000139.jpg", "height": h, "width": w},
                   {"id": 285, "file_name": "000000000285.jpg", "height": 16, "width": 16}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 139, "category_id": 1, "iscrowd": 0, "segmentation": [[3, 2, 15, 2, 15, 12, 3, 12]]},
            {"id": 2, "image_id": 139, "category_id": 18, "iscrowd": 0, "segmentation": rle_encode(dog, compressed=True)},
            {"id": 3, "image_id": 139, "category_id": 3, "iscrowd": 1, "segmentation": rle_encode(crowd, compressed=False)},
            {"id": 4, "image_id": 285, "category_id": 3, "iscrowd": 0,
             "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8], [10, 10, 16, 10, 16, 16, 10, 16]]},
        ],
    }
    expected2 = np.zeros((16, 16), np.uint8)
    expected2[0:8, 0:8] = 2
    expected2[10:16, 10:16] = 2
    ann = tmp_path / "annotations" / "instances_val2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(doc))
    return ann, images, doc, [expected, expected2]


BACKENDS = ["builtin"] + (["pycocotools"] if _have_pycocotools() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_polygons_and_rle_to_semantic(tmp_path, backend):
    ann, images, _, expected = coco_fixture(tmp_path)
    ds = COCOSegmentation(ann, images, backend=backend)
    assert ds.labels == ["background", "person", "car", "dog"]  # category ids 1, 3, 18 -> classes 1, 2, 3
    assert len(ds) == 2
    for i in range(2):
        img, mask = ds[i]
        assert img.shape[:2] == mask.shape
        np.testing.assert_array_equal(mask, expected[i])
    crowd_as_class = COCOSegmentation(ann, images, crowd="class", backend=backend)[0][1]
    assert (crowd_as_class == 2).sum() == 4 * 8
    spec = open_dataset(f"coco:{ann}:{images}")
    np.testing.assert_array_equal(spec[0][1], expected[0])
    by_root = open_dataset(f"coco:{tmp_path}", split="val")
    assert len(by_root) == 2


def test_coco_rle_codec():
    rng = np.random.default_rng(0)
    for k in range(50):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if k % 5 == 0:
            m[:] = k % 2
        for compressed in (True, False):
            np.testing.assert_array_equal(rle_decode(rle_encode(m, compressed)), m)
        if _have_pycocotools():
            from pycocotools import mask as mu

            ref = mu.encode(np.asfortranarray(m))
            assert rle_encode(m)["counts"] == ref["counts"].decode()
            np.testing.assert_array_equal(rle_decode({"size": ref["size"], "counts": ref["counts"].decode()}), m)
    # hand-made: 3x2 mask, column-major runs: 1 zero, 2 ones, 3 zeros -> [[0, 0], [1, 0], [1, 0]]
    np.testing.assert_array_equal(rle_decode({"size": [3, 2], "counts": [1, 2, 3]}), [[0, 0], [1, 0], [1, 0]])
    # a pixel is inside a polygon when its centre is: triangle (0,0) (4,0) (0,4) holds the centres
    # (x + .5, y + .5) with x + y + 1 < 4, i.e. x + y < 3
    np.testing.assert_array_equal(polygon_mask([0, 0, 4, 0, 0, 4], 4, 4),
                                  [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_coco_errors_name_the_problem(tmp_path):
    ann, images, doc, _ = coco_fixture(tmp_path)
    doc["annotations"][1]["category_id"] = 99
    ann.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"annotation 2 .*000000000139.jpg.*category_id 99"):
        COCOSegmentation(ann, images)[0]
    corrupt(images / "000000000285.jpg")
    with pytest.raises(DatasetError, match="000000000285.jpg"):
        COCOSegmentation(ann, images)[1]
    doc["annotations"][1]["category_id"] = 18
    doc["annotations"][1]["segmentation"] = {"size": [20, 30], "counts": [5, 5]}
    ann.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="annotation 2.*bad segmentation.*RLE runs sum to 10"):
        COCOSegmentation(ann, images)[0]
    ann.write_text("{not json")
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        COCOSegmentation(ann, images)


# --- image/mask folders ----------------------------------------------------------------------
def make_folder(root: Path, n=3, labels_txt: str | None = "sky 70 130 180\nroad 128 64 128\ncar 0 0 142\n", colour=False):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    pal = np.array([[70, 130, 180], [128, 64, 128], [0, 0, 142]], np.uint8)
    masks = []
    for k in range(n):
        cv2.imwrite(str(root / "images" / f"frame_{k:03d}.jpg"), blocks_image(24, 24, k))
        m = np.zeros((24, 24), np.uint8)
        m[12:, :] = 1
        m[14:20, 4 + k:12 + k] = 2
        m[0, 0] = 255
        masks.append(m)
        if colour:
            rgb = pal[np.minimum(m, 2)]
            rgb[m == 255] = pal[0]
            cv2.imwrite(str(root / "masks" / f"frame_{k:03d}.png"), rgb[..., ::-1])
            masks[-1] = np.where(m == 255, 0, m).astype(np.uint8)
        else:
            cv2.imwrite(str(root / "masks" / f"frame_{k:03d}.png"), m)
    if labels_txt is not None:
        (root / "labels.txt").write_text(labels_txt)
    return masks


def test_folder_round_trip(tmp_path):
    masks = make_folder(tmp_path / "data")
    ds = open_dataset(str(tmp_path / "data"), split="train")
    assert isinstance(ds, FolderDataset) and len(ds) == 3 and not ds.has_splits
    assert ds.labels == ["sky", "road", "car"] and ds.palette[2] == [0, 0, 142]
    for i in range(3):
        img, mask = ds[i]
        assert img.shape == (24, 24, 3)
        np.testing.assert_array_equal(mask, masks[i])
    # without labels.txt the classes are counted from the masks
    masks = make_folder(tmp_path / "bare", labels_txt=None)
    assert FolderDataset(tmp_path / "bare").labels == ["class_0", "class_1", "class_2"]
    # colour masks map through the labels' colours
    masks = make_folder(tmp_path / "colour", colour=True)
    np.testing.assert_array_equal(FolderDataset(tmp_path / "colour")[1][1], masks[1])
    # split subfolders
    make_folder(tmp_path / "split" / "train", n=2, labels_txt=None)
    make_folder(tmp_path / "split" / "val", n=1, labels_txt=None)
    (tmp_path / "split" / "labels.txt").write_text("a\nb\nc\n")
    tr, va = open_dataset(f"folder:{tmp_path / 'split'}", "train"), open_dataset(f"folder:{tmp_path / 'split'}", "val")
    assert (len(tr), len(va), tr.labels, tr.has_splits) == (2, 1, ["a", "b", "c"], True)


def test_folder_errors_name_the_file(tmp_path):
    make_folder(tmp_path / "d")
    bad = np.zeros((24, 24), np.uint8)
    bad[3, 3] = 7
    cv2.imwrite(str(tmp_path / "d" / "masks" / "frame_001.png"), bad)
    with pytest.raises(DatasetError, match=r"frame_001\.png.*class id\(s\) \[7\] outside 0..2"):
        FolderDataset(tmp_path / "d")[1]
    cv2.imwrite(str(tmp_path / "d" / "masks" / "frame_002.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError, match=r"frame_002\.png is 10x10 but its image is 24x24"):
        FolderDataset(tmp_path / "d")[2]
    corrupt(tmp_path / "d" / "images" / "frame_000.jpg")
    with pytest.raises(DatasetError, match="frame_000.jpg"):
        FolderDataset(tmp_path / "d")[0]
    (tmp_path / "d" / "masks" / "frame_000.png").unlink()
    with pytest.raises(DatasetError, match="have no mask.*frame_000.jpg"):
        FolderDataset(tmp_path / "d")
    make_folder(tmp_path / "c", colour=True)
    cv2.imwrite(str(tmp_path / "c" / "masks" / "frame_000.png"), np.full((24, 24, 3), (1, 2, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"frame_000\.png has colour RGB\(3, 2, 1\)"):
        FolderDataset(tmp_path / "c")[0]


# --- open_dataset ----------------------------------------------------------------------------
def test_open_dataset_specs(tmp_path):
    s = open_dataset("synthetic:test?n=7&size=32x48")
    assert len(s) == 7 and s[0][0].shape == (32, 48, 3) and s.labels[0] == "background"
    assert len(open_dataset("synthetic", split="train")) == 200
    a, b = open_dataset("synthetic:val?n=2&size=32"), open_dataset("synthetic:test?n=2&size=32")
    assert not np.array_equal(a[0][0], b[0][0])
    for bad, words in [("", "empty"), ("voc:", "names no path"), (f"voc:{tmp_path}/nope", "not found"),
                       ("synthetic:?color=1", "options are n, size, seed"), ("synthetic:dev", "train, val or test"),
                       (str(tmp_path), "images folder not found")]:
        with pytest.raises(DatasetError, match=words):
            open_dataset(bad)


def test_readers_do_not_import_torch():
    code = ("import sys; import edgeseg.data as d; from edgeseg.data import voc, cityscapes, camvid, coco, folder, augment; "
            "d.open_dataset('synthetic:val?n=1&size=16')[0]; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- augmentation ----------------------------------------------------------------------------
def coloured_scene(seed=0, h=48, w=64):
    """An image whose colour at each pixel is the palette colour of its class."""
    m = np.zeros((h, w), np.uint8)
    rng = np.random.default_rng(seed)
    for c in (1, 2, 3):
        y, x = rng.integers(0, h - 16), rng.integers(0, w - 16)
        m[y:y + 16, x:x + 20] = c
    pal = np.array(VOC_PALETTE[:4], np.uint8)
    return np.ascontiguousarray(pal[m][..., ::-1]), m, pal


def test_augment_keeps_masks_aligned():
    img, m, pal = coloured_scene()
    aug = Augment(hflip=0.5, vflip=0.5, scale=(0.5, 1.8), crop=(40, 40))
    for k in range(12):
        a_img, a_mask = aug(img, m, np.random.default_rng(k))
        assert a_img.shape == (40, 40, 3) and a_img.dtype == np.uint8 and a_mask.shape == (40, 40)
        assert set(np.unique(a_mask)) <= {0, 1, 2, 3, 255}  # nearest: no blended class ids
        for c in range(4):
            # 1 px in from every class edge (and from the crop's edge: what lies beyond is unknown);
            # a mask resized with OpenCV's plain INTER_NEAREST (half a pixel off) fails this
            inner = cv2.erode((a_mask == c).astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0).astype(bool)
            if inner.any():
                assert np.abs(a_img[inner][:, ::-1].astype(int) - pal[c]).max() <= 1, f"class {c} misaligned"
    # scale 0.5: the 24x32 result is padded to the 40x40 crop; padding is ignore in the mask, 0 in the image
    p_img, p_mask = Augment(hflip=0, scale=(0.5, 0.5), crop=(40, 40))(img, m, np.random.default_rng(0))
    assert (p_mask[24:] == 255).all() and (p_mask[:, 32:] == 255).all() and (p_img[24:] == 0).all()
    np.testing.assert_array_equal(p_mask[:24, :32], cv2.resize(m, (32, 24), interpolation=cv2.INTER_NEAREST_EXACT))


def test_augment_is_deterministic_and_jitters_colour_only():
    img, m, _ = coloured_scene(1)
    aug = Augment(hflip=0.5, scale=(0.75, 1.25), brightness=0.3, contrast=0.3, saturation=0.3)
    class Pairs(list):
        labels = ["background", "aeroplane", "bicycle", "bird"]

    ds = AugmentedDataset(Pairs([(img, m)] * 4), aug, seed=3)
    x1, y1 = ds[2]
    x2, y2 = ds[2]
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    outs = {ds[i][0].tobytes() for i in range(4)}
    assert len(outs) > 1  # indices draw differently
    ds.set_epoch(1)
    assert ds[2][0].tobytes() != x1.tobytes()  # so do epochs
    # colour jitter alone changes no geometry
    j_img, j_mask = Augment(hflip=0, brightness=0.5, contrast=0.5, saturation=0.5)(img, m, np.random.default_rng(0))
    np.testing.assert_array_equal(j_mask, m)
    assert not np.array_equal(j_img, img)
    f_img, f_mask = Augment(hflip=1.0)(img.astype(np.float32), m, np.random.default_rng(0))
    assert f_img.dtype == np.float32
    np.testing.assert_array_equal(f_mask, m[:, ::-1])
    np.testing.assert_array_equal(f_img, img[:, ::-1].astype(np.float32))
