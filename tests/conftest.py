"""Shared fixtures: the offline world (a synthetic NSD tree and tiny_ldm), built once per test session."""

import atexit
import os
import shutil
import tempfile

# Tests never reach the Hub: set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under the README's `-n 2` each worker has a core of its own: most of the suite is single-threaded Python (drawing,
# PNG and gzip, gradio, imports), and two torch threads per worker would only contend (set before torch is imported)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"
# Gradio's servers cache the files they send, and gradio_client downloads what it receives, into one folder,
# /tmp/gradio unless GRADIO_TEMP_DIR says otherwise (both read it when imported). Each test process gets its own:
# a CI run under `-n 2` once saw a gallery file's download cut off after its headers, and nothing of one worker's
# files should be in the other's way (nor left in /tmp after the run).
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="brainldm-tests-gradio-")
atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from brainldm.offline.twins import tiny_ldm

    return tiny_ldm()


@pytest.fixture(scope="session")
def nsd_tree(tmp_path_factory, tiny):
    """Two subjects, 3 sessions x 30 trials, 6 shared images, with HDF5 betas twins."""
    from brainldm.offline.synthetic import write_nsd_tree

    root = tmp_path_factory.mktemp("nsd")
    return write_nsd_tree(root, subjects=(1, 2), write_hdf5=True, ldm=tiny, seed=0)


@pytest.fixture(scope="session")
def decoding_world(tmp_path_factory, tiny):
    """A high-SNR subject with enough images to decode from: trials dataset, z/c features and fitted maps."""
    from types import SimpleNamespace

    from brainldm.offline.world import build_offline_world

    root = tmp_path_factory.mktemp("decoding")
    world = build_offline_world(
        root,
        tiny,
        "tiny",
        subjects=(1, 2),
        fit=(1,),
        n_sessions=6,
        trials_per_session=45,
        n_shared=20,
        snr=100.0,
        seed=1,
    )
    return SimpleNamespace(root=root, tree=world.tree, data=world.data, features=world.features, maps=world.maps[1])


@pytest.fixture(scope="session")
def offline_demo(tmp_path_factory):
    """The offline world the app shows without maps or data (:func:`brainldm.demo.offline_sources`: toy, subjects 1 and
    2, 6 x 45 trials, 20 test images, laid out on pycortex's S1 with its encoding figures), built once: the app's
    offline test, the world's own tests and the flatmap tests share it."""
    from brainldm.demo import offline_sources

    return offline_sources(tmp_path_factory.mktemp("offline-demo"))


# The slowest groups, sent to the workers first so that neither waits on the other at the end (seconds on one worker,
# measured with `--durations=0`: toy 81, offline_demo 67, app 53, remote 38, features 34; the rest 26 or less)
SLOWEST_FIRST = ("test_toy.py", "offline_demo", "test_app.py", "test_remote.py", "test_features.py")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (the README's `-n 2`; `--dist loadgroup` is in pyproject's addopts) each test file runs whole
    on one worker, so its module fixtures are built once, and every test of :func:`offline_demo` on the same worker,
    which builds that world once; the slowest groups first."""

    def group(item) -> str:
        return "offline_demo" if "offline_demo" in item.fixturenames else item.path.name

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: k for k, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: the rest keep their order
