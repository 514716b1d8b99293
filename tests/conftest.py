"""Shared fixtures: the offline world (a synthetic NSD tree and tiny_ldm), built once per test session."""

import os

# Tests never reach the Hub: set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
