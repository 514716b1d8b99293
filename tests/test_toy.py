"""`toy`, the trained offline LDM: it loads like any diffusers model, keeps pictures, follows captions, and makes
the paper's pattern show end to end (z gives layout, c gives meaning, zc both). Its training script runs and resumes.
"""

import copy
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from brainldm.analysis.extractors import stand_in_clip_extractor
from brainldm.ldm import registry
from brainldm.ldm.features import encode_c, encode_z
from brainldm.ldm.loading import ldm_sizes, load_ldm
from brainldm.ldm.reconstruct import Reconstructor
from brainldm.metrics import pixcorr, two_way_identification
from brainldm.offline.synthetic import ANIMALS, coat_pattern
from brainldm.offline.toy_growth import grow_unet, retime_unet
from brainldm.offline.toy_parts import EMA, ToyConfig, build_unet, draw_pairs
from brainldm.offline.toy_training import Stage, train_unet
from brainldm.offline.twins import TOY_DIR, ddim_scheduler
from brainldm.presets import Sampling
from brainldm.validation import InputError

ROOT = Path(__file__).resolve().parents[1]
FAST = Sampling(num_inference_steps=15, guidance_scale=5.0)


@pytest.fixture(scope="module")
def ldm():
    return load_ldm("toy", device="cpu")


@pytest.fixture(scope="module")
def heldout():
    """Pictures and captions the model never saw (training draws from other seeds)."""
    return draw_pairs(12, seed=424242, size=128, workers=1)


@pytest.fixture(scope="module")
def clip_features():
    extract = stand_in_clip_extractor("toy")
    return lambda images: extract(list(images))


