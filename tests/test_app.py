"""The Gradio app: every endpoint through gradio_client, errors shown not fatal, concurrency, a real browser."""

import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client
from PIL import Image

import app as app_module
from brainldm.demo import OFFLINE_BANNER, DemoBackend, Sources
from brainldm.presets import Sampling

SCREENSHOT = Path(__file__).resolve().parents[1] / "outputs" / "app_screenshot.png"
FAST = dict(strength=0.8, guidance=5.0, steps=10, seed=42)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sources(decoding_world, tmp_path_factory):
    weights = tmp_path_factory.mktemp("weights")
    decoding_world.maps.save_pretrained(weights / "subj01")
    # subject 2's folder holds subject 1's maps: the "maps and data of different subjects" case
    decoding_world.maps.save_pretrained(weights / "subj02")
    return Sources(maps=str(weights), data=str(decoding_world.data), model="tiny", subjects=[1, 2, 5])


@pytest.fixture(scope="module")
def server(sources):
    demo = app_module.build_demo(DemoBackend(sources, device="cpu"))
    port = _free_port()
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app_module.LAUNCH_OPTIONS
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def test_endpoints_are_the_documented_ones(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert endpoints == {"/load_subject", "/reconstruct", "/cortical_maps"}


def test_load_subject_lists_the_test_images_with_captions(client, decoding_world):
    gallery, trial, status = client.predict(1, api_name="/load_subject")
    assert len(gallery) == 20 and trial == 0 and "20 test images" in status
    assert gallery[0]["caption"]


def test_reconstruct_returns_the_four_images_and_decoding_quality(client):
    presented, xz, xc, xzc, report = client.predict(1, 3, *FAST.values(), 2, api_name="/reconstruct")
    assert Path(presented).exists() and Path(xz).exists()
    assert len(xc) == len(xzc) == 2
    assert "identification rank (of 20)" in report and "z (image latent)" in report


def test_the_sliders_reach_the_reconstruction(client):
    """The noise level changes Xzc only (Xz is a plain decode, Xc starts from pure noise); guidance changes Xc."""

    def run(strength, guidance):
        _, xz, xc, xzc, _ = client.predict(1, 3, strength, guidance, 10, 42, 1, api_name="/reconstruct")
        return [np.asarray(Image.open(path)) for path in (xz, xc[0]["image"], xzc[0]["image"])]

    base, noisier, unguided = run(0.3, 5.0), run(1.0, 5.0), run(0.3, 1.0)
    assert np.array_equal(base[0], noisier[0]) and np.array_equal(base[1], noisier[1])
    assert not np.array_equal(base[2], noisier[2])
    assert not np.array_equal(base[1], unguided[1])


def test_cortical_maps_tab_says_when_there_are_none(client):
    figures, note = client.predict(1, api_name="/cortical_maps")
    assert figures == [] and "No cortical maps" in note


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.predict(1, 99, *FAST.values(), 1, api_name="/reconstruct"), "trial 99 is out of range"),
        (lambda c: c.predict(1, 0, 0.8, 5.0, 10, 2**70, 1, api_name="/reconstruct"), "seed|2\\^64|maximum"),
        (lambda c: c.predict(1, "seven", *FAST.values(), 1, api_name="/reconstruct"), "value passed .* 'seven'"),
        (lambda c: c.predict(1, 0, "high", 5.0, 10, 0, 1, api_name="/reconstruct"), "value passed .* 'high'"),
        (lambda c: c.predict(5, api_name="/load_subject"), "subj05 has no maps.safetensors|not a local folder"),
        (lambda c: c.predict(2, api_name="/load_subject"), "maps found for subject 2 are subject 1's"),
    ],
)
def test_bad_input_is_a_visible_error_and_the_app_stays_up(client, call, match):
    with pytest.raises(Exception, match=match):
        call(client)
    gallery, _, _ = client.predict(1, api_name="/load_subject")  # still serving
    assert len(gallery) == 20


def test_ten_concurrent_requests_all_complete(server):
    def one(k):
        return Client(server, verbose=False).predict(1, k, 0.5, 5.0, 10, k, 1, api_name="/reconstruct")

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(one, range(10)))
    assert len(results) == 10 and all(Path(r[3][0]["image"]).exists() for r in results)
    assert time.perf_counter() - start < 300


