"""Metrics: identification math, PixCorr/SSIM against direct calls, the table, and an end-to-end evaluation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from brainldm.analysis.evaluate import evaluate, score_images
from brainldm.analysis.extractors import clip_extractor
from brainldm.analysis.protocol import METRICS, REFERENCE_ROWS
from brainldm.analysis.report import metrics_table, write_report
from brainldm.metrics import (
    correlation_distance,
    identification_rank,
    pixcorr,
    retrieval_top1,
    ssim,
    two_way_identification,
)
from brainldm.validation import InputError

ROOT = Path(__file__).resolve().parents[1]


def test_identical_features_identify_perfectly():
    features = np.random.default_rng(0).standard_normal((30, 50))
    assert two_way_identification(features, features).mean() == 1.0
    assert (identification_rank(features, features) == 1).all()


def test_unrelated_features_identify_at_chance():
    rng = np.random.default_rng(1)
    accuracy = two_way_identification(rng.standard_normal((400, 64)), rng.standard_normal((400, 64))).mean()
    assert abs(accuracy - 0.5) < 0.03


def test_identification_worked_by_hand():
    true = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    pred = np.array([[0.9, 0.1, 0.0], [0.8, 0.3, 0.0], [0.1, 0.0, 0.9]])
    # r(pred_i, true_j) by hand: pred_0 is closest to true_0; pred_1 is closer to true_0 than to its own true_1
    # (r = 0.95 vs 0.05, so it beats only true_2); pred_2 is closest to true_2
    np.testing.assert_allclose(two_way_identification(pred, true), [1.0, 0.5, 1.0])
    np.testing.assert_array_equal(identification_rank(pred, true), [1, 2, 1])


def _mindeye2_pixcorr_and_ssim(original: np.ndarray, reconstruction: np.ndarray) -> tuple[float, float]:
    """MindEye2's evaluation code, re-derived: float tensors in [0, 1] (originals stored at 224 px in float16,
    reconstructions at 256), ``transforms.Resize(425, BILINEAR)`` on tensors (torchvision 0.16: no antialiasing),
    ``np.corrcoef`` of the flattened images, and skimage's SSIM of ``rgb2gray`` images."""
    import torch.nn.functional as F

    def tensor(image):
        return torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 255

    def resize(x, size):
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)

    images = resize(resize(tensor(original), 224).half().float(), 425)
    recons = resize(resize(tensor(reconstruction), 256), 425)
    pix = np.corrcoef(images.reshape(1, -1)[0].numpy(), recons.reshape(1, -1)[0].numpy())[0][1]
    img_gray = rgb2gray(images.permute((0, 2, 3, 1)).numpy())[0]
    recon_gray = rgb2gray(recons.permute((0, 2, 3, 1)).numpy())[0]
    score = structural_similarity(
        recon_gray, img_gray, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
    )
    return float(pix), float(score)


def test_pixcorr_and_ssim_are_mindeye2s_on_its_image_path():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:425, 0:425] / 425
    smooth = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
    original = np.clip(127 + 100 * smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)
    reconstruction = np.clip(127 + 90 * np.roll(smooth, 9, axis=1) + rng.normal(0, 30, (512, 512, 3))[:425, :425], 0,
                             255).astype(np.uint8)  # fmt: skip
    reconstruction = np.asarray(Image.fromarray(reconstruction).resize((512, 512)))  # a 512-px reconstruction
    expected_pixcorr, expected_ssim = _mindeye2_pixcorr_and_ssim(original, reconstruction)
    scores = score_images([original], [reconstruction], ["pixcorr", "ssim"], {})
    assert abs(scores["pixcorr"] - expected_pixcorr) < 1e-4
    assert abs(scores["ssim"] - expected_ssim) < 1e-4
    # the image path matters: PIL's antialiased resize of uint8 images (the path before) gives another SSIM
    pil = [
        np.asarray(Image.fromarray(im).resize((425, 425), Image.Resampling.BILINEAR))
        for im in (original, reconstruction)
    ]
    assert abs(ssim(pil[1], pil[0]) - expected_ssim) > 1e-3
    assert ssim(original, original) == pytest.approx(1.0) and pixcorr(original, original) == pytest.approx(1.0)


