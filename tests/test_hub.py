"""Publishing over HTTP: maps and trials pushed to and pulled from a local Hub-compatible server with
huggingface_hub's real client (``HF_ENDPOINT``), in a fresh process that is online to that server only."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import DatasetCard, ModelCard

from brainldm.decoding.maps import SubjectMaps

TOKEN = "hf_local_test_token"

CLIENT = """
import json, sys, warnings
from dataclasses import replace
from pathlib import Path

from brainldm.data.trials import load_trials, load_voxels, push_to_hub
from brainldm.decoding.maps import SubjectMaps

work, maps_dir, data_dir, token = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
out = {}
maps = SubjectMaps.from_pretrained(maps_dir)
out["first_url"] = maps.push_to_hub("someone/brainldm-subj01", token=token)
half = SubjectMaps(maps.maps, replace(maps.config, storage_dtype="float16"), maps.per_image)
out["second_url"] = half.push_to_hub("someone/brainldm-subj01", token=token)
first_sha = out["first_url"].rsplit("/", 1)[1]
cache = work / "cache"
pulled = SubjectMaps.from_pretrained("someone/brainldm-subj01", revision=first_sha, token=token, cache_dir=cache)
pulled.save_pretrained(work / "pulled")
newest = SubjectMaps.from_pretrained("someone/brainldm-subj01", token=token, cache_dir=work / "cache")
out["newest_dtype"] = newest.config.storage_dtype
cached = SubjectMaps.from_pretrained(
    "someone/brainldm-subj01", revision=first_sha, local_files_only=True, cache_dir=work / "cache"
)
out["cached_dtype"] = cached.config.storage_dtype

out["data_url"] = push_to_hub(data_dir, 1, "someone/nsd-trials", token=token)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    push_to_hub(data_dir, 1, "someone/nsd-trials-public", public=True, token=token)
out["public_warnings"] = [str(w.message) for w in caught]
test = load_trials("someone/nsd-trials", 1, "test", token=token)
out["test_rows"] = len(test)
out["test_ids"] = [int(i) for i in test["nsd_id"]]
out["voxels"] = len(load_voxels("someone/nsd-trials", 1, token=token))
(work / "result.json").write_text(json.dumps(out))
"""


@pytest.fixture(scope="module")
def published(decoding_world, tmp_path_factory):
    work = tmp_path_factory.mktemp("hub")
    decoding_world.maps.save_pretrained(work / "maps")
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_HOME=str(work / "home"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_TOKEN", None)
    with LocalHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        run = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(CLIENT), str(work), str(work / "maps"), str(decoding_world.data),
             TOKEN],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((work / "result.json").read_text())
    return hub, work, result


def test_pushed_maps_come_back_exactly(published, decoding_world):
    _, work, _ = published
    pulled, maps = SubjectMaps.from_pretrained(work / "pulled"), decoding_world.maps
    assert pulled.config == maps.config
    for name in ("z", "c"):
        for part in ("weight", "intercept", "mean", "std", "voxels", "ijk", "best_alphas"):
            assert torch.equal(getattr(pulled[name], part), getattr(maps[name], part)), (name, part)
    for key, values in maps.per_image.items():
        np.testing.assert_array_equal(pulled.per_image[key], values)


def test_push_returns_the_real_commit_url_and_revisions_are_kept(published):
    hub, _, result = published
    commits = hub.repos[("model", "someone/brainldm-subj01")].commits
    assert [result["first_url"], result["second_url"]] == [
        f"{hub.url}/someone/brainldm-subj01/commit/{sha}" for sha, _ in commits
    ]
    # the newest revision by default, an older one by its commit, and the cached one with local_files_only
    assert (result["newest_dtype"], result["cached_dtype"]) == ("float16", "float32")


def test_the_token_is_sent_with_every_request(published):
    hub, _, _ = published
    assert hub.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)


def test_nothing_pushed_holds_a_local_path_and_the_card_parses(published, decoding_world):
    hub, _, _ = published
    local = str(decoding_world.root).encode()
    for kind_repo, repo in hub.repos.items():
        for path, content in repo.commits[-1][1].items():
            assert local not in content and b"/tmp/" not in content, (kind_repo, path)
    files = hub.repos[("model", "someone/brainldm-subj01")].commits[-1][1]
    assert sorted(files) == ["README.md", "config.json", "maps.safetensors"]
    card = ModelCard(files["README.md"].decode())
    assert card.data.license_name == "nsd-terms-and-conditions" and card.data.eval_results
    assert 'SubjectMaps.from_pretrained("someone/brainldm-subj01")' in card.text


def test_the_trials_dataset_downloads_only_the_requested_split(published, decoding_world):
    hub, _, result = published
    fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
    assert any("/subj01/test-" in path for path in fetched)
    assert not any("/subj01/train-" in path for path in fetched)  # the train shards stayed on the Hub
    assert result["test_rows"] == 20 and result["voxels"] > 0
    assert result["data_url"].startswith(f"{hub.url}/datasets/someone/nsd-trials/commit/")


def test_the_dataset_card_has_a_default_config_and_the_repo_is_private_by_nsds_terms(published):
    hub, _, _ = published
    repo = hub.repos[("dataset", "someone/nsd-trials")]
    card = DatasetCard(repo.commits[-1][1]["README.md"].decode())
    configs = card.data.to_dict()["configs"]
    assert [c["config_name"] for c in configs if c.get("default")] == ["subj01"]
    assert 'load_trials("someone/nsd-trials"' in card.text
    # NSD's clause 3 forbids passing the betas on: private, and no gate (a gate would only matter if public)
    assert repo.settings["private"] is True and "gated" not in repo.settings
    assert "extra_gated_prompt" not in card.data.to_dict()
    assert "I will not distribute this dataset or its components" in card.text and "private" in card.text


def test_a_public_trials_dataset_is_asked_for_gated_and_warned_of(published):
    hub, _, result = published
    repo = hub.repos[("dataset", "someone/nsd-trials-public")]
    assert repo.settings["private"] is False and repo.settings["gated"] == "auto"
    card = DatasetCard(repo.commits[-1][1]["README.md"].decode())
    assert "NSD Terms" in card.data.to_dict()["extra_gated_prompt"] and "gated" in card.text
    (warning,) = result["public_warnings"]
    assert "clause 3" in warning and "I will not distribute this dataset or its components" in warning
