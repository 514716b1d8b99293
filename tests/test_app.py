"""The Gradio app: every endpoint through gradio_client, errors shown not fatal, concurrency, a real browser."""

import os
import re
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

ROOT = Path(__file__).resolve().parents[1]
# BRAINLDM_DOCS_SCREENSHOTS=1: the browser test runs on the offline world with toy (as `python app.py` does) and
# writes the screenshots the README shows into docs/; else on the test world, into outputs/
DOCS = bool(os.environ.get("BRAINLDM_DOCS_SCREENSHOTS"))
SCREENSHOTS = ROOT / ("docs" if DOCS else "outputs")
AS_FITTED = "as fitted (the paper)"
SIZE = 64  # px: tiny reconstructs at 512 by default, 40 times the work, and the tests look at no detail
FAST = dict(strength=0.8, rescale=AS_FITTED, guidance=5.0, steps=10, seed=42)


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
    demo = app_module.build_demo(DemoBackend(sources, device="cpu", output_size=SIZE))
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
    assert endpoints == {"/load_subject", "/reconstruct", "/showcase", "/cortical_maps"}


def test_load_subject_lists_the_test_images(client, decoding_world):
    gallery, trial, status, rescale = client.predict(1, api_name="/load_subject")
    assert len(gallery) == 20 and trial == 0 and "20 test images" in status
    assert rescale["value"] == app_module.DEFAULT_RESCALE and len(rescale["choices"]) == 3
    assert all(Path(item["image"]).exists() for item in gallery)


def test_reconstruct_returns_the_four_images_their_ranks_and_decoding_quality(client):
    presented, xz, xc, xzc, *lines, report = client.predict(1, 3, *FAST.values(), 2, api_name="/reconstruct")
    assert len(presented) == len(xz) == 1 and Path(presented[0]["image"]).exists()
    assert len(xc) == len(xzc) == 2
    for line in lines:  # Xz, Xc, Xzc: where the presented picture ranks among the 20, and chance
        assert re.search(r"ranked \d+(st|nd|rd|th) of 20 by pixels.*; chance is 10\.5", line), line
    assert "rank of the true features" in report and "z (image latent)" in report and "chance is 10.5" in report


def test_the_sliders_reach_the_reconstruction(client):
    """The noise level changes Xzc only (Xz is a plain decode, Xc starts from pure noise); guidance changes Xc;
    rescaling changes Xz (the decoded z itself)."""

    def run(strength, guidance, rescale=AS_FITTED):
        _, xz, xc, xzc, *_ = client.predict(1, 3, strength, rescale, guidance, 10, 42, 1, api_name="/reconstruct")
        return [np.asarray(Image.open(images[0]["image"])) for images in (xz, xc, xzc)]

    base, noisier, unguided = run(0.3, 5.0), run(1.0, 5.0), run(0.3, 1.0)
    assert np.array_equal(base[0], noisier[0]) and np.array_equal(base[1], noisier[1])
    assert not np.array_equal(base[2], noisier[2])
    assert not np.array_equal(base[1], unguided[1])
    assert not np.array_equal(base[0], run(0.3, 5.0, "per dimension")[0])


def test_cortical_maps_tab_says_when_there_are_none(client):
    figures, note = client.predict("1", api_name="/cortical_maps")
    assert figures == [] and "No cortical maps" in note


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda c: c.predict(1, 99, *FAST.values(), 1, api_name="/reconstruct"), "trial 99 is out of range"),
        (lambda c: c.predict(1, 0, 0.8, AS_FITTED, 5.0, 10, 2**70, 1, api_name="/reconstruct"), "seed|2\\^64|maximum"),
        (lambda c: c.predict(1, "seven", *FAST.values(), 1, api_name="/reconstruct"), "value passed .* 'seven'"),
        (
            lambda c: c.predict(1, 0, "high", AS_FITTED, 5.0, 10, 0, 1, api_name="/reconstruct"),
            "value passed .* 'high'",
        ),
        (lambda c: c.predict(1, 0, 0.8, "twice", 5.0, 10, 0, 1, api_name="/reconstruct"), "twice"),
        (lambda c: c.predict(5, api_name="/load_subject"), "subj05 has no maps.safetensors|not a local folder"),
        (lambda c: c.predict(2, api_name="/load_subject"), "maps found for subject 2 are subject 1's"),
    ],
)
def test_bad_input_is_a_visible_error_and_the_app_stays_up(client, call, match):
    with pytest.raises(Exception, match=match):
        call(client)
    gallery, *_ = client.predict(1, api_name="/load_subject")  # still serving
    assert len(gallery) == 20