def test_correlation_distance_and_retrieval():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 20))
    np.testing.assert_allclose(correlation_distance(x, x), 0.0, atol=1e-12)
    perfect = retrieval_top1(x, x, pool=30, draws=5)
    assert perfect["brain_to_image"] == perfect["image_to_brain"] == 1.0 and perfect["pool"] == 30
    assert retrieval_top1(x, rng.standard_normal((50, 20)), pool=30, draws=20)["brain_to_image"] < 0.2


def test_table_lays_out_rows_unavailable_metrics_and_quoted_references():
    results = {
        "subjects": {"subj01": {"Xzc": {"pixcorr": 0.1, "ssim": 0.3, "clip": 0.75}}},
        "average": {"Xzc": {"pixcorr": 0.1, "ssim": 0.3, "clip": 0.75}},
        "unavailable": {"alexnet2": "ModuleNotFoundError: No module named 'torchvision'"},
        "retrieval": {},
    }
    table = metrics_table(results)
    lines = table.splitlines()
    assert lines[0] == "| Method | PixCorr ↑ | SSIM ↑ | Alex(2) ↑ | Alex(5) ↑ | Incep ↑ | CLIP ↑ | Eff ↓ | SwAV ↓ |"
    assert "| subj01 Xzc | 0.100 | 0.300 | n/a | n/a | n/a | 75.0% | n/a | n/a |" in lines
    for label, row in REFERENCE_ROWS.items():
        assert f"*{label} ({row.source}), {row.n_test_images} images*" in table
    assert all(len(row.scores) == 8 and row.n_test_images in (982, 1000) for row in REFERENCE_ROWS.values())
    brain_diffuser = (
        "| *Brain-Diffuser 2023 (MindEye2 Table 1), 982 images* | 0.273 | 0.365 | 94.4% | 96.6% | 91.3% | 90.9% "
        "| 0.728 | 0.422 |"
    )
    assert brain_diffuser in lines  # the row MindEye2's Table 1 prints
    neurovla = "| *NeuroVLA, NeurIPS 2024 (NeuroVLA Table 2), 982 images* | 0.265 | 0.357 | 93.1% | 97.1% | 96.8% "
    assert neurovla + "| 97.5% | 0.633 | 0.321 |" in lines
    # published figures go by metric name: a table of some metrics, in another order, keeps each in its column
    reordered = metrics_table(results, ["clip", "pixcorr"]).splitlines()
    assert "| *MindEye2, ICML 2024 (MindEye2 Table 1), 1000 images* | 93.0% | 0.322 |" in reordered
    assert "| *MindTuner, AAAI 2025 (ZEBRA Table 1), 1000 images* | 93.8% | 0.322 |" in reordered
    assert "Alex(2): ModuleNotFoundError: No module named 'torchvision'" in table
    assert "not computed here" in table


@pytest.fixture(scope="module")
def reconstructions(decoding_world, tiny, tmp_path_factory):
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling
    from brainldm.reconstruction.job import reconstruct_trials

    out = tmp_path_factory.mktemp("recon")
    reconstructor = Reconstructor(tiny, output_size=64)
    reconstruct_trials(
        reconstructor, decoding_world.maps, decoding_world.data, 1, out, rows=range(8),
        sampling=Sampling(num_inference_steps=5, num_samples=2), progress=False,
    )  # fmt: skip
    return out


