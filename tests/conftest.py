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


@pytest.fixture(scope="session")
def decoding_world(tmp_path_factory, tiny):
    """A high-SNR subject with enough images to decode from: trials dataset, z/c features and fitted maps."""
    from types import SimpleNamespace

    from brainldm.data import SubjectStimuli, prepare_subject
    from brainldm.features import extract_features, parse_features
    from brainldm.maps import fit_subject_maps
    from brainldm.synthetic import write_nsd_tree

    root = tmp_path_factory.mktemp("decoding")
    tree = write_nsd_tree(
        root / "nsd", subjects=(1, 2), n_sessions=6, trials_per_session=45, n_shared=20, snr=100.0, ldm=tiny, seed=1
    )
    for subject in (1, 2):
        prepare_subject(tree.root, subject, root / "trials", progress=False)
        stimuli = SubjectStimuli(root / "trials", subject)
        extract_features(
            tiny, "tiny", stimuli.nsd_ids, stimuli.__getitem__, parse_features("z,c"), root / "features", progress=False
        )
    maps = fit_subject_maps(root / "trials", root / "features", 1, device="cpu")
    return SimpleNamespace(root=root, tree=tree, data=root / "trials", features=root / "features", maps=maps)
