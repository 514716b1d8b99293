"""NSD's bucket as public sources list it (``tests/data/nsd_listing.json``): the keys brainldm reads for a subject."""

import json
import re
from pathlib import Path

LISTING = Path(__file__).parent / "data" / "nsd_listing.json"


def listed_keys() -> set[str]:
    """Every subj01 key the listing holds, its patterns expanded."""
    keys = set()
    for entry in json.loads(LISTING.read_text())["keys"]:
        if "key" in entry:
            keys.add(entry["key"])
        elif "sessions" in entry:
            first, last = entry["sessions"]
            keys |= {entry["pattern"].format(session=s) for s in range(first, last + 1)}
        elif "surfaces" in entry:
            keys |= {entry["pattern"].format(hemi=h, surface=s) for h in ("lh", "rh") for s in entry["surfaces"]}
        elif "volumes" in entry:
            keys |= {entry["pattern"].format(volume=v) for v in entry["volumes"]}
        else:
            keys |= {entry["pattern"].format(hemi=h) for h in ("lh", "rh")}
    return keys


def not_in_bucket() -> set[str]:
    return {entry["key"] for entry in json.loads(LISTING.read_text())["not_in_bucket"]}


def as_subj01(key: str) -> str:
    """A key of any subject as subj01's (the listing holds one subject's keys; the others' differ by number)."""
    return re.sub(r"subj0[1-8]", "subj01", key)