def test_end_to_end_evaluation_with_a_tiny_clip(reconstructions, decoding_world, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tiny_clip = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8)
    )  # fmt: skip
    names = ["pixcorr", "ssim", "clip", "alexnet2", "swav"]
    results = evaluate(
        reconstructions,
        names,
        extractors={"clip": clip_extractor(tiny_clip)},
        features=decoding_world.features,
        allow_unavailable=True,
    )
    rows = results["subjects"]["subj01"]
    assert set(rows) == {"Xz", "Xc", "Xzc"} and results["protocol"] == "mindeye2"  # sample 0 of each image
    for scores in rows.values():
        assert set(scores) >= {"pixcorr", "ssim", "clip"}
        assert -1 <= scores["pixcorr"] <= 1 and 0 <= scores["clip"] <= 1
    # models that cannot load here are reported with a reason, never dropped silently
    for name in ("alexnet2", "swav"):
        assert name not in rows["Xzc"] and results["unavailable"][name]
    retrieval = results["retrieval"]["subj01"]
    assert set(retrieval) == {"z", "c"} and retrieval["c"]["pool"] == 8
    assert retrieval["c"]["brain_to_image"] >= 0.75  # the planted c is decodable: retrieval far above 1/8
    paths = write_report(results, tmp_path, names)
    assert json.loads(paths["json"].read_text())["subjects"]["subj01"]["Xz"]["ssim"] == rows["Xz"]["ssim"]
    assert paths["plot"].stat().st_size > 5_000 and "| subj01 Xzc |" in paths["table"].read_text()


def test_an_offline_models_own_clip_tower_stands_in_for_clip_and_nothing_else_does(reconstructions, tmp_path):
    import shutil

    shutil.copytree(reconstructions, tmp_path / "toy")
    for path in (tmp_path / "toy").rglob("meta.json"):  # as if toy had made them: toy is registered with its own CLIP
        path.write_text(json.dumps({**json.loads(path.read_text()), "model_id": "toy"}))
    results = evaluate(tmp_path / "toy", ["clip"])
    assert "toy's own CLIP vision tower" in results["stand_ins"]["clip"]
    assert 0 <= results["subjects"]["subj01"]["Xzc"]["clip"] <= 1
    # tiny ships none: CLIP ViT-L/14 is asked for, and offline it is unavailable, with the reason
    results = evaluate(reconstructions, ["clip"], allow_unavailable=True)
    assert not results["stand_ins"] and results["unavailable"]["clip"]
    with pytest.raises(InputError, match="cannot compute clip .*openai/clip-vit-large-patch14.*--metrics pixcorr,ssim"):
        evaluate(reconstructions, ["clip"])  # as evaluate.py asks: a table of "n/a" is refused


def test_the_default_metrics_without_torchvision_stop_at_once_with_the_install_line(
    reconstructions, tmp_path, monkeypatch, capsys
):
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # as on a machine without it: import fails
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as stopped:
        script.main(["--recon", str(reconstructions), "--out", str(tmp_path / "metrics")])  # the default: all eight
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.strip().count("\n") == 0, err
    assert "alexnet2, alexnet5, inception, effnet, swav need torchvision" in err and 'pip install -e ".[gpu]"' in err
    assert "--metrics pixcorr,ssim,clip" in err and not (tmp_path / "metrics").exists()


def test_takagis_protocol_averages_each_metric_over_the_samples_of_each_image(reconstructions):
    from brainldm.analysis.evaluate import load_subject_reconstructions, score_images

    takagi = evaluate(reconstructions, ["pixcorr", "ssim"], protocol="takagi")["subjects"]["subj01"]
    assert set(takagi) == {"Xz", "Xc, mean of 2 samples", "Xzc, mean of 2 samples"}
    trials = load_subject_reconstructions(reconstructions / "subj01")
    originals = [images["original"] for _, images in trials]
    per_sample = [score_images(originals, [im[f"Xzc_{s}"] for _, im in trials], ["pixcorr"], {}) for s in (0, 1)]
    expected = (per_sample[0]["pixcorr"] + per_sample[1]["pixcorr"]) / 2
    assert takagi["Xzc, mean of 2 samples"]["pixcorr"] == pytest.approx(expected)
    assert per_sample[0]["pixcorr"] != per_sample[1]["pixcorr"]  # the samples differ, so the protocols do


