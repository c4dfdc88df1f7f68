"""Tests of the simulator's breadth: the random instrument and its held-out corner, cell kinds,
sample settings, exact labels of the new objects, polarity, and the drawn voxel size on disk."""

from __future__ import annotations

import dataclasses
import json
import math

import fire
import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from cryosxt_sim.instruments import (
    INSTRUMENTS,
    MAX_SIRT_WORK,
    draw_instrument,
    draw_rng,
    in_held_out,
    resolve,
)
from cryosxt_sim.kinds import BACKGROUNDS, KINDS, Sample
from cryosxt_sim.phantom import build_phantom
from cryosxt_sim.simulate import main, simulate_tomogram
from cryosxt_sim.tomography import tilt_angles

SHAPE = (16, 96, 96)


def _phantom(cell: str, voxel: float, seed: int, shape=(24, 128, 128), **sample):
    """A phantom only (no tomography); small padding: the labels live in the field of view."""
    rng = np.random.default_rng(seed)
    return build_phantom(shape, voxel, (2, 2), rng, sample=Sample(cell=cell, **sample))


def _ellipsoid_points(obj: dict, n: int = 400) -> np.ndarray:
    """Points (nm, z-y-x) on the analytic surface of an ellipsoid object (rows of `axes` = unit axes)."""
    u = np.random.default_rng(0).normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return np.asarray(obj["center_nm"]) + (u * np.asarray(obj["radii_nm"])) @ np.asarray(obj["axes"])


def _lookup(mask: np.ndarray, pts_nm: np.ndarray, voxel: float) -> np.ndarray:
    idx = np.round(pts_nm / voxel).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(mask.shape)), axis=1)
    return mask[tuple(idx[ok].T)]


def _fov_mu(ph, shape) -> np.ndarray:
    oz, _, ox = ph.offset
    return ph.mu[oz : oz + shape[0], :, ox : ox + shape[2]]


# ---------------------------------------------------------------- the random instrument


def test_random_draw_is_reproducible_per_seed_and_cheap():
    a = [resolve("random", (7, 0, i)) for i in range(5)]
    b = [resolve("random", (7, 0, i)) for i in range(5)]
    assert a == b
    assert len({inst for inst, _ in a}) == 5  # each tomogram its own instrument
    # the draw's stream is not the simulation's: same seed, other numbers than default_rng(seed)
    assert draw_rng((7, 0, 0)).random() != np.random.default_rng((7, 0, 0)).random()


def test_random_covers_its_ranges_and_never_the_held_out_corner():
    draws = [resolve("random", (s, 0, 0)) for s in range(3000)]
    inst = [i for i, _ in draws]
    voxel = np.array([i.voxel_size_nm for i in inst])
    psf = np.array([i.psf_fwhm_nm for i in inst])
    tilt = np.array([i.tilt_max_deg for i in inst])
    pol = np.array([i.polarity for i in inst])
    assert set(pol) == {-1, 1} and 0.45 < (pol > 0).mean() < 0.55
    assert voxel.min() >= 10.0 and voxel.max() <= 40.0 and voxel.min() < 10.5 and voxel.max() > 38.0
    # log-uniform: as many below the geometric middle (20 nm) as above
    assert 0.45 < (voxel < 20.0).mean() < 0.55
    assert psf.min() >= 25.0 and psf.max() <= 80.0
    assert np.all(psf >= voxel - 0.05) and np.all(psf <= 3 * voxel + 0.05)  # resolution 1-3 voxels
    assert tilt.min() >= 55.0 and tilt.max() <= 70.0
    assert {i.tilt_step_deg for i in inst} == {1.0, 1.5, 2.0, 2.5, 3.0}
    work = [len(tilt_angles(i.tilt_max_deg, i.tilt_step_deg)) * i.iterations for i in inst]
    assert max(work) <= MAX_SIRT_WORK
    doses = np.array([i.dose for i in inst])
    assert doses.min() < 200 and doses.max() > 2500  # a wide range of noise
    assert not any(in_held_out(i) for i in inst)
    # the corner's neighbours on every side are drawn: it is the combination that is held out
    assert any(i.polarity < 0 and i.voxel_size_nm >= 28 and i.psf_fwhm_nm >= 70 for i in inst)
    assert any(i.polarity < 0 and i.voxel_size_nm >= 28 and i.tilt_max_deg <= 58 for i in inst)
    samples = [s for _, s in draws]
    assert {s.cell for s in samples} == set(KINDS)
    assert {s.background for s in samples} == set(BACKGROUNDS)
    dens = np.array([s.density for s in samples])
    assert dens.min() < 0.55 and dens.max() > 1.8