def test_twelve_visitors_at_once_each_get_their_own_answer(server):
    """The queue under load (12 visitors through the API: 4 requests, each a different trial and seed, each sent by
    three visitors): every answer equals the same request made alone; the queue wait and the memory it took are
    reported."""
    import psutil

    def ask(k):
        start = time.perf_counter()
        trial = k % 4
        out = Client(server, verbose=False).predict(1, trial, 0.5, AS_FITTED, 5.0, 10, 100 + trial, 1,
                                                    api_name="/reconstruct")  # fmt: skip
        images = [np.asarray(Image.open(out[i][0]["image"])) for i in (1, 2, 3)]
        return images, time.perf_counter() - start

    alone = [ask(k) for k in range(4)]
    rss = psutil.Process().memory_info().rss
    with ThreadPoolExecutor(max_workers=12) as pool:
        together = list(pool.map(ask, range(12)))
    grown = (psutil.Process().memory_info().rss - rss) / 2**20
    for k, (theirs, _) in enumerate(together):
        assert all(np.array_equal(a, b) for a, b in zip(alone[k % 4][0], theirs))
    single = np.median([t for _, t in alone])
    waits = np.array([t for _, t in together])
    print(f"\n12 visitors at once: {np.median(waits):.1f} s at the median, {np.percentile(waits, 95):.1f} s at p95 "
          f"(one alone: {single:.1f} s); memory +{grown:.0f} MB")  # fmt: skip
    assert waits.max() < 300


