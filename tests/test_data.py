"""Tests of tinyunet.data: PNG modes, Kaggle's layout (folder and zips), clear errors, and the array ops."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tinyunet import data
from tinyunet.data import DataError
from tinyunet.transforms import luma

REAL = Path(os.environ.get("TINYUNET_TGS_DATA",
                           Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tgs-salt"))


def real_data() -> Path:
    """The real TGS folder, or skip the test saying where it was looked for."""
    if not (REAL / "train" / "images").is_dir():
        pytest.skip(f"real TGS data not found at {REAL} (set TINYUNET_TGS_DATA to its folder)")
    return REAL


def png_bytes(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    """PNG bytes of ``array`` (converted to ``mode`` when given)."""
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def tiny_set(rng, n: int = 6, shape=(11, 13)) -> dict[str, bytes]:
    """A small set in Kaggle's layout as {relative path: bytes}: train pairs, CSVs, test images."""
    from tinyunet.rle import rle_encode

    files, rows, depths = {}, ["id,rle_mask"], ["id,z"]
    for i in range(n):
        image_id = f"{i:02d}abcdef{i}"
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mask = rng.random(shape) < (0.3 if i % 3 else 0.0)  # every third mask empty
        files[f"train/images/{image_id}.png"] = png_bytes(image)
        files[f"train/masks/{image_id}.png"] = png_bytes(mask.astype(np.uint8) * 255)
        files[f"test/images/t{image_id}.png"] = png_bytes(image[::-1])
        rows.append(f"{image_id},{rle_encode(mask)}")
        depths.append(f"{image_id},{100 + i}")
    files["train.csv"] = ("\n".join(rows) + "\n").encode()
    files["depths.csv"] = ("\n".join(depths) + "\n").encode()
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, content in files.items():
            zf.writestr(rel, content)
    return buf.getvalue()


def competition_zip(files: dict[str, bytes]) -> bytes:
    """The download's form: train.zip (images/, masks/), test.zip (images/) and the CSVs."""
    parts = {"train": {}, "test": {}, "": {}}
    for rel, content in files.items():
        top, _, rest = rel.partition("/")
        parts[top if rest else ""][rest or rel] = content
    return zip_bytes({"train.zip": zip_bytes(parts["train"]), "test.zip": zip_bytes(parts["test"]),
                      **parts[""]})


def assert_same_sets(a: data.TrainSet, b: data.TrainSet) -> None:
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)


# ---------------------------------------------------------------------------------------------
# PNG modes
# ---------------------------------------------------------------------------------------------

GRAY = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)  # 64 distinct gray levels


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_read_image_8bit_modes_scale_by_255(mode):
    png = png_bytes(GRAY, mode)
    assert Image.open(io.BytesIO(png)).mode == mode
    image = data.read_image(png, "x.png")
    assert image.dtype == np.float32 and image.shape == (8, 8)
    np.testing.assert_allclose(image, GRAY / 255, atol=1e-6)


def test_read_image_16bit_scales_by_65535():
    values = (GRAY.astype(np.uint16) * 257)  # 0..65535
    png = png_bytes(values)
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    np.testing.assert_allclose(data.read_image(png), values / 65535, atol=1e-6)


def test_read_image_colour_stays_rgb_and_its_luma_is_pils():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (0, 0, 255)
    image = data.read_image(png_bytes(rgb))
    np.testing.assert_allclose(image, rgb / 255, atol=1e-6)
    np.testing.assert_allclose(luma(image), [[0.299, 0], [0, 0.114]], atol=1e-6)


def test_read_image_from_path(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(GRAY))
    np.testing.assert_allclose(data.read_image(tmp_path / "a.png"), GRAY / 255, atol=1e-6)


@pytest.mark.parametrize("salt, mode", [(255, "L"), (65535, None), (255, "1"), (255, "P"), (255, "RGB"),
                                        (7, "L")])
def test_read_mask_any_mode_positive_is_salt(salt, mode):
    truth = np.eye(5, dtype=bool)
    array = truth.astype(np.uint16 if salt > 255 else np.uint8) * salt
    mask = data.read_mask(png_bytes(array, mode))
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask, truth)