def test_toy_is_a_small_diffusers_folder_with_its_sizes_and_card():
    files = [p for p in TOY_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25e6
    assert all(p.suffix != ".bin" for p in files)  # safetensors only
    index = json.loads((TOY_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionImg2ImgPipeline" and index["image_encoder"][1]
    card = (TOY_DIR / "README.md").read_text()
    assert "train_toy_ldm.py" in card and "PixCorr" in card


def test_sizes_travel_with_the_model(ldm, tiny):
    assert ldm_sizes(ldm) == (80, 128)  # the paper's 320 of 512
    assert ldm_sizes(tiny) == (320, 512)
    recon = Reconstructor(ldm)
    assert (recon.z_image_size, recon.output_size) == (80, 128)


def test_scaled_latents_have_unit_variance(ldm, heldout):
    z = encode_z(ldm, list(heldout[0]))
    assert z.shape == (12, 4, 10, 10)
    assert 0.7 < float(z.std()) < 1.4


def test_vae_round_trip_keeps_the_pictures(ldm, heldout):
    pictures = heldout[0]
    z = encode_z(ldm, list(pictures), image_size=128)
    with torch.no_grad():
        out = ldm.vae.decode(z / ldm.vae.config.scaling_factor).sample
    back = ((out.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy()
    scores = [pixcorr(a, b) for a, b in zip(back, pictures)]
    assert np.mean(scores) >= 0.9
    # colour survives: per-channel means of the round trip track the originals'
    assert np.abs(back.mean((1, 2)) - pictures.mean((1, 2))).mean() < 12


@pytest.mark.parametrize("kind", ANIMALS)
def test_vae_round_trip_keeps_every_animals_coat(ldm, kind):
    """A picture that is all one animal's coat comes back as that coat, not another's: the first toys' VAE returned
    giraffes' chequerboards as snakes' stripes (``train_vae_refine``)."""
    yy, xx = np.mgrid[0:128, 0:128] / 128
    rng = np.random.default_rng(0)
    coat = coat_pattern(kind, xx, yy, rng)
    picture = np.clip(np.array([150, 90, 60]) + 45 * coat[..., None], 0, 255).astype(np.uint8)
    z = encode_z(ldm, [picture], image_size=128)
    with torch.no_grad():
        out = ldm.vae.decode(z / ldm.vae.config.scaling_factor).sample[0].mean(0).numpy()
    # measured r: 0.96-0.97 for stripes, leopard 0.95, giraffe 0.76, sheep 0.64 (the first toys': giraffe 0.65, sheep
    # 0.56)
    assert np.corrcoef(out.ravel(), coat.ravel())[0, 1] >= (0.6 if kind == "sheep" else 0.7)


@pytest.fixture(scope="module")
def from_true_features(ldm, heldout):
    """Xz, Xc and Xzc of the held-out pictures' own z and c."""
    pictures, captions = heldout
    return Reconstructor(ldm)(encode_z(ldm, list(pictures)), encode_c(ldm, captions), FAST)


def test_text_to_image_follows_the_captions_and_guidance_matters(ldm, heldout, clip_features, from_true_features):
    pictures, captions = heldout
    recon = Reconstructor(ldm)
    z, c = encode_z(ldm, list(pictures)), encode_c(ldm, captions)
    guided = from_true_features.Xc[:, 0]
    truth = clip_features(pictures)
    shuffled = recon(z, torch.roll(c, 1, dims=0), FAST, include_xzc=False).Xc[:, 0]  # another picture's caption
    matched = two_way_identification(clip_features(guided), truth).mean()
    other = two_way_identification(clip_features(shuffled), truth).mean()
    assert matched >= 0.65 and other < matched - 0.15  # the CPU-trained toy: 0.80 and 0.51 measured


def test_true_features_give_the_papers_pattern(heldout, clip_features, from_true_features):
    """From true z and c: Xz keeps the layout (pixels), Xc the meaning (toy-CLIP), Xzc both."""
    pictures, _ = heldout
    out = from_true_features
    xz, xc, xzc = out.Xz, out.Xc[:, 0], out.Xzc[:, 0]

    def pixels(images):
        return np.stack(images).reshape(len(images), -1)

    def mean_pixcorr(images):
        return np.mean([pixcorr(a, b) for a, b in zip(images, pictures)])

    assert two_way_identification(pixels(xz), pixels(pictures)).mean() >= 0.9
    # Xz of a picture's own z is that picture, colours included (a latent decoded at the wrong scale is not)
    assert mean_pixcorr(xz) >= 0.85  # the CPU-trained VAE at z's 80 px: 0.915 on its card
    assert np.abs(xz.mean((1, 2)) - pictures.mean((1, 2))).mean() < 8
    assert mean_pixcorr(xzc) > mean_pixcorr(xc) + 0.2
    truth = clip_features(pictures)
    assert two_way_identification(clip_features(xzc), truth).mean() >= 0.68  # the CPU-trained toy: 0.77 measured


def test_training_script_runs_a_few_steps_resumes_and_writes_a_loadable_model(tmp_path, capsys):
    import importlib.util

    out, work = tmp_path / "toy", tmp_path / "work"
    args = ["--out", str(out), "--work", str(work), "--n-train", "16", "--eval-pairs", "2", "--clip-steps", "2",
            "--clip-batch", "8", "--vae-steps", "2", "--vae-batch", "4", "--unet-steps", "3", "--unet-batch", "4",
            "--eval-steps", "2"]  # fmt: skip
    # in this process: a subprocess would spend 8 s importing torch, diffusers and transformers again
    spec = importlib.util.spec_from_file_location("train_toy_ldm", ROOT / "scripts" / "train_toy_ldm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(args)
    assert torch.load(work / "unet.pt", weights_only=True)["step"] == 3
    trained = load_ldm(str(out), device="cpu")
    assert ldm_sizes(trained) == (80, 128)
    assert (out / "README.md").is_file() and json.loads((out / "training.json").read_text())["scores"]

    # a rerun of a finished run does nothing: no checkpoint and no saved file is rewritten
    def stamps(folder, pattern="*"):
        return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern)}

    checkpoints, saved = stamps(work, "*.pt"), stamps(out)
    assert set(checkpoints) == {"clip.pt", "vae.pt", "latents.pt", "unet.pt"}
    script.main(args)
    assert stamps(work, "*.pt") == checkpoints and stamps(out) == saved
    assert "nothing to do" in capsys.readouterr().out
    # without its saved model, it resumes from the checkpoints (no phase trains again) and saves the model again
    shutil.rmtree(out)
    script.main(args)
    assert stamps(work, "*.pt") == checkpoints
    assert ldm_sizes(load_ldm(str(out), device="cpu")) == (80, 128)
    # other settings into the same checkpoints are refused, not mixed
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        script.main([*args, "--unet-batch", "8"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "other settings: --unet-batch 8 (the checkpoints': 4)" in err, err
    # --init continues the saved model's U-Net in a new work folder: only the U-Net trains, from its saved weights
    saved_unet = load_ldm(str(out), device="cpu", dtype=torch.float32).unet.state_dict()
    work2 = tmp_path / "work2"
    longer = [*args[:3], str(work2), *args[4:]]
    longer[longer.index("--unet-steps") + 1] = "5"
    script.main([*longer, "--init", str(out)])
    assert torch.load(work2 / "unet.pt", weights_only=True)["step"] == 5
    vae_state = torch.load(work2 / "vae.pt", weights_only=True)
    assert vae_state["step"] == 2 and vae_state["optimizer"] is None  # taken as trained, never stepped
    record = json.loads((out / "training.json").read_text())
    assert record["unet_continued_from"] == [3] and record["init"]["unet_steps"] == 3
    assert "--init" in (out / "README.md").read_text()
    continued = load_ldm(str(out), device="cpu", dtype=torch.float32).unet.state_dict()
    drift = max(float((continued[k] - saved_unet[k]).abs().max()) for k in saved_unet)
    assert 0 < drift < 0.05  # two EMA steps away from the saved weights, not a fresh network
    stamps = {p.name: p.stat().st_mtime_ns for p in work2.glob("*.pt")}
    script.main([*longer, "--init", str(out)])  # the same command again resumes: nothing trains or is seeded again
    assert {p.name: p.stat().st_mtime_ns for p in work2.glob("*.pt")} == stamps
    # a later continuation resumes that folder; the card puts --init on the run that started from the saved toy
    further = list(longer)
    further[further.index("--unet-steps") + 1] = "6"
    script.main(further)
    assert torch.load(work2 / "unet.pt", weights_only=True)["step"] == 6
    card = (out / "README.md").read_text()
    assert "--unet-steps 5 --init" in card and "--unet-steps 6 --work NEW_FOLDER`" in card, card
    # a continuation must keep the saved recipe and lengthen the U-Net, or grow it (not shrink it); another learning
    # rate comes only with a schedule of its own
    shrunk = ["--unet-attention-levels", "1", "--unet-steps", "9"]
    for changed in (["--unet-batch", "8"], ["--unet-steps", "4"], shrunk, ["--unet-lr", "0.001", "--unet-steps", "9"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as refused:
            script.main([*args[:3], str(tmp_path / "work3"), *args[4:], *changed, "--init", str(out)])
        assert refused.value.code == 2 and "--init" in capsys.readouterr().err
    # a grown U-Net (cross-attention at the finest level too) trains a schedule of its own from the saved weights;
    # its card reproduces the saved toy's runs, then the growing one
    minutes = json.loads((out / "training.json").read_text())["train_minutes"]
    grown = [*args[:3], str(tmp_path / "work4"), *args[4:], "--unet-steps", "2", "--unet-attention-levels", "3"]
    script.main([*grown, "--init", str(out)])
    assert torch.load(tmp_path / "work4" / "unet.pt", weights_only=True)["step"] == 2
    assert set(load_ldm(str(out), device="cpu").unet.config.down_block_types) == {"CrossAttnDownBlock2D"}
    record = json.loads((out / "training.json").read_text())
    assert record["init"]["grown_from_levels"] == 2 and record["train_minutes"] > minutes
    card = (out / "README.md").read_text()
    assert "--unet-steps 6 --work NEW_FOLDER` then `" in card, card
    assert "--unet-attention-levels 3 --unet-batch 4 --unet-steps 2 --init" in card, card
    # and a grown U-Net continues in its own work folder, as any other
    script.main([*grown[:-4], "--unet-steps", "3", "--unet-attention-levels", "3"])
    assert torch.load(tmp_path / "work4" / "unet.pt", weights_only=True)["step"] == 3
    card = (out / "README.md").read_text()
    assert "then trained 2 steps on a schedule of its own" in card and "`--unet-steps`, 2 -> 3 steps" in card, card
    # another caption_mix or snr_shift fine-tunes the saved U-Net on a schedule of its own, at its own learning rate
    # if given; the saved scheduler is the shifted one
    mixed = [*grown[:3], str(tmp_path / "work5"), *grown[4:], "--caption-mix", "0.5", "--unet-lr", "0.0001"]
    script.main([*mixed, "--snr-shift", "4", "--init", str(out)])
    assert torch.load(tmp_path / "work5" / "unet.pt", weights_only=True)["step"] == 2
    card = (out / "README.md").read_text()
    assert "Its U-Net was fine-tuned from the toy the first 5 commands below make (3 steps): trained 2" in card, card
    assert "--unet-lr 0.0001 --caption-mix 0.5 --snr-shift 4.0 --unet-steps 2 --init" in card, card
    assert "That schedule moved each condition by up to 0.5 x" in card, card
    assert "signal-to-noise ratio x 4 (`snr_shift`)" in card and "first refitted" in card, card
    snr = [a / (1 - a) for a in (s.alphas_cumprod.double() for s in (load_ldm(str(out)).scheduler, ddim_scheduler()))]
    torch.testing.assert_close(snr[0] / snr[1], torch.full_like(snr[0], 4.0), rtol=1e-3, atol=0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        script.main([*mixed, "--snr-shift", "0"])
    assert refused.value.code == 2 and "--snr-shift: 0 is outside (0" in capsys.readouterr().err
    # --vae-refine-steps refines the saved toy's VAE, then fine-tunes its U-Net on the new latents on a schedule of its
    # own; the card puts the refinement on that run alone
    saved_vae = load_ldm(str(out), device="cpu", dtype=torch.float32).vae.state_dict()
    refine = [*mixed[:3], str(tmp_path / "work6"), *mixed[4:], "--snr-shift", "4", "--vae-refine-steps", "2"]
    script.main([*refine, "--init", str(out)])
    before, after = (torch.load(tmp_path / "work6" / f"{name}.pt", weights_only=True) for name in ("vae", "vae_refine"))
    assert after["step"] == 2 and torch.load(tmp_path / "work6" / "unet.pt", weights_only=True)["step"] == 2
    # (float32 checkpoints: two warm-up steps move the weights by less than float16 can show)
    assert all(torch.equal(before["model"][k], saved_vae[k]) for k in saved_vae)
    assert any(not torch.equal(before["model"][k], after["model"][k]) for k in saved_vae if k.startswith("encoder."))
    refined_vae = load_ldm(str(out), device="cpu", dtype=torch.float32).vae.state_dict()
    card = (out / "README.md").read_text()
    assert "encoded again by the refined VAE" in card and "its VAE was refined 2 steps (`vae_refine_steps`)" in card
    assert card.count("--vae-refine-steps") == 1, card
    assert re.search(r"--vae-refine-steps 2 [^`]*--unet-steps 2 --init", card), card
    # a VAE is refined once; a refined toy's U-Net continues on its refined VAE, which trains no more
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        script.main([*refine[:3], str(tmp_path / "work7"), *refine[4:], "--vae-refine-steps", "3", "--init", str(out)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--vae-refine-steps 3 (saved 2)" in err, err
    with pytest.raises(SystemExit) as refused:  # the same refinement again: says so, not "these differ: none"
        script.main([*refine[:3], str(tmp_path / "work9"), *refine[4:], "--init", str(out)])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "its VAE is already refined (2 steps" in err and "longer --unet-steps" in err
    assert "these differ" not in err, err
    script.main([*refine[:3], str(tmp_path / "work8"), *refine[4:], "--unet-steps", "3", "--init", str(out)])
    assert torch.load(tmp_path / "work8" / "unet.pt", weights_only=True)["step"] == 3
    continued_vae = load_ldm(str(out), device="cpu", dtype=torch.float32).vae.state_dict()
    assert all(torch.equal(refined_vae[k], continued_vae[k]) for k in refined_vae)


def test_a_grown_unet_starts_as_the_saved_one():
    """New cross-attention blocks at the finest level add nothing until trained; shrinking is refused."""
    config = ToyConfig(unet_channels=(32, 32, 32))
    torch.manual_seed(0)
    saved = build_unet(config).eval()
    grown = grow_unet(saved, replace(config, unet_attention_levels=3)).eval()
    assert hasattr(grown.down_blocks[0], "attentions") and hasattr(grown.up_blocks[2], "attentions")
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, config.text_hidden)
    with torch.no_grad():
        before, after = saved(x, t, encoder_hidden_states=c).sample, grown(x, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(after, before)
    grown.down_blocks[0].attentions[0].proj_out.weight.data.normal_()  # a trained block does change the output
    with torch.no_grad():
        assert not torch.allclose(grown(x, t, encoder_hidden_states=c).sample, before)
    with pytest.raises(InputError, match="cannot grow"):
        grow_unet(grown, config)


def test_a_retimed_unet_reads_the_new_schedule_as_the_old_one():
    """After retime_unet, toy's U-Net at a shifted schedule's timestep predicts what it predicted at the old timestep
    with the same signal-to-noise ratio (its input is the same there); without it, it does not."""
    from diffusers import UNet2DConditionModel

    old = UNet2DConditionModel.from_pretrained(TOY_DIR / "unet").float().eval()
    new = copy.deepcopy(old)
    retime_unet(new, ddim_scheduler(), ddim_scheduler(4.0))
    # under x 4, t = 300, 600 and 900 have the SNRs that SD's schedule has at these (fractional) timesteps
    alpha_bar = ddim_scheduler().alphas_cumprod.double()
    log_snr = torch.log(alpha_bar / (1 - alpha_bar)).numpy()
    t = np.array([300, 600, 900])
    matched = np.interp(-(log_snr[t] + np.log(4.0)), -log_snr, np.arange(1000))
    torch.manual_seed(0)
    x, c = torch.randn(3, 4, 16, 16), torch.randn(3, 77, old.config.cross_attention_dim)
    with torch.no_grad():
        want = old(x, torch.as_tensor(matched, dtype=torch.float32), encoder_hidden_states=c).sample
        got = new(x, torch.as_tensor(t), encoder_hidden_states=c).sample
        unfitted = old(x, torch.as_tensor(t), encoder_hidden_states=c).sample
    error, before = float((got - want).norm()), float((unfitted - want).norm())
    assert error < 0.02 * float(want.norm()) and error < 0.1 * before, (error, before)


class _Recorder(torch.nn.Module):
    """A stand-in U-Net that records the conditions it is trained on."""

    def __init__(self):
        super().__init__()
        self.scale, self.conditions = torch.nn.Parameter(torch.ones(())), []

    def forward(self, noisy, t, encoder_hidden_states):
        self.conditions.append(encoder_hidden_states.detach().clone())
        return type("Output", (), {"sample": noisy * self.scale})


@pytest.mark.parametrize("mix", [0.0, 0.5])
def test_caption_mix_moves_each_condition_towards_other_pictures_meaning(mix):
    """Without caption_mix a condition is a caption's state, a picture's mean or the empty caption's, as earlier
    toys trained; with it, the kept ones move by at most mix x the largest difference of two pictures' means."""

    torch.manual_seed(0)
    config = ToyConfig(unet_steps=20, unet_batch=16, caption_mix=mix)
    states, owner = torch.randn(12, 3, 5), np.repeat(np.arange(6), 2)
    empty, means = torch.randn(3, 5), states.reshape(6, 2, 3, 5).mean(1)
    unet = _Recorder()
    stage = Stage(torch.optim.SGD(unet.parameters(), lr=0.0), config, torch.device("cpu"))
    train_unet(unet, EMA(unet, 0.9), torch.randn(6, 4, 2, 2), states, owner, empty, ddim_scheduler(), stage)
    conditions = torch.cat(unet.conditions).flatten(1)
    allowed = torch.cat([states, means, empty[None]]).flatten(1)
    exact = "donot_use_mm_for_euclid_dist"
    nearest = torch.cdist(conditions, allowed, compute_mode=exact).min(1).values
    reach = torch.cdist(means.flatten(1), means.flatten(1), compute_mode=exact).max()
    assert len(conditions) == 20 * 16
    if mix == 0:
        assert float(nearest.max()) < 1e-5
    else:
        assert float((nearest > 1e-3).float().mean()) > 0.7  # nearly every kept condition moved
        assert float(nearest.max()) <= mix * reach + 1e-5


def test_a_clip_stand_in_is_registered_with_the_model_by_name():
    # toy is registered with its own CLIP tower (its image_encoder); a real model, or a folder, is scored by ViT-L/14
    assert registry.builder("ldm", "toy").clip == "toy"
    assert registry.builder("clip", "toy").build().config.projection_dim > 0
    assert stand_in_clip_extractor(str(TOY_DIR)) is None  # an image encoder in a folder (SD unCLIP's) is no stand-in
    assert stand_in_clip_extractor("CompVis/stable-diffusion-v1-4") is None