@pytest.fixture(scope="module")
def browser_server(sources, tmp_path_factory):
    """The app the browser opens: the test world, or with DOCS the offline world `python app.py` shows."""
    if not DOCS:
        demo = app_module.build_demo(DemoBackend(sources, device="cpu", output_size=SIZE))
    else:
        from brainldm.demo import offline_sources

        demo = app_module.build_demo(DemoBackend(offline_sources(tmp_path_factory.mktemp("offline")), device="cpu"))
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app_module.LAUNCH_OPTIONS)  # fmt: skip
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_a_visitor_sees_the_result_at_a_glance_in_a_real_browser(browser_server):
    """At 1400 x 1000: pick a test image, reconstruct; the four images are inside the first screen at one size, each
    reconstruction says how its presented picture ranks and what chance is, the showcase thumbnails are shown, and the
    secondary controls sit in the Advanced accordion. At phone width the page stacks."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed; the README's install command installs it")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run"]  # fmt: skip
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(browser_server)
        page.wait_for_selector("text=Pick one, then press Reconstruct", timeout=120_000)
        page.locator("#showcase .thumbnail-item").nth(2).wait_for(timeout=300_000)  # computed once, on first use
        page.locator("#test-images .thumbnail-item").nth(5).click()
        page.wait_for_function("() => document.querySelector('input[aria-label=\"Test trial\"]').value === '5'")
        advanced = page.locator("#advanced")
        assert not advanced.get_by_text("Seed", exact=True).first.is_visible()  # out of the way until opened
        advanced.get_by_text("Advanced").first.click()
        for label in ("c strength (guidance)", "DDIM steps", "Seed", "Samples"):  # the secondary controls are in it
            advanced.get_by_text(label, exact=True).first.wait_for(timeout=10_000)
        assert advanced.get_by_role("button", name="New seed").is_visible()
        if not DOCS:  # a short run on the test world
            page.get_by_label("number input for DDIM steps").fill("10")
            page.get_by_label("number input for DDIM steps").press("Enter")
        advanced.get_by_text("Advanced").first.click()
        page.get_by_role("button", name="Reconstruct").click()
        page.wait_for_function("() => document.querySelector('#xzc-score').innerText.includes('chance')",
                               timeout=300_000)  # fmt: skip
        boxes = [page.locator(f"#{kind} img").first.bounding_box() for kind in ("presented", "xz", "xc", "xzc")]
        for box in boxes:  # inside the first screen
            assert box and box["y"] >= 0 and box["y"] + box["height"] <= 1000 and box["x"] + box["width"] <= 1400
        sizes = {(round(b["width"]), round(b["height"])) for b in boxes}
        assert len(sizes) == 1 and min(next(iter(sizes))) >= 150, sizes  # one size, and not a thumbnail
        for kind in ("xz", "xc", "xzc"):
            text = page.locator(f"#{kind}-score").inner_text()
            assert re.search(r"ranked \d+(st|nd|rd|th) of \d+ by pixels.*chance is", text), text
        assert page.locator("#showcase .thumbnail-item").count() == 3
        page.screenshot(path=str(SCREENSHOTS / "app_offline.png"))
        page.set_viewport_size({"width": 420, "height": 900})  # a phone: the columns stack
        page.wait_for_timeout(500)
        xz, xzc = (page.locator(f"#{kind} img").first.bounding_box() for kind in ("xz", "xzc"))
        assert xzc["y"] > xz["y"] + xz["height"] - 1  # one under the other, not side by side
        page.screenshot(path=str(SCREENSHOTS / "app_phone.png"), full_page=True)
        browser.close()
    assert (SCREENSHOTS / "app_offline.png").stat().st_size > 10_000


def test_the_app_knows_the_offline_models_where_brainldm_is_not_installed(sources, monkeypatch):
    from brainldm.ldm import registry

    # a Space runs app.py from its checkout: no package metadata, so no entry point registers the offline models
    monkeypatch.setattr(registry, "_REGISTRY", {kind: {} for kind in registry.KINDS})
    monkeypatch.setattr(registry, "_loaded", True)
    assert registry.builder("ldm", "tiny") is None
    backend = DemoBackend(sources, device="cpu", output_size=SIZE)
    assert backend.model_id == "tiny" and registry.builder("ldm", "toy") is not None


def test_without_maps_or_data_the_app_builds_the_offline_world(offline_demo, tmp_path, monkeypatch):
    import brainldm.demo

    for name in ("BRAINLDM_MAPS", "BRAINLDM_DATA", "BRAINLDM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no weights/ here
    built = []  # the world offline_sources() builds is the session's (built once, by the same call, for every test)
    monkeypatch.setattr(brainldm.demo, "offline_sources", lambda *args: built.append(args) or offline_demo)
    sources = app_module.resolve_sources(None, None, None, None)
    assert built == [()] and sources.offline and sources.model == "toy" and sources.subjects == [1, 2]
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

    from brainldm.analysis.encoding_job import write_captions

    group = ["figures/group_rois.png", "figures/group_sweep_noise.png", "figures/subj01/compare_rois.png",
             "figures/subj01/flatmap_z.png"]  # fmt: skip
    for path in [*group, "figures/subj02/flatmap_c.png", "subj02/figures/flatmap_z.png"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"png")
    write_captions(
        {tmp_path / "figures/subj01/flatmap_z.png": "test r of z on the flattened cortex"}, tmp_path / "figures/subj01"
    )
    backend = SimpleNamespace(sources=SimpleNamespace(maps=str(tmp_path)))
    names = {s: [Path(p).relative_to(tmp_path).as_posix() for p, _ in DemoBackend.cortical_maps(backend, s)]
             for s in (1, 2, 3)}  # fmt: skip
    summaries = ["figures/group_rois.png", "figures/group_sweep_noise.png"]
    assert names[1] == [*summaries, "figures/subj01/flatmap_z.png", "figures/subj01/compare_rois.png"]
    assert names[2] == [*summaries, "subj02/figures/flatmap_z.png"]  # figures beside its maps
    assert names[3] == summaries
    captions = dict(DemoBackend.cortical_maps(backend, 1))  # the captions encoding wrote beside its figures
    assert captions[str(tmp_path / "figures/subj01/flatmap_z.png")] == "subject 1: test r of z on the flattened cortex"


def test_a_subject_loads_without_encoding_images_and_shows_its_fit_time_scores(decoding_world):
    from brainldm.data.features import load_features
    from brainldm.demo import Subject
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
    backend = DemoBackend(sources, device="cpu", output_size=SIZE)
    items = backend.gallery(1)
    first = [Path(path).stat().st_mtime_ns for path, _ in items]
    assert len(items) == 20 and all(caption for _, caption in items)
    with Image.open(items[0][0]) as thumbnail:
        assert max(thumbnail.size) <= 128
    assert [Path(path).stat().st_mtime_ns for path, _ in backend.gallery(1)] == first  # not rewritten


def test_result_images_are_whole_files_named_by_their_content(sources):
    """The result panels get files, not arrays (Gradio rewrites an array's cache file in place, so two visitors
    shown the same image at once could get half of it): the same image is the same file, written once, whole."""
    backend = DemoBackend(sources, device="cpu", output_size=SIZE)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = backend.image_file(image)
    written = Path(path).stat().st_mtime_ns
    assert backend.image_file(image.copy()) == path and Path(path).stat().st_mtime_ns == written
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert backend.image_file(255 - image) != path
    assert not list(Path(path).parent.glob(".*.tmp*"))


def test_the_zerogpu_budget_follows_steps_and_samples():
    from brainldm.demo import gpu_seconds

    base = gpu_seconds(Sampling())
    assert gpu_seconds(Sampling(num_inference_steps=100)) > base
    assert gpu_seconds(Sampling(num_samples=5)) > gpu_seconds(Sampling(num_samples=2)) > base
    assert 15 < base < 60


def test_the_gpu_function_gets_only_the_decoded_features_and_the_settings(sources):
    backend = DemoBackend(sources, device="cpu", output_size=SIZE)
    calls = []

    def gpu(z, c, sampling, keys):  # what runs under @spaces.GPU on a ZeroGPU Space
        calls.append((z, c, sampling, keys))
        return backend.generate(z, c, sampling, keys)

    sampling = Sampling(num_inference_steps=4, num_samples=2)
    out = backend.reconstruct(1, 3, sampling, generate=gpu)
    ((z, c, given, keys),) = calls
    assert given == sampling and z.shape == (1, 4, 40, 40) and c.shape == (1, 77, 32)
    assert z.device.type == c.device.type == "cpu"  # decoding happened outside, in the main process
    assert len(out["Xzc"]) == 2 and out["quality"]["n_candidates"] == 20


def test_the_knobs_say_what_they_do_and_the_secondary_ones_are_advanced(sources):
    import gradio as gr

    demo = app_module.build_demo(DemoBackend(sources, device="cpu", output_size=SIZE))
    sliders = {block.label: block for block in demo.blocks.values() if isinstance(block, gr.Slider)}
    noise = sliders["Noise level (img2img strength)"].info
    assert "Xzc only" in noise and "1.0" in noise and "not from Xc's" in noise  # true at every value
    assert "steers" in sliders["c strength (guidance)"].info
    seed = next(b for b in demo.blocks.values() if isinstance(b, gr.Number) and b.label == "Seed")
    assert seed.minimum == 0 and seed.maximum == 2**64 - 1
    rescale = next(b for b in demo.blocks.values() if isinstance(b, gr.Radio))
    assert rescale.value == app_module.DEFAULT_RESCALE and AS_FITTED in [c[0] for c in rescale.choices]
    title = next(b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and b.value)
    assert "high-resolution" not in title.lower()


def test_the_showcase_is_the_best_median_and_worst_trial_computed_once(sources):
    backend = DemoBackend(sources, device="cpu", output_size=SIZE)
    calls = []

    def gpu(z, c, sampling, keys):
        calls.append(sampling)
        return backend.generate(z, c, sampling, keys)

    sampling = Sampling(num_inference_steps=4)
    first = backend.showcase(1, sampling, generate=gpu)
    assert [item["label"].split(":")[0] for item in first] == ["best", "median", "worst"] and len(calls) == 3
    quality = [
        np.mean([t["r"] for t in backend.subject(1).quality(item["trial"])["targets"].values()]) for item in first
    ]
    assert quality[0] >= quality[1] >= quality[2]
    assert backend.showcase(1, sampling, generate=gpu) is first and len(calls) == 3  # every later visitor: cached
    with Image.open(first[0]["thumbnail"]) as thumbnail:
        assert thumbnail.size == (4 * 96 + 12, 96)  # presented, Xz, Xc, Xzc side by side


def test_maps_without_rescaling_statistics_fall_back_to_as_fitted_with_a_line_saying_so(decoding_world, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = decoding_world.maps.save_pretrained(tmp_path / "weights" / "subj01")
    tensors = load_file(folder / "maps.safetensors")  # as maps fitted before brainldm stored the statistics
    stats = ("target_mean", "target_std", "prediction_mean", "prediction_std")
    save_file({k: v for k, v in tensors.items() if k.split(".")[-1] not in stats}, folder / "maps.safetensors",
              metadata={"format": "brainldm-subject-maps/2"})  # fmt: skip
    sources = Sources(str(tmp_path / "weights"), str(decoding_world.data), "tiny", [1])
    backend = DemoBackend(sources, device="cpu", output_size=SIZE)
    sampling = Sampling(num_inference_steps=4)
    out = backend.reconstruct(1, 0, sampling, rescale="target")  # the app's default
    assert "fitted before brainldm stored the rescaling statistics" in out["note"]
    assert np.array_equal(out["Xz"], backend.reconstruct(1, 0, sampling, rescale=None)["Xz"])  # as fitted
    assert backend.reconstruct(1, 0, sampling, rescale=None)["note"] is None
    demo = app_module.build_demo(backend)
    load_subject = next(f.fn for f in demo.fns.values() if f.name == "load_subject")
    *_, choice = load_subject(1)  # only "as fitted" is offered
    assert choice["choices"] == [AS_FITTED] and choice["value"] == AS_FITTED


def test_samples_beyond_the_limit_are_refused_before_any_work(decoding_world):
    from brainldm.presets import MAX_SAMPLES
    from brainldm.validation import InputError

    backend = DemoBackend(Sources(None, str(decoding_world.data), "tiny", [1]), device="cpu", output_size=SIZE)
    backend.subject = lambda subject: pytest.fail("decoded before refusing")
    with pytest.raises(InputError, match=f"samples must be in 1..{MAX_SAMPLES} per image.*got 1000"):
        backend.reconstruct(1, 0, Sampling(num_samples=1000))


@pytest.mark.parametrize("trial, match", [("seven", "trial must be a test trial's number, got 'seven'"),
                                          (None, "got None"), (2.5, "out of range"), (20, "out of range")])  # fmt: skip
def test_a_trial_that_is_not_a_test_trial_is_named(decoding_world, trial, match):
    from brainldm.demo import Subject
    from brainldm.validation import InputError

    with pytest.raises(InputError, match=match):
        Subject(1, decoding_world.maps, str(decoding_world.data)).check_trial(trial)