def test_the_rejection_is_what_keeps_draws_out_of_the_corner():
    """Control: without the rejection the same ranges do reach the corner (so the test above can fail)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        v = math.exp(rng.uniform(math.log(10), math.log(40)))
        p = math.exp(rng.uniform(math.log(max(25, v)), math.log(min(80, 3 * v))))
        hits += (rng.random() < 0.5) and v >= 28 and p >= 70 and rng.uniform(55, 70) <= 58
    assert hits > 0
    assert all(not in_held_out(draw_instrument(rng)) for _ in range(2000))


def test_heldout_preset_is_in_the_corner_and_the_others_are_not():
    assert in_held_out(INSTRUMENTS["heldout"])
    assert not any(in_held_out(i) for name, i in INSTRUMENTS.items() if name != "heldout")
    t = simulate_tomogram((12, 48, 48), "heldout", seed=1)
    assert t.info["held_out"] is True and t.voxel_size_nm == 32.0


def test_resolve_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown cell kind 'plant'"):
        resolve("bessy", 0, "plant")
    with pytest.raises(ValueError, match="random"):
        resolve("bessi", 0)


def test_cell_option_with_a_preset():
    assert resolve("b24", (1, 0, 0), "yeast") == (INSTRUMENTS["b24"], Sample(cell="yeast"))
    assert resolve("b24", (1, 0, 0)) == (INSTRUMENTS["b24"], Sample())  # the presets' default
    kinds = {resolve("b24", (1, 0, i), "random")[1].cell for i in range(30)}
    assert kinds == set(KINDS)
    # under "random" the cell is drawn unless given
    assert {resolve("random", (2, 0, i), "crowded")[1].cell for i in range(10)} == {"crowded"}


# ---------------------------------------------------------------- random tomograms


def test_random_tomogram_is_reproducible_and_records_its_draw():
    a = simulate_tomogram(SHAPE, "random", seed=(3, 0, 1))
    b = simulate_tomogram(SHAPE, "random", seed=(3, 0, 1))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.membrane, b.membrane)
    assert a.objects == b.objects
    inst, sample = resolve("random", (3, 0, 1))
    assert a.info["instrument"] == dataclasses.asdict(inst)
    assert a.info["sample"] == dataclasses.asdict(sample) and a.info["cell_kind"] == sample.cell
    assert a.voxel_size_nm == inst.voxel_size_nm and a.info["voxel_size_nm"] == inst.voxel_size_nm
    json.dumps(a.info)
    c = simulate_tomogram(SHAPE, "random", seed=(3, 0, 2))
    assert c.info["instrument"] != a.info["instrument"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tomograms_have_sane_labels(seed):
    t = simulate_tomogram(SHAPE, "random", seed=(11, 0, seed))
    assert np.isfinite(t.image).all() and t.image.shape == SHAPE
    assert 0.002 < t.membrane.mean() < 0.4, t.membrane.mean()
    ids = set(np.unique(t.instances)) - {0}
    assert ids == {o["id"] for o in t.objects}


def test_cli_random_writes_the_drawn_voxel_size(tmp_path):
    argv = [
        "--out",
        str(tmp_path),
        "--count",
        "2",
        "--unlabeled",
        "1",
        "--shape",
        "12,40,40",
        "--seed",
        "4",
        "--instrument",
        "random",
        "--cell",
        "crowded",
    ]
    names = fire.Fire(main, command=argv)
    assert names == ["sim_random_s4_000", "sim_random_s4_001", "sim_random_s4_u000"]
    seen = set()
    for i, name in enumerate(names):
        unl = name.endswith("u000")
        meta = json.loads((tmp_path / ("unlabeled" if unl else "instances") / f"{name}.json").read_text())
        inst, sample = resolve("random", (4, int(unl), 0 if unl else i), "crowded")
        assert meta["voxel_size_nm"] == inst.voxel_size_nm
        assert meta["instrument"]["polarity"] == inst.polarity and meta["sample"]["cell"] == "crowded"
        image = tmp_path / ("unlabeled" if unl else "images") / f"{name}.mrc"
        with mrcfile.open(image, permissive=True) as m:
            assert float(m.voxel_size.x) == pytest.approx(10 * inst.voxel_size_nm, abs=0.01)  # Angstrom
            assert float(m.voxel_size.z) == pytest.approx(10 * inst.voxel_size_nm, abs=0.01)
        seen.add(inst.voxel_size_nm)
    assert len(seen) == 3


# ---------------------------------------------------------------- cell kinds and exact labels


@pytest.fixture(scope="module")
def yeast():
    """Yeast phantoms at 20 nm (physical cell size: 2.6 um field of view) with a vacuole and a wall."""
    out = []
    for seed in range(12):
        ph = _phantom("yeast", 20.0, seed)
        kinds = {o["kind"] for o in ph.objects}
        if {"vacuole", "cell_wall"} <= kinds:
            out.append(ph)
        if len(out) == 2:
            return out
    raise AssertionError("no yeast phantom with a vacuole and a wall in 12 seeds")


def test_yeast_vacuole_membranes_are_in_the_mask(yeast):
    n = 0
    for ph in yeast:
        for o in ph.objects:
            if o["kind"] == "vacuole":
                hits = _lookup(ph.membrane, _ellipsoid_points(o), 20.0)
                assert hits.size and hits.mean() > 0.95, o
                inner = ndimage.binary_erosion(ph.instances == o["id"], iterations=3)
                assert ph.membrane[inner].sum() == 0  # lumen and polyphosphate bodies: no label
                n += 1
    assert n


def test_yeast_cell_wall_is_not_in_the_mask_but_the_plasma_membrane_inside_it_is(yeast):
    for ph in yeast:
        for wall in (o for o in ph.objects if o["kind"] == "cell_wall"):
            in_wall = ph.instances == wall["id"]
            cell = ph.instances == wall["parent"]
            # wall voxels more than 2 voxels outside the cell: no label at all
            far = in_wall & (ndimage.distance_transform_edt(~cell) > 2.0)
            if far.sum() < 50:
                continue
            assert ph.membrane[far].sum() == 0
            # the cell's voxels next to its wall: the plasma membrane, labelled
            rim = cell & ndimage.binary_dilation(in_wall)
            assert ph.membrane[rim].mean() > 0.9
            # denser than the cytoplasm in the absorption map
            mu = _fov_mu(ph, ph.membrane.shape)
            cyto = ndimage.binary_erosion(cell, iterations=3) & (ph.membrane == 0)
            assert mu[far].mean() > mu[cyto].mean() + 0.03
            return
    raise AssertionError("no wall thick enough to test")


@pytest.mark.parametrize("cell", sorted(KINDS))
def test_droplets_are_the_densest_and_have_no_label_inside(cell):
    found = 0
    for seed in range(10):
        ph = _phantom(cell, 12.0, seed, density=2.0, varied=True, ice_ratio=1.2, membrane_lac=0.85)
        mu = _fov_mu(ph, ph.membrane.shape)
        means = {}
        for o in ph.objects:
            core = ndimage.binary_erosion(ph.instances == o["id"], iterations=2)
            if core.sum() < 10 or o["kind"] in ("fiducial", "support_film"):
                continue
            means.setdefault(o["kind"], []).append(float(mu[core].mean()))
            if o["kind"] == "droplet":
                assert ph.membrane[core].sum() == 0
                found += 1
        if "droplet" in means:
            others = [m for k, v in means.items() if k != "droplet" for m in v]
            assert min(means["droplet"]) > max(others), means
    assert found


def test_crowded_sections_are_packed_with_small_vesicles_and_er():
    def per_um2(cell):
        ves, er, radii = 0, 0, []
        for seed in range(4):
            ph = _phantom(cell, 12.0, seed)
            ves += sum(o["kind"] == "vesicle" for o in ph.objects)
            er += sum(o["kind"] == "er" for o in ph.objects)
            radii += [o["radius_nm"] for o in ph.objects if o["kind"] == "vesicle"]
        area = 4 * (128 * 12e-3) ** 2
        return ves / area, er / area, np.median(radii)

    ves_c, er_c, r_c = per_um2("crowded")
    ves_m, er_m, _ = per_um2("mammalian")
    assert ves_c > 3 * ves_m and er_c > 2 * er_m, (ves_c, ves_m, er_c, er_m)
    assert r_c < 60.0


def test_crowded_labels_are_sane():
    ph = _phantom("crowded", 12.0, 0)
    assert 0.03 < ph.membrane.mean() < 0.35
    kinds = {o["kind"] for o in ph.objects}
    assert {"vesicle", "er", "cell"} <= kinds and "filopodium" not in kinds


def test_mitochondria_sometimes_have_cristae_and_cristae_are_labelled():
    with_c = without = 0
    for seed in range(10):
        ph = _phantom("mammalian", 15.0, seed, shape=(40, 128, 128), varied=True, density=2.0)
        for o in ph.objects:
            if o["kind"] != "mitochondrion":
                continue
            inner = ndimage.binary_erosion(ph.instances == o["id"], iterations=3)  # past the outer band
            if inner.sum() < 50:
                continue
            labelled = ph.membrane[inner].sum()
            if o["cristae"]:
                with_c += 1
                assert labelled > 0
            else:
                without += 1
                assert labelled == 0
        if with_c and without:
            return
    raise AssertionError((with_c, without))


def test_density_scale_changes_organelle_counts():
    def count(density):
        return sum(
            o["kind"] in ("mitochondrion", "vesicle", "droplet", "er")
            for s in range(4)
            for o in _phantom("mammalian", 20.0, s, density=density).objects
        )

    assert count(2.0) > 2 * count(0.5)


def test_backgrounds_carbon_film_and_gold_beads():
    """The film lies under the ice (no label, denser than the cytoplasm); gold gives beads."""
    for seed in range(20):
        ph = _phantom("mammalian", 12.0, seed, background="carbon", ice_ratio=0.75)
        film = [o for o in ph.objects if o["kind"] == "support_film"]
        if not film:
            continue
        assert ph.info["support"]["z_nm"][1] == pytest.approx(ph.info["ice_nm"][0], abs=0.1)
        where = ph.instances == film[0]["id"]
        assert ph.membrane[where].sum() == 0
        mu = _fov_mu(ph, ph.membrane.shape)
        assert mu[where].mean() > 0.6  # carbon (1.5/um, partial volume) >> cytoplasm (0.3)
        break
    else:
        raise AssertionError("no film inside the volume in 20 seeds")
    beads = [
        sum(o["kind"] == "fiducial" for o in _phantom("mammalian", 20.0, s, background="gold").objects)
        for s in range(6)
    ]
    assert sum(beads) > 0


# ---------------------------------------------------------------- polarity in the image


def test_polarity_inverts_droplets_against_cytoplasm():
    """Under `random`, polarity -1 makes droplets darker than the cytoplasm, +1 brighter."""
    sample = Sample(cell="yeast", density=2.0, varied=True, ice_ratio=1.1)
    signs = {}
    for s in range(40):
        inst, _ = resolve("random", (5, 0, s))
        if inst.polarity in signs or inst.voxel_size_nm > 25:
            continue
        t = simulate_tomogram(SHAPE, "random", seed=(5, 0, s), cell=sample)
        drop = [o["id"] for o in t.objects if o["kind"] == "droplet"]
        core = ndimage.binary_erosion(np.isin(t.instances, drop), iterations=1)
        cells = [o["id"] for o in t.objects if o["kind"] == "cell"]
        cyto = ndimage.binary_erosion(np.isin(t.instances, cells) & (t.membrane == 0), iterations=2)
        if core.sum() < 5 or cyto.sum() < 200:
            continue
        signs[inst.polarity] = float(np.sign(t.image[core].mean() - t.image[cyto].mean()))
        if len(signs) == 2:
            break
    assert signs == {1: 1.0, -1: -1.0}


@pytest.mark.parametrize("cell", ["mammalian", "crowded"])
def test_paired_phantom_is_the_same_cell_at_both_voxel_sizes(cell):
    from cryosxt_sim.paired import simulate_pair

    inst = dataclasses.replace(INSTRUMENTS["bessy"], tilt_step_deg=5.0, iterations=5)
    fine, coarse = simulate_pair((16, 64, 64), inst, seed=(7, 0, 0), cell=cell)
    assert fine.image.shape == (16, 64, 64) and coarse.image.shape == (8, 32, 32)
    assert coarse.voxel_size_nm == 2 * fine.voxel_size_nm
    assert coarse.info["instrument"]["dose"] == 4 * fine.info["instrument"]["dose"]  # binned detector
    assert [o["kind"] for o in fine.objects] == [o["kind"] for o in coarse.objects]
    assert len(fine.objects) >= 2
    for a, b in zip(fine.objects, coarse.objects, strict=True):
        for key in ("center_nm", "start_nm"):
            if key in a:  # half a fine voxel apart at most (the grids' offset), far under a coarse voxel
                assert np.max(np.abs(np.subtract(a[key], b[key]))) <= fine.voxel_size_nm / 2 + 0.01
    # the masks agree once the fine one is binned to the coarse grid
    binned = fine.membrane.reshape(8, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5)) > 0.25
    both = np.logical_and(binned, coarse.membrane > 0).sum()
    assert 2 * both / (binned.sum() + (coarse.membrane > 0).sum()) > 0.6


def test_ordinary_simulations_at_two_voxel_sizes_draw_different_cells():
    """Why the paired mode exists (the test above would pass trivially if this did too)."""
    inst = dataclasses.replace(INSTRUMENTS["bessy"], tilt_step_deg=5.0, iterations=5)
    fine = simulate_tomogram((16, 64, 64), inst, seed=(7, 0, 0))
    coarse = simulate_tomogram((8, 32, 32), dataclasses.replace(inst, voxel_size_nm=19.6), seed=(7, 0, 0))
    kinds = [o["kind"] for o in fine.objects], [o["kind"] for o in coarse.objects]
    centres = [o.get("center_nm") for o in fine.objects], [o.get("center_nm") for o in coarse.objects]
    assert kinds[0] != kinds[1] or centres[0] != centres[1]
