"""COCO's captions from where COCO keeps them: its annotations archive on its site (a local HTTP server stands for
it), read by range requests where the server answers them (only the two caption members' bytes), whole once where it
does not, cached and re-validated; a local archive or folder in its place; one clear error when none will do."""

import json
import shutil
import socket
import zipfile

import pytest

from brainldm.data import coco
from brainldm.data.coco import CocoCaptions
from brainldm.data.storage import Storage
from brainldm.offline.site import FolderSite
from brainldm.offline.synthetic import COCO_PATH
from brainldm.validation import InputError


@pytest.fixture(scope="module")
def world(nsd_tree):
    """The session's synthetic world: its COCO archive, the cocoIds its pictures have, their captions as written."""
    import pandas as pd

    info = pd.read_csv(nsd_tree.root / "nsddata/experiments/nsd/nsd_stim_info_merged.csv")
    ids = info["cocoId"].to_numpy()
    written = {int(ids[i]): [c.strip() for c in caps] for i, caps in nsd_tree.captions.items()}
    return nsd_tree, written


def _caption_spans(archive) -> list[tuple[int, int]]:
    """Byte spans of the caption members' data (local header to the end of the compressed bytes)."""
    with zipfile.ZipFile(archive) as z:
        infos = sorted(z.infolist(), key=lambda i: i.header_offset)
        ends = [i.header_offset for i in infos[1:]] + [archive.stat().st_size]
        return [(i.header_offset, end) for i, end in zip(infos, ends) if "captions_" in i.filename]


def test_captions_by_range_requests_fetch_only_the_caption_members_and_a_rerun_nothing(world, tmp_path):
    tree, written = world
    archive = tree.coco_archive
    with FolderSite(tree.coco_root) as site:
        url = f"{site.url}/{COCO_PATH}"
        captions = CocoCaptions(url, cache_dir=tmp_path)
        assert captions.read(written) == written
        with zipfile.ZipFile(archive) as z:
            members = sum(i.compress_size for i in z.infolist() if "captions_" in i.filename)
        assert members <= site.fetched() == captions.bytes_fetched < members + coco.TAIL + 4 * coco.BLOCK
        assert site.fetched() < 0.5 * archive.stat().st_size  # the instances members stay on the server
        tail = archive.stat().st_size - coco.TAIL
        spans = _caption_spans(archive)
        for start, end in site.ranges_asked[COCO_PATH]:  # every range: the archive's end, or inside a caption member
            assert start >= tail or any(a <= start and end <= b + coco.BLOCK for a, b in spans), (start, end)

        site.reset()
        again = CocoCaptions(url, cache_dir=tmp_path)
        assert again.read(written) == written
        assert site.fetched() == 0 and again.bytes_fetched == 0  # one HEAD: the cache is still the server's


def test_a_server_without_ranges_gives_the_whole_archive_once(world, tmp_path):
    tree, written = world
    with FolderSite(tree.coco_root, ranges=False) as site:
        url = f"{site.url}/{COCO_PATH}"
        assert CocoCaptions(url, cache_dir=tmp_path).read(written) == written
        assert site.fetched() == tree.coco_archive.stat().st_size and site.requests[COCO_PATH] == 1
        assert not list(tmp_path.rglob("*.zip"))  # only the captions are kept
        site.reset()
        assert CocoCaptions(url, cache_dir=tmp_path).read(written) == written
        assert site.fetched() == 0


def test_a_changed_archive_is_fetched_again(world, tmp_path):
    tree, written = world
    site_root = tmp_path / "site"
    shutil.copytree(tree.coco_root, site_root)
    with FolderSite(site_root) as site:
        url = f"{site.url}/{COCO_PATH}"
        CocoCaptions(url, cache_dir=tmp_path / "cache").read(written)
        with zipfile.ZipFile(site_root / COCO_PATH, "a") as z:  # a new archive at the same URL
            z.writestr("annotations/README.txt", "updated")
        site.reset()
        again = CocoCaptions(url, cache_dir=tmp_path / "cache")
        assert again.read(written) == written
        assert site.fetched() > 0 and any("not what the cached captions came from" in n for n in again.notes)


def test_a_local_archive_or_folder_serves_as_well(world, tmp_path):
    tree, written = world
    assert CocoCaptions(tree.coco_archive).read(written) == written
    with zipfile.ZipFile(tree.coco_archive) as z:
        z.extractall(tmp_path)  # as COCO's archive unpacks: annotations/captions_*.json
    assert CocoCaptions(tmp_path).read(written) == written
    assert CocoCaptions(tmp_path / "annotations").read(written) == written


def test_a_local_nsd_root_with_the_captions_where_nsd_access_puts_them_needs_no_flag(world, tmp_path):
    tree, written = world
    (tmp_path / "nsd").mkdir()
    assert CocoCaptions.for_nsd(Storage(tmp_path / "nsd")).source == coco.COCO_ANNOTATIONS_URL
    with zipfile.ZipFile(tree.coco_archive) as z:  # nsd_access unpacks the archive in nsddata_stimuli/stimuli/nsd
        z.extractall(tmp_path / "nsd" / coco.NSD_ANNOTATIONS.rsplit("/", 1)[0])
    found = CocoCaptions.for_nsd(Storage(tmp_path / "nsd"))
    assert found.source == str(tmp_path / "nsd" / coco.NSD_ANNOTATIONS)
    assert found.read(written) == written


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_one_error_naming_the_url_and_the_flag(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/{COCO_PATH}"
    with pytest.raises(InputError, match=rf"could not fetch {url}: .*--coco-annotations") as err:
        CocoCaptions(url, cache_dir=tmp_path).read([1])
    assert "\n" not in str(err.value)


def test_an_archive_without_the_caption_members_is_named(world, tmp_path):
    tree, _ = world
    (tmp_path / "annotations").mkdir()
    stripped = tmp_path / COCO_PATH
    with zipfile.ZipFile(tree.coco_archive) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if "captions_val" not in info.filename:
                dst.writestr(info, src.read(info))
    with FolderSite(tmp_path) as site:
        url = f"{site.url}/{COCO_PATH}"
        with pytest.raises(InputError, match=rf"{url} holds no annotations/captions_val2017.json.*--coco-annotations"):
            CocoCaptions(url, cache_dir=tmp_path / "cache").read([1])
    with pytest.raises(InputError, match="holds no annotations/captions_val2017.json"):
        CocoCaptions(stripped).read([1])


def test_a_picture_without_captions_is_named(world, tmp_path):
    tree, written = world
    with pytest.raises(InputError, match="no COCO captions for cocoId 7 "):
        CocoCaptions(tree.coco_archive).read([*written, 7])
    (tmp_path / "captions_train2017.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(InputError, match="holds no captions_val2017.json"):
        CocoCaptions(tmp_path)


def test_cocos_own_url_is_the_default_and_honours_a_proxy(world, tmp_path, monkeypatch):
    """COCO's URL as written, reached through an HTTP proxy (here the stand-in site answers as one): how the
    rehearsal runs prepare_nsd.py exactly as the README writes it."""
    tree, written = world
    assert CocoCaptions.for_nsd(Storage(tree.root)).source == coco.COCO_ANNOTATIONS_URL  # the tree holds no captions
    with FolderSite(tree.coco_root) as site:
        monkeypatch.setenv("http_proxy", site.url)
        monkeypatch.setenv("no_proxy", "")
        captions = CocoCaptions.for_nsd(Storage(tree.root), cache_dir=tmp_path)
        assert captions.read(written) == written
        assert captions.bytes_fetched == site.fetched() > 0
