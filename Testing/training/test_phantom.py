"""The synthetic MS phantom generator: determinism, geometry, lesion placement, dataset files and CLI.

Most cases are built at scale 2 (2 mm canvas, voxel sizes doubled) to keep the suite fast; one 3D and one
2D case run at full resolution to check the real protocol numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

pytest.importorskip("nilearn")

from samless.errors import SamlessError  # noqa: E402
from samless.training.phantom import (  # noqa: E402
    case_seed,
    generate_case,
    register_cli,
    template_map,
)
from samless.training.phantom_anatomy import anatomy  # noqa: E402
from samless.training.phantom_lesions import draw_lesions  # noqa: E402
from samless.training.split import assign_folds  # noqa: E402

SCALE = 2


def arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-9)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-9)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-12))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="samless")
    sub = parser.add_subparsers(dest="command", required=True)
    register_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def case3d():
    return generate_case(4, "3d", ("flair", "t1", "t2"), lesion_load="high", scale=SCALE)


@pytest.fixture(scope="module")
def case2d():
    return generate_case(11, "2d", ("flair",), lesion_load="high", scale=SCALE)


def test_same_seed_same_case_other_seed_differs():
    a = generate_case(5, "2d", lesion_load="medium", scale=SCALE)
    b = generate_case(5, "2d", lesion_load="medium", scale=SCALE)
    c = generate_case(6, "2d", lesion_load="medium", scale=SCALE)
    assert np.array_equal(arr(a.images["flair"]), arr(b.images["flair"]))
    assert np.array_equal(arr(a.mask), arr(b.mask))
    assert same_grid(a.mask, b.mask) and a.meta == b.meta
    assert not same_grid(a.mask, c.mask) or not np.array_equal(arr(a.images["flair"]), arr(c.images["flair"]))
    assert not np.array_equal(arr(a.mask), arr(c.mask))
    # adding modalities does not change the FLAIR of a case
    d = generate_case(5, "2d", ("flair", "t2"), lesion_load="medium", scale=SCALE)
    assert np.array_equal(arr(a.images["flair"]), arr(d.images["flair"]))


def test_images_and_mask_share_the_grid_and_lesions_are_bright(case3d, case2d):
    for case in (case3d, case2d):
        assert case.mask.GetPixelID() == sitk.sitkUInt8
        for img in case.images.values():
            assert img.GetPixelID() == sitk.sitkInt16
            assert same_grid(img, case.mask)
        mask = arr(case.mask).astype(bool)
        assert mask.any() and case.lesion_count >= 1
        wm = arr(template_map(case, "wm"))
        ring = ndi.binary_dilation(mask, iterations=2) & ~mask & (wm > 0.8)
        flair = arr(case.images["flair"]).astype(float)
        assert flair[mask].mean() > 1.15 * flair[ring].mean()  # 2 mm voxels: partial volume at the edges
        if "t1" in case.images:  # lesions are hypointense on T1, hyperintense on T2
            assert arr(case.images["t1"])[mask].mean() < 0.9 * arr(case.images["t1"])[ring].mean()
            assert arr(case.images["t2"])[mask].mean() > 1.2 * arr(case.images["t2"])[ring].mean()
        voxel_ml = np.prod(case.mask.GetSpacing()) / 1000
        assert case.lesion_volume_ml == pytest.approx(mask.sum() * voxel_ml)


def test_the_soft_mask_is_the_partial_volume_the_mask_thresholds(case3d, case2d):
    for case in (case3d, case2d):
        soft = arr(case.soft_mask)
        assert case.soft_mask.GetPixelID() == sitk.sitkFloat32 and same_grid(case.soft_mask, case.mask)
        assert soft.min() >= 0 and soft.max() <= 1
        assert np.array_equal(arr(case.mask), (soft >= 0.5).astype(np.uint8))
        edge = (soft > 0.05) & (soft < 0.95)  # lesion borders are partial, mostly just outside the mask
        assert edge.sum() > 0.2 * arr(case.mask).sum()
        assert (edge & (arr(case.mask) == 0)).any() and (edge & (arr(case.mask) == 1)).any()


def test_lesions_lie_in_white_matter_inside_the_brain(case3d, case2d):
    """Map every lesion voxel back to MNI space (through the case's own transform) and look it up."""
    for case in (case3d, case2d):
        mask = arr(case.mask).astype(bool)
        wm = arr(template_map(case, "wm"))[mask]
        brain = arr(template_map(case, "brain"))[mask]
        csf = arr(template_map(case, "csf"))[mask]
        assert (wm > 0.3).mean() > 0.95
        assert brain.min() > 0.5
        assert (csf > 0.5).mean() < 0.01
    # On the 1 mm canvas, before any acquisition: every lesion voxel is in allowed white matter.
    A = anatomy(SCALE)
    for seed in range(3):
        lesions = draw_lesions(A, np.random.default_rng(seed), "high")
        inside = lesions.prob >= 0.5
        assert inside.any()
        assert A.wm[inside].min() > 0.3 and A.brain[inside].all()


def test_lesion_types_counts_and_volumes_vary():
    A = anatomy(SCALE)
    drawn = [draw_lesions(A, np.random.default_rng(s), "mixed") for s in range(24)]
    counts = [len(d.lesions) for d in drawn]
    volumes = [float((d.prob >= 0.5).sum()) * SCALE**3 / 1000 for d in drawn]
    assert min(counts) <= 3 and max(counts) >= 25
    assert max(volumes) > 5.0 and 0 < min(v for v in volumes if v > 0) < 1.0
    types = {les["type"] for d in drawn for les in d.lesions}
    assert types == {"periventricular", "deep", "juxtacortical", "infratentorial"}
    assert any(les["cluster"] >= 0 for d in drawn for les in d.lesions)
    none = generate_case(3, "3d", lesion_load="none", scale=SCALE)
    assert none.lesion_count == 0 and not arr(none.mask).any() and none.lesion_volume_ml == 0


def check_direction(img: sitk.Image, oblique: bool) -> np.ndarray:
    d = np.array(img.GetDirection()).reshape(3, 3)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-9)
    assert abs(abs(np.linalg.det(d)) - 1) < 1e-9
    off_axis = np.abs(d)[np.abs(d) < 0.5]
    assert (off_axis.max() > 1e-3) == oblique
    return d