def test_a_real_browser_picks_a_trial_moves_strength_and_sees_four_images(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed; the README's install command installs it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run"]  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server)
        page.wait_for_selector("text=Pick one, then press Reconstruct", timeout=60_000)
        page.locator(".thumbnail-item").nth(5).click()
        trial = page.get_by_label("Test trial")
        page.wait_for_function("() => document.querySelector('input[aria-label=\"Test trial\"]').value === '5'")
        assert trial.input_value() == "5"
        strength = page.get_by_label("number input for Noise level")
        strength.fill("0.5")
        strength.press("Enter")
        assert page.get_by_label("number input for Noise level").input_value() == "0.5"
        page.get_by_label("number input for DDIM steps").fill("10")
        page.get_by_label("number input for DDIM steps").press("Enter")
        page.get_by_role("button", name="Reconstruct").click()
        for element in ("#presented img", "#xz img", "#xc img", "#xzc img"):
            page.wait_for_selector(element, timeout=120_000)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


def test_without_maps_or_data_the_app_builds_the_offline_world(tmp_path, monkeypatch):
    for name in ("BRAINLDM_MAPS", "BRAINLDM_DATA", "BRAINLDM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no weights/ here
    sources = app_module.resolve_sources(None, None, None, None)
    assert sources.offline and sources.model == "toy" and sources.subjects == [1, 2]
    backend = DemoBackend(sources, device="cpu")
    demo = app_module.build_demo(backend)
    assert any(getattr(block, "value", None) == OFFLINE_BANNER for block in demo.blocks.values())
    out = backend.reconstruct(1, 0, Sampling(num_inference_steps=10))
    assert out["Xzc"][0].shape == (128, 128, 3) and out["quality"]["targets"]["z"]["rank"] >= 1  # toy's own output size
    if find_spec("cortex"):  # with pycortex, the "Cortical maps" tab shows the group summary, then the flatmaps
        for subject in (1, 2):
            figures = [Path(path).name for path, _ in backend.cortical_maps(subject)]
            assert figures[:3] == ["group_rois.png", "flatmap_compare.png", "flatmap_compare_winner.png"], figures


def test_cortical_maps_come_from_either_layout_with_the_group_summary_first(tmp_path):
    from types import SimpleNamespace

    group = ["figures/group_rois.png", "figures/group_sweep_noise.png", "figures/subj01/compare_rois.png",
             "figures/subj01/flatmap_z.png"]  # fmt: skip
    for path in [*group, "figures/subj02/flatmap_c.png", "subj02/figures/flatmap_z.png"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"png")
    backend = SimpleNamespace(sources=SimpleNamespace(maps=str(tmp_path)))
    names = {s: [Path(p).relative_to(tmp_path).as_posix() for p, _ in DemoBackend.cortical_maps(backend, s)]
             for s in (1, 2, 3)}  # fmt: skip
    summaries = ["figures/group_rois.png", "figures/group_sweep_noise.png"]
    assert names[1] == [*summaries, "figures/subj01/flatmap_z.png", "figures/subj01/compare_rois.png"]
    assert names[2] == [*summaries, "subj02/figures/flatmap_z.png"]  # figures beside its maps
    assert names[3] == summaries


def test_a_subject_loads_without_encoding_images_and_shows_its_fit_time_scores(decoding_world):
    from brainldm.demo import Subject
    from brainldm.features import load_features
    from brainldm.metrics import identification_rank, pattern_correlation

    state = Subject(1, decoding_world.maps, str(decoding_world.data))  # no LDM: nothing is encoded at load
    test = state.test.with_format("numpy")
    ids, decoded = np.asarray(test["nsd_id"]), decoding_world.maps.predict(np.asarray(test["betas"]))
    true_c = load_features(decoding_world.features, "c", ids)
    quality = state.quality(4)
    c = quality["targets"]["c"]
    assert c["rank"] == identification_rank(decoded["c"].numpy(), true_c)[4] and quality["n_candidates"] == 20
    assert c["r"] == pytest.approx(pattern_correlation(decoded["c"].numpy(), true_c)[4], abs=1e-5)
    torch.testing.assert_close(state.decode(4)["z"], decoded["z"][4:5])  # one row or all: float rounding only


def test_the_gallery_sends_small_thumbnails_made_once(sources):
    backend = DemoBackend(sources, device="cpu")
    items = backend.gallery(1)
    first = [Path(path).stat().st_mtime_ns for path, _ in items]
    assert len(items) == 20 and all(caption for _, caption in items)
    with Image.open(items[0][0]) as thumbnail:
        assert max(thumbnail.size) <= 128
    assert [Path(path).stat().st_mtime_ns for path, _ in backend.gallery(1)] == first  # not rewritten


def test_the_zerogpu_budget_follows_steps_and_samples():
    from brainldm.demo import gpu_seconds

    base = gpu_seconds(Sampling())
    assert gpu_seconds(Sampling(num_inference_steps=100)) > base
    assert gpu_seconds(Sampling(num_samples=5)) > gpu_seconds(Sampling(num_samples=2)) > base
    assert 15 < base < 60


def test_the_gpu_function_gets_only_the_decoded_features_and_the_settings(sources):
    backend = DemoBackend(sources, device="cpu")
    calls = []

    def gpu(z, c, sampling):  # what runs under @spaces.GPU on a ZeroGPU Space
        calls.append((z, c, sampling))
        return backend.generate(z, c, sampling)

    sampling = Sampling(num_inference_steps=4, num_samples=2)
    out = backend.reconstruct(1, 3, sampling, generate=gpu)
    ((z, c, given),) = calls
    assert given == sampling and z.shape == (1, 4, 40, 40) and c.shape == (1, 77, 32)
    assert z.device.type == c.device.type == "cpu"  # decoding happened outside, in the main process
    assert len(out["Xzc"]) == 2 and out["quality"]["n_candidates"] == 20


def test_the_knobs_are_explained_and_the_showcase_is_cached_lazily(sources):
    import gradio as gr

    demo = app_module.build_demo(DemoBackend(sources, device="cpu"))
    sliders = {block.label: block for block in demo.blocks.values() if isinstance(block, gr.Slider)}
    assert "0 keeps Xz" in sliders["Noise level (img2img strength)"].info
    assert "steers" in sliders["c strength (guidance)"].info
    seed = next(b for b in demo.blocks.values() if isinstance(b, gr.Number) and b.label == "Seed")
    assert seed.minimum == 0 and seed.maximum == 2**64 - 1
    showcase = next(b for b in demo.blocks.values() if isinstance(b, gr.Dataset))
    assert len(showcase.samples) == 3 and showcase.samples[0][2:5] == [0.8, 5.0, 50]  # the paper's settings


@pytest.mark.parametrize("trial, match", [("seven", "trial must be a test trial's number, got 'seven'"),
                                          (None, "got None"), (2.5, "out of range"), (20, "out of range")])  # fmt: skip
def test_a_trial_that_is_not_a_test_trial_is_named(decoding_world, trial, match):
    from brainldm.demo import Subject
    from brainldm.validation import InputError

    with pytest.raises(InputError, match=match):
        Subject(1, decoding_world.maps, str(decoding_world.data)).check_trial(trial)
