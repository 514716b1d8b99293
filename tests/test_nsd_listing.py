"""NSD's file names from NSD's listing: every key the NSD reader opens for a subject is one that public sources name
in NSD's bucket, and the synthetic world writes nothing there that NSD's bucket lacks (COCO's captions included)."""

from nsd_listing import as_subj01, listed_keys, not_in_bucket

from brainldm.analysis.surfaces import nsd_freesurfer_files
from brainldm.data import nsd


def reader_keys(subject: int) -> set[str]:
    """What brainldm reads of an NSD subject: the design, stim info, stimuli, ROIs, every session's betas in either
    format, and (import_nsd_subject.py) its FreeSurfer files."""
    keys = {nsd.EXPDESIGN, nsd.STIM_INFO, nsd.STIMULI}
    keys |= {nsd.roi_file(subject, name) for name in ("nsdgeneral", "streams")}
    sessions = range(1, nsd.DESIGN_SESSIONS + 1)
    keys |= {nsd.betas_file(subject, s, suffix) for s in sessions for suffix in (".nii.gz", ".hdf5")}
    return keys | set(nsd_freesurfer_files(subject))


def test_every_key_the_reader_opens_for_subj01_is_in_nsds_listing():
    missing = sorted(reader_keys(1) - listed_keys())
    assert not missing, f"not in NSD's bucket as public sources list it: {missing}"


def test_the_synthetic_tree_writes_nothing_a_real_bucket_lacks(nsd_tree):
    written = {as_subj01(p.relative_to(nsd_tree.root).as_posix()) for p in nsd_tree.root.rglob("*") if p.is_file()}
    assert written, "the tree is empty"
    assert not sorted(written - listed_keys())
    assert not written & not_in_bucket()  # COCO's captions live apart, as COCO ships them