def test_read_mask_palette_reads_colours_not_indices():
    img = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 is white (salt), 1 black
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    np.testing.assert_array_equal(data.read_mask(buf.getvalue()), [[1, 0], [0, 1]])


def test_read_mask_not_binary_says_how_it_was_read():
    with pytest.raises(DataError, match=r"m\.png is not binary.*'L'.*3 distinct values \(0, 128, 255\)"):
        data.read_mask(png_bytes(np.array([[0, 128, 255]], np.uint8)), "m.png")


@pytest.mark.parametrize("cut", [0, 20, -30])
def test_corrupt_or_truncated_png_names_the_file(cut):
    png = png_bytes(GRAY)
    broken = b"not a png at all" if cut == 0 else png[:cut]
    with pytest.raises(DataError, match=r"cannot decode train/images/abc\.png.*corrupt or truncated"):
        data.read_image(broken, "train/images/abc.png")


def test_unsupported_mode_is_a_clear_error(tmp_path):
    Image.fromarray(np.zeros((3, 3), np.float32), mode="F").save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match="PIL mode 'F'.*grayscale PNG"):
        data.read_image(tmp_path / "f.tiff")


def test_check_finite():
    data.check_finite(np.zeros((2, 3)), "x")
    bad = np.zeros((2, 3))
    bad[1, 2] = np.nan
    bad[0, 1] = np.inf
    with pytest.raises(DataError, match=r"images has 2 NaN or infinite values \(the first at index \(0, 1\)\)"):
        data.check_finite(bad, "images")


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "a\\b", "c:x", "x..y", "a\0b"])
def test_check_id_rejects_non_plain_names(bad):
    with pytest.raises(DataError, match="not a plain file name"):
        data.check_id(bad, "train.csv")


# ---------------------------------------------------------------------------------------------
# Kaggle's layout: folder, zips, and what goes wrong
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def files():
    return tiny_set(np.random.default_rng(0))


@pytest.fixture
def folder(tmp_path, files):
    return write_folder(tmp_path / "tgs", files)


