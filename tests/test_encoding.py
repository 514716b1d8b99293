"""Encoding models: planted z -> early and c -> ventral are found, p-values and FDR are right, figures written."""

import json
import shutil

import numpy as np
import pytest
import scipy.stats

from brainldm.analysis.encoding import fit_encoding, one_sided_p, pca_scores, significance
from brainldm.analysis.encoding_job import run_encoding
from brainldm.data.features import parse_features
from brainldm.data.trials import SubjectStimuli, load_trials, load_voxels, prepare_subject
from brainldm.ldm.extraction import extract_features
from brainldm.validation import InputError


@pytest.fixture(scope="module")
def encoded(decoding_world, tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("encoding")
    prepare_subject(
        decoding_world.tree.root,
        1,
        root / "trials",
        whole_brain=True,
        progress=False,
        coco_annotations=decoding_world.tree.coco_archive,
    )
    stimuli = SubjectStimuli(decoding_world.data, 1)  # the same images as the whole-brain dataset's
    specs = parse_features("z,c,zc@0.3,zc@0.9,unet.mid@0.5#1,unet.mid@0.5#3,unet.up0@0.5#3")
    for name in ("z", "c"):  # the world's own stores hold these images already: extraction only adds the rest
        shutil.copytree(decoding_world.features / name, root / "features" / name)
    extract_features(
        tiny,
        "tiny",
        stimuli.nsd_ids,
        stimuli.__getitem__,
        specs,
        root / "features",
        num_inference_steps=6,
        guidance_scale=1.0,  # no classifier-free guidance: half the U-Net's work, and nothing here depends on it
        progress=False,
    )
    results = run_encoding(
        root / "trials", root / "features", 1, [s.name for s in specs], root / "out", device="cpu", progress=False
    )
    return root, results, load_voxels(root / "trials", 1, whole_brain=True)


def test_whole_brain_mode_stores_every_in_brain_voxel(decoding_world, encoded):
    import nibabel as nib

    from brainldm.data import nsd

    root, _, voxels = encoded
    streams = np.asarray(nib.load(nsd.roi_path(decoding_world.tree.root, 1, "streams")).dataobj)
    np.testing.assert_array_equal(voxels.ijk, np.argwhere(streams >= 0))
    assert len(voxels) > len(load_voxels(decoding_world.data, 1))
    whole = np.asarray(load_trials(root / "trials", 1, "test", whole_brain=True).with_format("numpy")["betas"])
    roi = np.asarray(load_trials(decoding_world.data, 1, "test").with_format("numpy")["betas"])
    stored = load_voxels(decoding_world.data, 1)
    rows = [int(np.flatnonzero((voxels.ijk == v).all(1))[0]) for v in stored.ijk[:20]]
    np.testing.assert_allclose(whole[:, rows], roi[:, :20], atol=1e-6)  # same betas for the shared voxels


def test_early_voxels_prefer_z_and_ventral_voxels_prefer_c(encoded):
    _, results, voxels = encoded
    early, ventral = voxels.roi("early"), voxels.roi("ventral")
    z, c = results["z"].r, results["c"].r
    assert np.mean(z[early] > c[early]) > 0.9
    assert np.mean(c[ventral] > z[ventral]) > 0.9
    assert results["z"].rois["early"]["mean_r"] > 0.5 and results["c"].rois["ventral"]["mean_r"] > 0.5


def test_empirical_fdr_over_null_voxels_is_at_most_q(encoded):
    _, results, voxels = encoded
    null = voxels.streams == 0  # no planted response at all (every labelled stream responds to z, c or both)
    # FDR is an expectation: pool the discoveries of the four feature spaces (four experiments on this brain)
    pooled = [results[name] for name in ("z", "c", "zc@0.3", "zc@0.9")]
    discoveries = sum(int(r.significant.sum()) for r in pooled)
    false = sum(int((r.significant & null).sum()) for r in pooled)
    assert discoveries > 100
    assert false / discoveries <= 0.05


def test_p_values_equal_scipy_one_sided_pearsonr():
    rng = np.random.default_rng(0)
    n = 37
    for _ in range(20):
        x = rng.standard_normal(n)
        y = rng.standard_normal(n) + rng.uniform(-1, 1) * x
        expected = scipy.stats.pearsonr(x, y, alternative="greater").pvalue
        r = np.corrcoef(x, y)[0, 1]
        assert abs(one_sided_p(r, n) - expected) < 1e-6


def test_fdr_is_benjamini_hochberg_worked_by_hand(monkeypatch):
    # m = 5 p-values; BH: p_adj(i) = min over j >= i of p(j) * m / j, with p sorted ascending (worked out by hand)
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    monkeypatch.setattr("brainldm.analysis.encoding.one_sided_p", lambda r, n: p)
    _, adjusted, significant = significance(np.zeros(5), 20, q=0.05)
    # sorted: 0.005*5/1=0.025, 0.01*5/2=0.025, 0.03*5/3=0.05, 0.04*5/4=0.05, 0.5*5/5=0.5
    np.testing.assert_allclose(adjusted, [0.025, 0.05, 0.05, 0.025, 0.5])
    # the boundary: an adjusted p equal to q is significant (BH's "<=", as statsmodels and the original paper)
    np.testing.assert_array_equal(significant, [True, True, True, True, False])


def test_several_subjects_get_their_own_results_and_a_group_summary(decoding_world, tmp_path, capsys):
    import importlib.util
    import json

    from PIL import Image

    spec = importlib.util.spec_from_file_location("encoding_script", "scripts/encoding.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--data", str(decoding_world.data), "--features", str(decoding_world.features), "--subjects", "1,2"]
    script.main([*args, "--roi-voxels", "--names", "z,c", "--components", "16", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "subject 2, c:" in printed and "group summary" in printed
    for subject in ("subj01", "subj02"):
        assert (tmp_path / subject / "summary.json").is_file() and (tmp_path / subject / "compare_rois.png").is_file()
    summary = json.loads((tmp_path / "group_summary.json").read_text())
    for subject in ("subj01", "subj02"):  # the paper's point: the correspondence holds in every subject
        per_subject = json.loads((tmp_path / subject / "summary.json").read_text())
        r = {
            (name, roi): summary[name][roi]["subjects"][subject]["mean_r"]
            for name in "zc"
            for roi in ("early", "ventral")
        }
        assert r["z", "early"] == per_subject["z"]["rois"]["early"]["mean_r"]
        assert r["z", "early"] > r["c", "early"] and r["c", "ventral"] > r["z", "ventral"]
    early_z = summary["z"]["early"]
    assert early_z["mean_r"] == pytest.approx(np.mean([s["mean_r"] for s in early_z["subjects"].values()]))
    with Image.open(tmp_path / "group_rois.png") as figure:
        assert figure.size[0] > 600 and np.asarray(figure.convert("L")).std() > 10  # drawn, not blank


def test_the_group_summary_draws_each_sweep_with_every_subject(tmp_path):
    from brainldm.analysis.encoding import EncodingResult
    from brainldm.analysis.encoding_job import write_group_summary

    def result(name, early, ventral):
        rois = {"early": {"n_voxels": 5, "mean_r": early, "fraction_significant": 1.0},
                "ventral": {"n_voxels": 5, "mean_r": ventral, "fraction_significant": 0.5}}  # fmt: skip
        zeros = np.zeros(10)
        return EncodingResult(name, zeros, zeros, zeros, zeros > 0, zeros, 8, 20, rois)

    results = {
        subject: {name: result(name, early + shift, 0.5 - early + shift)
                  for name, early in (("z", 0.6), ("zc@0.3", 0.5), ("zc@0.9", 0.2))}
        for subject, shift in ((1, 0.0), (5, 0.1))
    }  # fmt: skip
    paths = write_group_summary(results, tmp_path)
    assert [p.name for p in paths] == ["group_summary.json", "group_rois.png", "group_sweep_noise.png"]
    assert all(p.stat().st_size > 5_000 for p in paths[1:])
    summary = json.loads(paths[0].read_text())
    early = summary["zc@0.3"]["early"]
    assert {s: v["mean_r"] for s, v in early["subjects"].items()} == {"subj01": 0.5, "subj05": pytest.approx(0.6)}
    assert summary["zc@0.3"]["early"]["mean_r"] == pytest.approx(0.55)
    assert summary["zc@0.3"]["early"]["sem_r"] == pytest.approx(0.05)


@pytest.mark.parametrize("rank, expected", [(None, 29), (5, 5)])
def test_pca_scores_are_scikit_learns_and_keep_the_components_the_data_have(rank, expected):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    width = 200
    features = (
        rng.standard_normal((30, width))
        if rank is None
        else rng.standard_normal((30, rank)) @ rng.standard_normal((rank, width))
    )
    test = rng.standard_normal((7, width))
    train_scores, test_scores = pca_scores([(features, test)], n_components=6400, device="cpu")
    assert train_scores.shape == (30, expected) and test_scores.shape == (7, expected)
    reference = PCA(n_components=expected).fit(features)
    signs = np.sign((train_scores * reference.transform(features)).sum(0))  # a component's sign is arbitrary
    np.testing.assert_allclose(train_scores * signs, reference.transform(features), atol=1e-3)
    np.testing.assert_allclose(test_scores * signs, reference.transform(test), atol=1e-3)
    assert pca_scores([(features, test)], n_components=3, device="cpu")[0].shape == (30, 3)
    # column blocks (a store read a block at a time) give the same scores as the whole arrays
    blocks = [(features[:, i : i + 64], test[:, i : i + 64]) for i in range(0, width, 64)]
    blocked_train, blocked_test = pca_scores(blocks, n_components=6400, device="cpu")
    np.testing.assert_allclose(blocked_train @ blocked_train.T, train_scores @ train_scores.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(blocked_test @ blocked_train.T, test_scores @ train_scores.T, rtol=1e-4, atol=1e-3)


def test_the_pca_is_fit_on_the_training_images_only():
    """Test features along a direction no training image varies in change nothing: the PCA never saw them."""
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((40, 100)), rng.standard_normal((12, 100))
    weights = rng.standard_normal((100, 6))
    train_betas, test_betas = train @ weights, test @ weights + rng.standard_normal((12, 6))
    centred = train - train.mean(0)
    unseen = rng.standard_normal(100)
    unseen -= centred.T @ np.linalg.lstsq(centred.T, unseen, rcond=None)[0]  # orthogonal to the training span
    moved = test + 10 * rng.standard_normal((12, 1)) * unseen / np.linalg.norm(unseen)

    def r(test_features):
        return fit_encoding([(train, test_features)], train_betas, np.arange(40), test_betas, np.ones(6, int),
                            {1: "early"}, n_components=20, device="cpu").r  # fmt: skip

    np.testing.assert_allclose(r(moved), r(test), atol=1e-4)


def test_noise_sweep_moves_zc_away_from_z(encoded):
    _, results, voxels = encoded
    early = voxels.roi("early")
    assert results["zc@0.3"].r[early].mean() > results["zc@0.9"].r[early].mean()


def test_maps_summaries_and_figures_are_written(encoded):
    import json

    import nibabel as nib

    root, results, voxels = encoded
    out = root / "out"
    for name in ("z", "c", "zc-0.3", "zc-0.9"):
        assert nib.load(out / f"r_{name}.nii.gz").shape == voxels.grid_shape
        assert (out / f"map_{name}.png").stat().st_size > 5_000
    sweeps = ("sweep_noise.png", "sweep_steps_mid_0.5.png", "sweep_layers_0.5_3.png")
    for figure in ("compare_winner.png", "compare_rois.png", *sweeps):
        assert (out / figure).stat().st_size > 5_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["z"]["rois"]["early"]["fraction_significant"] > 0.5
    assert "feature,roi,n_voxels,mean_r,fraction_significant" in (out / "summary.csv").read_text()


def test_every_figure_is_written_with_a_plain_caption_beside_it(encoded):
    # the app shows these captions under the figures, so a figure renamed or added here keeps its caption
    from brainldm.analysis.encoding_job import read_captions

    root, _, _ = encoded
    captions = read_captions(root / "out")
    assert set(captions) == {p.name for p in (root / "out").glob("*.png")}
    for name, caption in captions.items():
        assert " " in caption and "_" not in caption.split(" of ")[0], (name, caption)
    assert "q < 0.05 after FDR" in captions["map_z.png"] and "z" in captions["map_z.png"]
    assert captions["sweep_noise.png"] == "test r as the noise level of zc varies per ROI"


def test_a_store_is_read_a_block_of_channels_at_a_time(encoded):
    from brainldm.data.features import FeatureStore

    root, _, _ = encoded
    store = FeatureStore(root / "features", "c")
    ids = store.missing([]) or sorted(store.index)[:10]
    assert store.feature_shape == (77, 32)
    blocks = list(store.blocks(ids[:6], ids[6:], max_values=10 * 32 * 20))  # 20 tokens of 10 images a block
    assert [b[0].shape for b in blocks] == [(6, 640)] * 3 + [(6, 17 * 32)]
    for part, ids_part in ((0, ids[:6]), (1, ids[6:])):
        whole = np.concatenate([b[part] for b in blocks], axis=1)
        np.testing.assert_array_equal(whole, store.load(ids_part).reshape(len(ids_part), -1))


def test_encoding_script_and_its_errors(encoded, tmp_path, capsys):
    import importlib.util

    root, _, _ = encoded
    spec = importlib.util.spec_from_file_location("encoding_script", "scripts/encoding.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # run in this process: a subprocess would import torch and the rest again (8 s)
    args = ["--data", str(root / "trials"), "--features", str(root / "features"), "--subject", "1"]
    script.main([*args, "--names", "z", "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert "best ROI early" in capsys.readouterr().out
    with pytest.raises(SystemExit) as missing:
        script.main([*args, "--names", "zc@0.5", "--out", str(tmp_path / "m")])
    assert missing.value.code == 2 and "no zc@0.5 features" in capsys.readouterr().err
    with pytest.raises(InputError, match="no prepared subj02-wholebrain"):
        run_encoding(root / "trials", root / "features", 2, ["z"], tmp_path / "x", progress=False)
