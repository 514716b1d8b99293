"""Shared fixtures: the offline world (a synthetic NSD tree and tiny_ldm), built once per test session."""

import os

# Tests never reach the Hub: set before huggingface_hub is imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    from brainldm.ldm import tiny_ldm

    return tiny_ldm()


@pytest.fixture(scope="session")
def nsd_tree(tmp_path_factory, tiny):
    """Two subjects, 3 sessions x 30 trials, 6 shared images, with HDF5 betas twins."""
    from brainldm.synthetic import write_nsd_tree

    root = tmp_path_factory.mktemp("nsd")
    return write_nsd_tree(root, subjects=(1, 2), write_hdf5=True, ldm=tiny, seed=0)