@pytest.mark.parametrize("motion", [True, False])
def test_protocol_geometry(motion):
    c3 = generate_case(21, "3d", motion=motion, scale=SCALE)
    sp = np.array(c3.mask.GetSpacing()) / SCALE
    assert np.allclose(sp, 1.0)
    check_direction(c3.mask, motion)
    c2 = generate_case(22, "2d", motion=motion, scale=SCALE)
    sp = np.array(c2.mask.GetSpacing()) / SCALE
    d = check_direction(c2.mask, motion)
    assert 3.0 <= sp[2] <= 5.0 and 0.8 <= sp[0] == sp[1] <= 1.2
    assert abs(d[2, 2]) > 0.9  # slices stacked along the body axis: axial
    assert c2.meta["head_rotation_deg"] != [0.0, 0.0, 0.0] if motion else c2.meta["head_rotation_deg"] == [0, 0, 0]


@pytest.mark.parametrize("storage", ["axial", "sagittal"])
def test_storage_sets_the_slice_order_of_a_3d_grid(storage):
    case = generate_case(21, "3d", motion=False, scale=SCALE, storage=storage)
    d = np.array(case.mask.GetDirection()).reshape(3, 3)
    assert case.meta["storage"] == storage
    # the slice axis (the grid's third) runs along the body axis when axial, left-right when sagittal
    assert abs(d[2 if storage == "axial" else 0, 2]) > 0.9