def test_load_train_folder(folder, files):
    ts = data.load_train(folder)
    assert len(ts) == 6 and ts.ids == sorted(ts.ids)
    assert ts.images.shape == ts.masks.shape == (6, 11, 13)
    assert ts.images.dtype == ts.masks.dtype == np.float32
    first = np.asarray(Image.open(io.BytesIO(files[f"train/images/{ts.ids[0]}.png"])))
    np.testing.assert_allclose(ts.images[0], first / 255, atol=1e-6)
    assert set(np.unique(ts.masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(data.load_depths(folder, ts.ids), np.arange(100, 106))


def test_load_test_folder(folder):
    ids, images = data.load_test(folder)
    assert len(ids) == 6 and ids[0].startswith("t") and images.shape == (6, 11, 13)


def test_masks_from_train_csv_when_masks_folder_missing(tmp_path, files):
    full = data.load_train(write_folder(tmp_path / "a", files))
    no_masks = {k: v for k, v in files.items() if not k.startswith("train/masks/")}
    assert_same_sets(data.load_train(write_folder(tmp_path / "b", no_masks)), full)


def test_depths_optional_and_nan_where_missing(tmp_path, files):
    del files["depths.csv"]
    ids = data.load_train(write_folder(tmp_path / "a", files)).ids
    assert data.load_depths(tmp_path / "a", ids) is None
    files["depths.csv"] = b"id,z\n00abcdef0,5\n"
    depths = data.load_depths(write_folder(tmp_path / "b", files), ids)
    assert depths[0] == 5 and np.isnan(depths[1:]).all()


def test_a_flawed_depths_csv_does_not_stop_loading_the_training_set(tmp_path, files):
    """Training never uses depths.csv, so a flaw in it stops only load_depths."""
    files["depths.csv"] = b"id,z\n00abcdef0,deep\n"
    folder = write_folder(tmp_path / "a", files)
    ts = data.load_train(folder)
    with pytest.raises(data.DataError, match="not a number"):
        data.load_depths(folder, ts.ids)


@pytest.mark.parametrize("form", ["flat", "top_folder", "competition", "folder_of_zips"])
def test_zips_load_like_the_folder(tmp_path, folder, files, form):
    if form == "flat":
        path = tmp_path / "flat.zip"
        path.write_bytes(zip_bytes(files))
    elif form == "top_folder":
        path = tmp_path / "top.zip"
        path.write_bytes(zip_bytes({f"tgs-salt/{k}": v for k, v in files.items()}))
    elif form == "competition":
        path = tmp_path / "tgs-salt-identification-challenge.zip"
        path.write_bytes(competition_zip(files))
    else:  # the download unzipped once: train.zip, test.zip and the CSVs in a folder
        path = tmp_path / "unzipped"
        with zipfile.ZipFile(io.BytesIO(competition_zip(files))) as zf:
            write_folder(path, {name: zf.read(name) for name in zf.namelist()})
    assert_same_sets(data.load_train(path), data.load_train(folder))
    ids, images = data.load_test(path)
    ref_ids, ref_images = data.load_test(folder)
    assert ids == ref_ids
    np.testing.assert_array_equal(images, ref_images)


def test_competition_zip_without_masks_uses_train_csv(tmp_path, folder, files):
    no_masks = {k: v for k, v in files.items() if not k.startswith("train/masks/")}
    path = tmp_path / "c.zip"
    path.write_bytes(competition_zip(no_masks))
    assert_same_sets(data.load_train(path), data.load_train(folder))


def test_missing_path_empty_folder_and_not_a_zip(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_train(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        data.load_train(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a folder nor a zip"):
        data.load_train(tmp_path / "x.txt")
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError):
        data.load_train(tmp_path / "bad.zip")


def test_not_kaggle_layout_says_what_it_found(tmp_path):
    write_folder(tmp_path / "d", {"images/a.png": png_bytes(GRAY), "notes.txt": b""})
    with pytest.raises(DataError, match=r"has images/ but no masks/ beside it, it holds images/, notes.txt"):
        data.load_train(tmp_path / "d")
    path = tmp_path / "z.zip"
    path.write_bytes(zip_bytes({"readme.md": b"x", "other/a.png": b""}))
    with pytest.raises(DataError, match="has no train/images.*expected Kaggle's layout"):
        data.load_train(path)


def test_test_part_missing(tmp_path, files):
    train_only = {k: v for k, v in files.items() if not k.startswith("test/")}
    with pytest.raises(DataError, match="no test/images"):
        data.load_test(write_folder(tmp_path / "d", train_only))


def test_inner_zip_without_images(tmp_path, files):
    path = tmp_path / "c.zip"
    path.write_bytes(zip_bytes({"train.zip": zip_bytes({"pics/a.png": b""}), "train.csv": b"id,rle_mask\n"}))
    with pytest.raises(DataError, match=r"c\.zip/train\.zip has no images/ folder"):
        data.load_train(path)


def test_unmatched_ids_are_named(tmp_path, files):
    mask_ids = sorted(k for k in files if k.startswith("train/masks/"))
    files["train/masks/zzextra.png"] = files.pop(mask_ids[0])
    with pytest.raises(DataError, match=r"1 image\(s\) in .* have no mask \(00abcdef0\); "
                                        r"1 mask\(s\) have no image .* \(zzextra\)"):
        data.load_train(write_folder(tmp_path / "d", files))


def test_unmatched_csv_rows_are_named(tmp_path, files):
    no_masks = {k: v for k, v in files.items() if not k.startswith("train/masks/")}
    no_masks["train.csv"] = b"id,rle_mask\n00abcdef0,1 3\n"
    with pytest.raises(DataError, match=r"5 image\(s\) .* have no row in train.csv \(01abcdef1,"):
        data.load_train(write_folder(tmp_path / "d", no_masks))


def test_no_masks_and_no_csv(tmp_path, files):
    bare = {k: v for k, v in files.items() if k.startswith("train/images/")}
    with pytest.raises(DataError, match="neither train/masks nor train.csv"):
        data.load_train(write_folder(tmp_path / "d", bare))


def test_bad_rle_in_csv_names_the_id(tmp_path, files):
    no_masks = {k: v for k, v in files.items() if not k.startswith("train/masks/")}
    rows = files["train.csv"].decode().splitlines()
    rows[1] = rows[1].split(",")[0] + ",5 x"
    no_masks["train.csv"] = "\n".join(rows).encode()
    with pytest.raises(DataError, match="run-length string for id 00abcdef0 is invalid"):
        data.load_train(write_folder(tmp_path / "d", no_masks))


def test_csv_id_that_is_a_path_is_rejected(tmp_path, files):
    no_masks = {k: v for k, v in files.items() if not k.startswith("train/masks/")}
    no_masks["train.csv"] = files["train.csv"] + b"../escape,1 2\n"
    with pytest.raises(DataError, match=r"id '../escape' in .*train.csv is not a plain file name"):
        data.load_train(write_folder(tmp_path / "d", no_masks))


def test_zip_member_escaping_the_folder_is_rejected(tmp_path, files):
    files["train/images/..\\..\\evil.png"] = files["train/images/00abcdef0.png"]
    path = tmp_path / "z.zip"
    path.write_bytes(zip_bytes(files))
    with pytest.raises(DataError, match="not a plain file name"):
        data.load_train(path)


def test_damaged_zip_member_is_named(tmp_path, files):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for rel, content in files.items():
            zf.writestr(rel, content)
        info = zf.getinfo("train/images/00abcdef0.png")
    raw = bytearray(buf.getvalue())
    raw[info.header_offset + 30 + len(info.filename) + 40] ^= 0xFF  # a byte of the stored PNG
    (tmp_path / "d.zip").write_bytes(raw)
    with pytest.raises(DataError, match=r"cannot read .*d\.zip/train/images/00abcdef0\.png from the zip"):
        data.load_train(tmp_path / "d.zip")


def test_images_of_mixed_sizes_load_as_a_list_each_with_its_mask(tmp_path, files):
    files["train/images/03abcdef3.png"] = png_bytes(np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match=r"mask .*03abcdef3\.png is 13x11 but its image is 20x20"):
        data.load_train(write_folder(tmp_path / "d", files))
    files["train/masks/03abcdef3.png"] = png_bytes(np.eye(20, dtype=np.uint8) * 255)
    ts = data.load_train(write_folder(tmp_path / "e", files))
    assert isinstance(ts.images, list) and isinstance(ts.masks, list)
    assert [m.shape for m in ts.masks] == [i.shape for i in ts.images]
    assert ts.images[3].shape == (20, 20) and ts.images[0].shape == (11, 13)
    np.testing.assert_array_equal(ts.masks[3], np.eye(20))
    assert data.coverage(ts.masks)[3] == pytest.approx(1 / 20)


def test_mask_of_another_size_is_named(tmp_path, files):
    files["train/masks/02abcdef2.png"] = png_bytes(np.zeros((11, 12), np.uint8))
    with pytest.raises(DataError, match=r"mask .*02abcdef2\.png is 12x11 but its image is 13x11"):
        data.load_train(write_folder(tmp_path / "d", files))


def test_corrupt_file_in_a_set_is_named(tmp_path, files):
    files["train/images/04abcdef4.png"] = files["train/images/04abcdef4.png"][:40]
    with pytest.raises(DataError, match=r"cannot decode .*train/images/04abcdef4\.png"):
        data.load_train(write_folder(tmp_path / "d", files))


def test_other_image_sizes_load(tmp_path):
    rng = np.random.default_rng(3)
    ts = data.load_train(write_folder(tmp_path / "d", tiny_set(rng, n=2, shape=(512, 512))))
    assert ts.images.shape == (2, 512, 512)


# ---------------------------------------------------------------------------------------------
# Coverage and the split
# ---------------------------------------------------------------------------------------------

def test_coverage_and_classes(xp):
    masks = xp.zeros((5, 10, 10, 1), xp.float32)
    masks[1, :1, :1] = 1  # 1 %
    masks[2, :1] = 1  # exactly 10 %: class 1, not 2
    masks[3, :5] = 1  # 50 %
    masks[4] = 1  # 100 %
    cov = data.coverage(masks)
    np.testing.assert_allclose(cov.tolist(), [0, 0.01, 0.1, 0.5, 1])
    assert data.coverage_class(cov).tolist() == [0, 1, 1, 5, 10]


def test_stratified_split_basic():
    classes = np.repeat(np.arange(11), [300, 80, 40, 30, 25, 20, 20, 15, 10, 5, 2])
    train, val = data.stratified_split(classes, 0.2, seed=0)
    assert len(val) == round(0.2 * len(classes))
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(classes)))
    for c in range(11):
        members = np.flatnonzero(classes == c)
        n_val = np.isin(members, val).sum()
        assert 1 <= n_val <= len(members) - 1
        assert abs(n_val - 0.2 * len(members)) <= 1.0
    again = data.stratified_split(classes, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(data.stratified_split(classes, 0.2, seed=1)[1], val)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10), min_size=2, max_size=300), st.floats(0.05, 0.95), st.integers(0, 9))
