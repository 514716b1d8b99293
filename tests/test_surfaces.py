"""Cortical flatmaps: the S1-shaped offline subject, its encoding maps where the paper found them, pycortex errors."""

import sys

import numpy as np
import pytest

from brainldm.analysis.surfaces import CorticalSpace, check_space, import_nsd_subject, require_pycortex
from brainldm.data import nsd
from brainldm.validation import InputError

pytest.importorskip("cortex", reason='flatmaps need pip install "brainldm[cortex]"')


@pytest.fixture(scope="module")
def s1_world(offline_demo, tmp_path_factory):
    """The offline demo's subject 1 (laid out on S1, at the offline noise level, toy's z and c extracted), with its
    whole-brain trials prepared beside."""
    from pathlib import Path
    from types import SimpleNamespace

    from brainldm.data.trials import prepare_subject
    from brainldm.offline.synthetic import COCO_PATH, default_coco_root

    world = Path(offline_demo.data).parent  # nsd/, trials/, features/ and weights/
    nsd_root, trials = world / "nsd", tmp_path_factory.mktemp("s1") / "trials"
    coco = default_coco_root(nsd_root) / COCO_PATH
    prepare_subject(nsd_root, 1, trials, whole_brain=True, progress=False, coco_annotations=coco)
    return SimpleNamespace(nsd=nsd_root, trials=trials, features=world / "features")


def test_s1_layout_has_cortex_and_nsd_streams(s1_world):
    streams = np.asarray(nsd.read_roi(s1_world.nsd, 1, "streams").dataobj)
    general = np.asarray(nsd.read_roi(s1_world.nsd, 1, "nsdgeneral").dataobj)
    assert streams.shape == (100, 100, 31)  # S1's fullhead grid, in NIfTI (X, Y, Z) order
    counts = {name: int((streams == label).sum()) for label, name in nsd.STREAMS.items()}
    assert counts["unknown"] > 20_000  # the rest of cortex
    assert counts["early"] > 1_000 and counts["ventral"] > 200 and counts["parietal"] > 200
    # nsdgeneral is visual cortex: it covers the streams and little else
    assert (general[streams > 0] == 1).mean() > 0.9
    assert (general == 1).sum() < 2 * (streams > 0).sum()
    assert ((streams >= 0) == (general >= 0)).all()


def test_encoding_flatmaps_put_z_in_early_and_c_in_ventral_cortex(s1_world, tmp_path):
    import importlib.util

    import nibabel as nib
    from PIL import Image

    out = tmp_path / "encoding"
    spec = importlib.util.spec_from_file_location("encoding_script", "scripts/encoding.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # run in this process: a subprocess would import torch and the rest again (8 s)
    script.main(["--data", str(s1_world.trials), "--features", str(s1_world.features), "--subject", "1", "--names",
                 "z,c", "--components", "32", "--out", str(out), "--device", "cpu", "--flatmaps", "--cortical-space",
                 "S1/fullhead"])  # fmt: skip

    streams = np.asarray(nsd.read_roi(s1_world.nsd, 1, "streams").dataobj)
    early, ventral = streams == nsd.STREAM_IDS["early"], streams == nsd.STREAM_IDS["ventral"]
    r = {name: np.asarray(nib.load(out / f"r_{name}.nii.gz").dataobj) for name in ("z", "c")}
    # r maps hold r where FDR-significant and 0 elsewhere: compare ROI means of the saved volumes
    assert r["z"][early].mean() > 0.1 and r["c"][ventral].mean() > 0.1
    assert r["z"][early].mean() > 2 * r["z"][ventral].mean()
    assert r["c"][ventral].mean() > 2 * r["c"][early].mean()
    assert r["z"][early].mean() > r["c"][early].mean() and r["c"][ventral].mean() > r["z"][ventral].mean()
    assert (r["z"][streams < 0] == 0).all()  # nothing outside cortex

    assert not list(out.glob("map_*.png"))  # flatmaps instead of volume slices
    for name in ("flatmap_compare", "flatmap_compare_winner"):
        with Image.open(out / f"{name}.png") as image:
            assert image.width > 600 and image.height > 300
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.std() > 20  # a drawn flatmap, not a blank canvas


def test_roi_outlines_are_rendered_once_and_drawn_on_every_panel(tmp_path, monkeypatch):
    import shutil

    import cortex
    from PIL import Image

    from brainldm.analysis import viz

    if shutil.which("inkscape") is None:
        pytest.skip("pycortex draws ROI outlines with Inkscape (apt-get install inkscape)")
    rendered = []
    add_rois = cortex.quickflat.composite.add_rois
    monkeypatch.setattr(cortex.quickflat.composite, "add_rois", lambda *a, **k: rendered.append(1) or add_rois(*a, **k))
    monkeypatch.setattr(viz, "_ROI_TEXTURES", {})
    space = CorticalSpace("S1", "fullhead")
    values = np.full((100, 100, 31), np.nan, dtype=np.float32)
    viz.flatmaps([("same", values), ("same", values)], space, tmp_path / "two.png")
    viz.flatmaps([("one", values)], space, tmp_path / "one.png")
    assert len(rendered) == 1
    pixels = np.asarray(Image.open(tmp_path / "two.png").convert("RGB")).astype(int)
    left, right = pixels[70:380, :640], pixels[70:380, 640:1280]  # the flatmaps, under their titles
    assert np.array_equal(left, right)  # the second panel has the outlines too
    monkeypatch.setattr(viz.shutil, "which", lambda name: None)  # without Inkscape: no outlines
    viz.flatmaps([("same", values)], space, tmp_path / "bare.png")
    bare = np.asarray(Image.open(tmp_path / "bare.png").convert("RGB")).astype(int)[70:380, :640]
    assert np.abs(bare - left).sum(axis=-1).astype(bool).mean() > 0.01  # the outlines are visible


def test_missing_subject_or_transform_says_how_to_import_it():
    with pytest.raises(InputError, match=r"no subject 'subj05'.*import_nsd_subject.py --nsd-root NSD_ROOT --subject 5"):
        check_space(CorticalSpace.for_nsd(5))
    with pytest.raises(InputError, match="no transform 'func1pt8'.*fullhead"):
        check_space(CorticalSpace("S1", "func1pt8"))
    with pytest.raises(InputError, match="SUBJECT/TRANSFORM"):
        CorticalSpace.parse("S1")
    assert CorticalSpace.parse("S1/fullhead") == CorticalSpace("S1", "fullhead")


def test_a_cortical_space_of_another_grid_is_refused_before_the_work(decoding_world, tmp_path):
    from brainldm.analysis.encoding_job import run_encoding

    check_space(CorticalSpace("S1", "fullhead"), (100, 100, 31))  # S1's own functional grid fits
    with pytest.raises(InputError, match=r"S1/fullhead maps a \(100, 100, 31\) grid, but the data's voxels lie in"):
        run_encoding(decoding_world.data, decoding_world.features, 1, ["z"], tmp_path / "out", whole_brain=False,
                     space=CorticalSpace("S1", "fullhead"), progress=False)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_import_nsd_subject_names_the_missing_freesurfer_file(tmp_path):
    with pytest.raises(
        InputError, match=r"missing subj02 FreeSurfer file: .*nsddata/freesurfer/subj02/surf/lh.full.flat"
    ):
        import_nsd_subject(tmp_path, 2)


def test_without_pycortex_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cortex", None)  # makes `import cortex` fail
    with pytest.raises(InputError, match=r'pip install "brainldm\[cortex\]"'):
        require_pycortex()