def test_sagittal_storage_of_thick_axial_slices_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="2d grids are axial"):
        generate_case(22, "2d", scale=SCALE, storage="sagittal")
    assert run_cli(["phantom", str(tmp_path / "x"), "--n", "6", "--scale", str(SCALE), "--quiet", "--protocol",
                    "mixed", "--storage", "sagittal"]) == 1
    assert "sagittal needs --protocol 3d" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_full_resolution_protocols():
    c3 = generate_case(1, "3d", lesion_load="low")
    assert np.allclose(c3.mask.GetSpacing(), 1.0)
    size = np.sort(c3.mask.GetSize())
    assert 160 <= size[0] and size[2] <= 240
    c2 = generate_case(2, "2d", lesion_load="low")
    sp = c2.mask.GetSpacing()
    assert 3.0 <= sp[2] <= 5.0 and 0.8 <= sp[0] <= 1.2
    assert 30 <= c2.mask.GetSize()[2] <= 62


def test_split_format():
    samples = [{"flair": f"case{i:03d}/flair.nii.gz", "mask": f"case{i:03d}/mask.nii.gz"} for i in range(10)]
    split = assign_folds(samples, 5, 0.2, seed=0)
    assert set(split) == {"fold0", "fold1", "fold2", "fold3", "fold4", "test"}
    assert len(split["test"]) == 2
    ids = lambda lst: {s["flair"] for s in lst}  # noqa: E731
    vals = [ids(split[f"fold{k}"]["val"]) for k in range(5)]
    assert set().union(*vals) == ids(samples) - ids(split["test"])
    assert sum(len(v) for v in vals) == 8
    for k in range(5):
        fold = split[f"fold{k}"]
        assert not ids(fold["train"]) & ids(fold["val"])
        assert ids(fold["train"]) | ids(fold["val"]) | ids(split["test"]) == ids(samples)
    with pytest.raises(SamlessError, match="5 folds need"):
        assign_folds(samples[:4], 5, 0.2, seed=0)