def test_stratified_split_properties(labels, fraction, seed):
    classes = np.array(labels)
    train, val = data.stratified_split(classes, fraction, seed)
    assert len(train) >= 1 and len(val) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(len(classes)))
    for c, count in zip(*np.unique(classes, return_counts=True)):
        n_val = np.isin(np.flatnonzero(classes == c), val).sum()
        if count >= 2:
            assert 1 <= n_val <= count - 1


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        data.stratified_split(np.zeros(10, int), fraction)


# ---------------------------------------------------------------------------------------------
# The fingerprint
# ---------------------------------------------------------------------------------------------

def test_fingerprint(xp):
    images = xp.asarray(np.random.default_rng(0).random((3, 5, 5)).astype(np.float32))
    masks = (images > 0.5).astype(xp.float32)
    fp = data.fingerprint(["a", "b", "c"], images, masks)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert data.fingerprint(["a", "b", "c"], images.astype(xp.float64), masks > 0) == fp
    assert data.fingerprint(["a", "b", "d"], images, masks) != fp
    changed = images.copy()
    changed[0, 0, 0] += 0.01
    assert data.fingerprint(["a", "b", "c"], changed, masks) != fp


# ---------------------------------------------------------------------------------------------
# The real TGS data (skipped where it is absent)
# ---------------------------------------------------------------------------------------------