def test_both_test_sets_are_scored_when_the_data_run_past_the_first_sessions(reconstructions):
    from brainldm.analysis.evaluate import load_subject_reconstructions, score_images, sets_of_test_images

    trials = load_subject_reconstructions(reconstructions / "subj01")
    sessions = [meta["sessions"] for meta, _ in trials]
    early = [i for i, s in enumerate(sessions) if min(s) <= 1]
    assert 0 < len(early) < len(trials)  # the offline world shows some test images only after session 1
    results = evaluate(reconstructions, ["pixcorr"], kinds=["Xzc"], first_sessions=1)
    assert results["test_sets"]["subj01"] == {"all": len(trials), "first 1 sessions": len(early)}
    rows = results["subjects"]["subj01"]
    subset = [trials[i] for i in early]
    expected = score_images([im["original"] for _, im in subset], [im["Xzc_0"] for _, im in subset], ["pixcorr"], {})
    assert rows["Xzc (first 1 sessions)"]["pixcorr"] == pytest.approx(expected["pixcorr"])
    assert rows["Xzc (first 1 sessions)"] != rows["Xzc"]
    assert "Test images, subj01: all: 8; first 1 sessions" in metrics_table(results, ["pixcorr"])
    # NSD's rule on its own numbers: the data of 37 sessions allow one test set, of 40 sessions two
    assert set(sets_of_test_images([[2, 9, 38], [38, 39, 40]])) == {"all", "first 37 sessions"}
    assert set(sets_of_test_images([[2, 9, 30], [3, 4, 5]])) == set(sets_of_test_images([[1], None])) == {"all"}


def test_evaluate_script_writes_the_report(reconstructions, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", "scripts/evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--recon", str(reconstructions), "--out", str(tmp_path), "--metrics", "pixcorr,ssim", "--kinds", "Xz",
                 "--first-sessions", "1"])  # fmt: skip
    assert "| subj01 Xz (first 1 sessions) |" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["test_sets"]["subj01"]["all"] == 8
    with pytest.raises(SystemExit) as bad:
        script.main(["--recon", str(reconstructions), "--out", str(tmp_path), "--first-sessions", "0"])
    assert bad.value.code == 2 and "--first-sessions" in capsys.readouterr().err


def test_metric_inputs_follow_mindeye2s_evaluation():
    sizes = {name: metric.input_size for name, metric in METRICS.items()}
    assert sizes == {"pixcorr": 425, "ssim": 425, "alexnet2": 256, "alexnet5": 256, "inception": 342, "clip": 224,
                     "effnet": 255, "swav": 224}  # fmt: skip
    with pytest.raises(ValueError, match="unknown protocol 'brain-diffuser'"):
        evaluate(".", ["pixcorr"], protocol="brain-diffuser")


def test_evaluate_refuses_unknown_metrics_and_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        evaluate(tmp_path, ["fid"])
    with pytest.raises(ValueError, match="no subjNN folders"):
        evaluate(tmp_path, ["pixcorr"])
    assert set(METRICS) == {"pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav"}


def test_a_rank_against_a_chosen_target_is_the_paired_rank():
    # the app ranks one reconstruction among every test picture; it must agree with the paired ranks
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=(9, 20)), rng.normal(size=(9, 20))
    paired = identification_rank(pred, true)
    assert [int(identification_rank(pred[i : i + 1], true, targets=[i])[0]) for i in range(9)] == paired.tolist()
    assert identification_rank(true[[4]], true, targets=[4])[0] == 1


def test_reconstructions_of_a_random_weight_ldm_are_scored_by_random_networks(reconstructions, tmp_path):
    import shutil

    for folder in sorted((reconstructions / "subj01").glob("test-*"))[:2]:  # two trials: ViT-L/14 is slow on a CPU
        shutil.copytree(folder, tmp_path / "rehearsal" / "subj01" / folder.name)
    for path in (tmp_path / "rehearsal").rglob("meta.json"):  # as if random-sd14 had made them: a rehearsal
        path.write_text(json.dumps({**json.loads(path.read_text()), "model_id": "random-sd14"}))
    results = evaluate(tmp_path / "rehearsal", ["pixcorr", "clip"], kinds=["Xz"])  # offline: no CLIP to download
    assert "random weights" in results["stand_ins"]["clip"] and "pixcorr" not in results["stand_ins"]
    assert 0 <= results["subjects"]["subj01"]["Xz"]["clip"] <= 1