def test_cli_writes_dataset_and_refuses_existing_outdir(tmp_path, capsys):
    out = tmp_path / "ph"
    preview = tmp_path / "preview.png"
    argv = ["phantom", str(out), "--n", "4", "--seed", "3", "--scale", str(SCALE), "--folds", "2",
            "--test-fraction", "0.25", "--modalities", "flair,t1", "--quiet", "--preview", str(preview)]
    assert run_cli(argv) == 0
    split = json.loads((out / "split.json").read_text())
    assert set(split) == {"fold0", "fold1", "test"} and len(split["test"]) == 1
    every = split["test"] + split["fold0"]["train"] + split["fold0"]["val"]
    assert len(every) == 4
    for sample in every:
        assert set(sample) == {"flair", "t1", "mask"}
        for rel in sample.values():
            assert not Path(rel).is_absolute() and (out / rel).is_file()
        img, mask = sitk.ReadImage(str(out / sample["flair"])), sitk.ReadImage(str(out / sample["mask"]))
        assert same_grid(img, mask)
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["id"] for r in rows] == ["case000", "case001", "case002", "case003"]
    assert {"id", "seed", "protocol", "spacing", "lesion_count", "lesion_volume_ml"} <= set(rows[0])
    assert int(rows[1]["seed"]) == case_seed(3, 1)
    assert preview.is_file() and 0 < preview.stat().st_size < 300_000
    before = (out / "case002" / "flair.nii.gz").read_bytes()
    capsys.readouterr()

    # --soft-masks adds each case's partial-volume fraction to the same cases, changing nothing else
    soft_out = tmp_path / "ph-soft"
    assert run_cli(["phantom", str(soft_out), *argv[2:-2], "--soft-masks"]) == 0
    soft_split = json.loads((soft_out / "split.json").read_text())
    listed = lambda sp: sp["test"] + sp["fold0"]["train"] + sp["fold0"]["val"]  # noqa: E731
    assert len(listed(soft_split)) == len(listed(split)) == 4
    for sample, plain in zip(listed(soft_split), listed(split)):
        assert sample == {**plain, "soft_mask": sample["flair"].replace("flair", "soft_mask")}
        soft = sitk.ReadImage(str(soft_out / sample["soft_mask"]))
        mask = sitk.ReadImage(str(soft_out / sample["mask"]))
        assert same_grid(soft, mask) and np.array_equal(arr(mask), (arr(soft) >= 0.5).astype(np.uint8))
        for key in ("flair", "t1", "mask"):
            assert (soft_out / sample[key]).read_bytes() == (out / plain[key]).read_bytes()

    assert run_cli(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and len(err.splitlines()) == 1

    assert run_cli(argv + ["--overwrite"]) == 0  # same command, same bytes
    assert (out / "case002" / "flair.nii.gz").read_bytes() == before
    # a case rebuilt from its seed in cases.csv is the file on disk
    row = rows[2]
    case = generate_case(int(row["seed"]), row["protocol"], ("flair", "t1"), scale=SCALE)
    assert np.array_equal(arr(case.images["flair"]), arr(sitk.ReadImage(str(out / "case002" / "flair.nii.gz"))))


@pytest.mark.parametrize("extra", [["--modalities", "flair,pd"], ["--n", "0"], ["--folds", "9"]])
def test_cli_rejects_bad_options(tmp_path, capsys, extra):
    assert run_cli(["phantom", str(tmp_path / "x"), "--n", "3", "--scale", str(SCALE), "--quiet", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_phantom_contrasts_are_told_apart_even_under_a_heavy_lesion_load(case3d, case2d):
    """The FLAIR check of `samless segment` on our own T1/T2/FLAIR phantoms: a heavy load of bright lesions
    does not make a FLAIR look T2-weighted (its ventricles stay dark)."""
    from samless.contrast import assess_contrast

    assert case3d.meta["lesion_load"] == case2d.meta["lesion_load"] == "high"
    for modality, image in case3d.images.items():
        assert assess_contrast(image).looks_like == modality, modality
    assert assess_contrast(case2d.images["flair"]).looks_like == "flair"


def test_skull_stripped_phantoms_keep_the_brain_and_its_lesions_only():
    whole = generate_case(8, "3d", ("flair",), scale=SCALE)
    bare = generate_case(8, "3d", ("flair",), scale=SCALE, skull=False)
    assert bare.meta["skull"] is False and whole.meta["skull"] is True
    assert same_grid(whole.mask, bare.mask)
    w, b = arr(whole.images["flair"]), arr(bare.images["flair"])
    kept = b > 0
    assert 0.1 < kept.mean() < 0.6 * (w > 0).mean()  # the brain only: no scalp, no skull, no neck
    assert np.array_equal(w[kept], b[kept])  # the same scan where it was kept
    assert b[~kept].max() <= 0  # background 0 (or winsorised slightly negative)
    # The lesion mask keeps what lies in the stripped brain.
    assert not (arr(bare.mask) > 0)[~kept].any()
    assert 0 < arr(bare.mask).sum() <= arr(whole.mask).sum()


def test_flair_lesion_contrast_sets_how_bright_lesions_are():
    faint = generate_case(9, "3d", ("flair",), scale=SCALE, flair_lesion_contrast=(1.1, 1.15))
    bright = generate_case(9, "3d", ("flair",), scale=SCALE, flair_lesion_contrast=(1.9, 2.0))
    assert 1.1 <= faint.meta["contrast"]["flair"]["lesion"] <= 1.15
    assert 1.9 <= bright.meta["contrast"]["flair"]["lesion"] <= 2.0
    assert np.array_equal(arr(faint.mask), arr(bright.mask))  # the same lesions, only their intensity differs
    core = ndi.binary_erosion(arr(faint.mask) > 0)
    ratio = arr(bright.images["flair"])[core].mean() / arr(faint.images["flair"])[core].mean()
    assert ratio > 1.4


def test_phantom_cli_takes_skull_and_lesion_contrast(tmp_path):
    out = tmp_path / "ph"
    assert run_cli(["phantom", str(out), "--n", "2", "--scale", "2", "--skull", "off", "--flair-lesion-contrast",
                    "1.1,1.3", "--folds", "2", "--test-fraction", "0", "--quiet"]) == 0
    rows = list(csv.DictReader((out / "cases.csv").open()))
    assert [r["skull"] for r in rows] == ["0", "0"]
    meta = json.loads((out / "case000" / "phantom.json").read_text())
    assert meta["flair_lesion_contrast"] == [1.1, 1.3] and 1.1 <= meta["contrast"]["flair"]["lesion"] <= 1.3
    with pytest.raises(SystemExit):
        run_cli(["phantom", str(tmp_path / "bad"), "--flair-lesion-contrast", "2,1"])


# --- real lesion masks and folded cortex --------------------------------------------------------------

BLOB_RAS = np.array([28.0, -15.0, 32.0])  # centrum semiovale, right: white matter in any MNI brain
BLOB_RADIUS_MM = 6.0


def write_mni_mask(path: Path, centre_ras=BLOB_RAS, radius=BLOB_RADIUS_MM) -> Path:
    """A lesion mask on the FSL MNI152 1 mm grid (182 x 218 x 182), written by nibabel as such masks are."""
    import nibabel as nib

    affine = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    i, j, k = np.meshgrid(*(np.arange(n) for n in (182, 218, 182)), indexing="ij")
    ras = np.stack([90 - i, j - 126.0, k - 72.0], axis=-1)
    mask = (np.linalg.norm(ras - np.asarray(centre_ras), axis=-1) <= radius).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, affine), str(path))
    return path


def lesion_centre_in_mni(case) -> np.ndarray:
    """The output lesion mask's centroid, mapped back to MNI RAS mm through the case's transform."""
    m = arr(case.mask)
    k, j, i = (float(v) for v in ndi.center_of_mass(m))
    lps = case.transform.TransformPoint(case.mask.TransformContinuousIndexToPhysicalPoint((i, j, k)))
    return np.array([-lps[0], -lps[1], lps[2]])


def test_a_real_mask_gives_the_lesions_their_shape_and_place(tmp_path):
    from samless.training.phantom_real_lesions import real_mask_paths

    folder = tmp_path / "masks"
    folder.mkdir()
    write_mni_mask(folder / "p1_mask.nii.gz")
    paths = real_mask_paths(folder)
    places = set()
    for seed in (1, 2, 3, 4):
        case = generate_case(seed, "3d", ("flair",), lesion_load="medium", scale=SCALE, real_masks=paths,
                             real_fraction=1.0)
        assert case.meta["lesion_source"] == "p1_mask.nii.gz" and case.lesion_count == 1
        centre = lesion_centre_in_mni(case)
        mirrored = centre * np.array([-1, 1, 1])
        off = min(np.linalg.norm(centre - BLOB_RAS), np.linalg.norm(mirrored - BLOB_RAS))
        assert off < 5.0, centre  # where the mask put it (or its mirror image), through motion and atrophy
        places.add(int(np.sign(centre[0])))
        blob_ml = 4 / 3 * np.pi * BLOB_RADIUS_MM ** 3 / 1000
        assert 0.5 * blob_ml < case.lesion_volume_ml < 1.6 * blob_ml
        flair = arr(case.images["flair"])
        core = ndi.binary_erosion(arr(case.mask) > 0)
        assert flair[core].mean() > 1.2 * np.median(flair[flair > 0])  # a bright lesion, as FLAIR shows it
    assert places == {-1, 1}  # mirrored in some cases, not in others
    # Without the real masks (or with fraction 0) the same seed draws its lesions as before.
    drawn = generate_case(1, "3d", ("flair",), lesion_load="medium", scale=SCALE, real_masks=paths, real_fraction=0.0)
    plain = generate_case(1, "3d", ("flair",), lesion_load="medium", scale=SCALE)
    assert drawn.meta["lesion_source"] == "drawn" and np.array_equal(arr(drawn.mask), arr(plain.mask))


def test_real_mask_folders_that_cannot_serve_are_refused(tmp_path):
    from samless.training.phantom_real_lesions import real_mask_paths

    with pytest.raises(ValueError, match="not a folder"):
        real_mask_paths(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .nii.gz or .nii lesion masks"):
        real_mask_paths(tmp_path / "empty")
    (tmp_path / "outside").mkdir()
    far = write_mni_mask(tmp_path / "outside" / "m.nii.gz", centre_ras=(80.0, 80.0, -60.0), radius=4.0)
    with pytest.raises(ValueError, match="outside the MNI152 brain"):
        generate_case(1, "3d", ("flair",), lesion_load="medium", scale=SCALE, real_masks=(str(far),), real_fraction=1.0)


def test_folded_cortex_adds_sulci_and_leaves_the_lesions_alone():
    smooth = generate_case(12, "3d", ("flair",), lesion_load="low", scale=SCALE)
    folded = generate_case(12, "3d", ("flair",), lesion_load="low", scale=SCALE, sulci=True)
    assert folded.meta["sulci"] and not smooth.meta["sulci"]
    assert np.array_equal(arr(smooth.mask), arr(folded.mask))
    cortex = (arr(template_map(smooth, "gm")) > 0.6) & (arr(template_map(smooth, "d_cortex")) < 1)
    deep_wm = arr(template_map(smooth, "wm")) > 0.95
    # relative to white matter (the int16 scaling of the two scans may differ slightly)
    a, b = (arr(c.images["flair"]).astype(float) / np.median(arr(c.images["flair"])[deep_wm]) for c in (smooth, folded))
    assert b[cortex].mean() < a[cortex].mean() - 0.03  # grey matter turned into dark CSF along the sulci
    assert b[cortex].std() > 1.3 * a[cortex].std()  # and the cortex is no longer a smooth band
    assert np.abs(a[deep_wm] - b[deep_wm]).mean() < 0.01  # white matter as it was


def test_lesion_rims_fade_the_edge_and_keep_the_core_and_mask():
    plain = generate_case(12, "3d", ("flair",), lesion_load="high", scale=SCALE)  # its rim keeps ~52%
    rimmed = generate_case(12, "3d", ("flair",), lesion_load="high", scale=SCALE, lesion_rims=True)
    rims = rimmed.meta["lesion_rims"]
    assert plain.meta["lesion_rims"] is None and 0.4 <= rims["edge"] <= 1.0 and 0.8 <= rims["width_mm"] <= 3.5
    mask = arr(plain.mask) > 0
    assert np.array_equal(mask, arr(rimmed.mask) > 0)  # the raters' mask still holds the faint rim
    deep_wm = (arr(template_map(plain, "wm")) > 0.95) & ~ndi.binary_dilation(mask, iterations=2)
    a, b = (arr(c.images["flair"]).astype(float) / np.median(arr(c.images["flair"])[deep_wm]) for c in (plain, rimmed))
    edge = mask & ~ndi.binary_erosion(mask)
    contrast_kept = (b[edge] - 1.0).mean() / (a[edge] - 1.0).mean()
    assert contrast_kept < 0.9  # the edge lost contrast (~0.79 here: 1 mm deep of a 1.9 mm fade to 52%)
    assert np.abs(a[~mask] - b[~mask]).mean() < 0.01  # and nothing else changed much


def test_lesion_rim_fraction_gives_rims_to_that_share_of_the_cases(tmp_path, capsys):
    def rimmed(fraction: str) -> list[bool]:
        out = tmp_path / f"rims{fraction}"
        assert run_cli(["phantom", str(out), "--n", "6", "--scale", "2", "--lesion-load", "high", "--lesion-rims",
                        "--lesion-rim-fraction", fraction, "--folds", "2", "--test-fraction", "0", "--quiet"]) == 0
        return [json.loads((out / f"case{i:03d}" / "phantom.json").read_text())["lesion_rims"] is not None
                for i in range(6)]

    mixed = rimmed("0.5")
    assert rimmed("1") == [True] * 6 and rimmed("0") == [False] * 6
    assert 0 < sum(mixed) < 6  # this seed draws both kinds
    assert run_cli(["phantom", str(tmp_path / "bad"), "--lesion-rims", "--lesion-rim-fraction", "1.5", "--quiet"]) == 1
    assert not (tmp_path / "bad").exists()
    assert "--lesion-rim-fraction must be in [0, 1]" in capsys.readouterr().err