def test_real_data_loads():
    ts = data.load_train(real_data())
    assert len(ts) == 3200 and len(set(ts.ids)) == 3200
    assert ts.images.shape == (3200, 101, 101)
    assert 0 <= ts.images.min() and ts.images.max() <= 1
    assert set(np.unique(ts.masks)) == {0.0, 1.0}
    classes = data.coverage_class(data.coverage(ts.masks))
    assert 0.37 < np.mean(classes == 0) < 0.41  # about 39 % empty
    assert set(classes.tolist()) == set(range(11))
    assert not np.isnan(data.load_depths(real_data(), ts.ids)).any()
    ids, test_images = data.load_test(real_data())
    assert len(ids) == 1000 and test_images.shape == (1000, 101, 101)


def test_real_files_load_the_same_from_zips_and_csv(tmp_path):
    root = real_data()
    names = sorted(p.name for p in (root / "train" / "images").iterdir())[:40]
    modes = {Image.open(root / "train" / "masks" / n).mode for n in names}
    assert modes == {"L", "I;16"}  # both mask modes of the real set are exercised
    files = {f"train/{kind}/{n}": (root / "train" / kind / n).read_bytes()
             for kind in ("images", "masks") for n in names}
    test_names = sorted(p.name for p in (root / "test" / "images").iterdir())[:5]
    files.update({f"test/images/{n}": (root / "test" / "images" / n).read_bytes() for n in test_names})
    ids = {n[:-4] for n in names}
    for csv_name in ("train.csv", "depths.csv"):
        lines = (root / csv_name).read_text().splitlines()
        files[csv_name] = ("\n".join([lines[0]] + [l for l in lines[1:] if l.split(",")[0] in ids])
                           + "\n").encode()
    reference = data.load_train(write_folder(tmp_path / "folder", files))
    assert reference.ids == [n[:-4] for n in names]
    assert np.isnan(data.load_depths(tmp_path / "folder", reference.ids)).sum() == 0

    nested = tmp_path / "tgs-salt-identification-challenge.zip"
    nested.write_bytes(competition_zip(files))
    flat = tmp_path / "flat.zip"
    flat.write_bytes(zip_bytes(files))
    csv_only = {k: v for k, v in files.items() if not k.startswith("train/masks/")}
    from_csv = write_folder(tmp_path / "csv", csv_only)
    for path in (nested, flat, from_csv):
        assert_same_sets(data.load_train(path), reference)
    assert data.load_test(nested)[0] == [n[:-4] for n in test_names]
