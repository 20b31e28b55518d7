"""`medtune prepare A B C --weights …`: several sources in one prepared set, each read with its own format, mixed by
weight with the seed (without replacement), no question on two sides of the split, each source's share, sha256 and
counts in the manifest; bad weights refused with nothing written."""

from __future__ import annotations

import json

import pytest

from medtune.core.errors import BadInput
from medtune.data.prepare import prepare

from conftest import SAMPLE, run_cli

SOURCES = [str(SAMPLE), str(SAMPLE.parent / "cmedqa2"), str(SAMPLE.parent / "alpaca_sample.json")]
COMMON = dict(max_seq_length=4096, token_stats=False)


def _prompts(folder, split):
    rows = [json.loads(x) for x in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r.get("prompt") or json.dumps(r.get("messages", [])[:-1], ensure_ascii=False) for r in rows]


def test_three_sources_mixed_by_weight_reproducibly(tmp_path, smollm2_dir):
    args = ("prepare", *SOURCES, "--model", smollm2_dir, "--weights", "0.5,0.3,0.2", "--sample", 60, "--json")
    first = run_cli(*args, "--out", tmp_path / "a", "--max-seq-length", 4096)
    assert first.returncode == 0, first.stderr[-2000:]
    res = json.loads(first.stdout)
    used = [s["used"] for s in res["sources"]]
    assert used == [30, 18, 12] and [s["format"] for s in res["sources"]] == ["medical-o1", "cmedqa2", "alpaca"]
    assert res["counts"]["kept"] == 60 and res["format"] == "medical-o1+cmedqa2+alpaca"
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text(encoding="utf-8"))
    src = manifest["inputs"]["sources"]
    assert [s["share"] for s in src] == [0.5, 0.3, 0.2] and all(len(h) == 64 for s in src for h in s["sha256"].values())
    assert manifest["inputs"]["dataset"] == SOURCES and manifest["options"]["weights"] == "0.5,0.3,0.2"
    again = run_cli(*args, "--out", tmp_path / "b", "--max-seq-length", 4096)  # the same seed: the same files
    assert again.returncode == 0
    for split in ("train", "valid"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    other = prepare(SOURCES, str(smollm2_dir), tmp_path / "c", weights="0.5,0.3,0.2", sample=60, seed=7, **COMMON)
    assert [s["used"] for s in other.sources] == used
    assert sorted(_prompts(tmp_path / "c", "train")) != sorted(_prompts(tmp_path / "a", "train"))  # another draw
    assert not set(_prompts(tmp_path / "a", "train")) & set(_prompts(tmp_path / "a", "valid"))


def test_without_sample_the_weights_take_as_many_as_they_allow(tmp_path, smollm2_dir):
    """0.6/0.3/0.1 of the largest total no source runs out of: the medical-o1 source decides (66 / 0.6 = 110); a
    record an earlier source holds is a duplicate; without weights every example of each source is kept."""
    res = prepare(SOURCES, str(smollm2_dir), tmp_path / "w", weights=[0.6, 0.3, 0.1], **COMMON)
    assert [s["used"] for s in res.sources] == [66, 33, 11] and res.counts["dropped"].get("duplicate", 0) > 0
    every = prepare(SOURCES[:2], str(smollm2_dir), tmp_path / "all", **COMMON)
    assert [s["used"] for s in every.sources] == [s["available"] for s in every.sources] == [66, 35]
    alpaca = {"path": str(SAMPLE.parent / "alpaca_sample.json"), "format": "alpaca", "weight": 1}
    mapped = prepare([{"path": str(SAMPLE), "weight": 2}, alpaca], str(smollm2_dir), tmp_path / "m", **COMMON)
    assert [(s["format"], s["used"]) for s in mapped.sources] == [("medical-o1", 66), ("alpaca", 33)]


@pytest.mark.parametrize(
    "extra, said",
    [
        (("--weights", "0.6,0.4"), "--weights has 2 value(s) for 3 sources"),
        (("--weights", "0.6,x,0.1"), "not numbers"),
        (("--weights", "0.6,0.3,0.1", "--sample", 500), "has 66 usable examples; a weight of 0.6 of 500 needs 300"),
    ],
)
def test_bad_weights_are_refused_and_nothing_is_written(tmp_path, smollm2_dir, extra, said):
    r = run_cli("prepare", *SOURCES, "--model", smollm2_dir, "--out", tmp_path / "x", *extra)
    assert r.returncode == 2 and said in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "x").exists()


def test_sft_and_preference_sources_do_not_mix(tmp_path, smollm2_dir):
    with pytest.raises(BadInput, match="holds preference data"):
        prepare([str(SAMPLE), str(SAMPLE.parent / "preference_sample.jsonl")], str(smollm2_dir), tmp_path / "p")
    with pytest.raises(BadInput, match="--weights is for several DATASETs"):
        prepare(str(SAMPLE), str(smollm2_dir), tmp_path / "p", weights="1")
    assert not (tmp_path / "p").exists()


def test_a_run_config_lists_its_sources_and_each_one_is_fingerprinted(tmp_path, smollm2_dir):
    import shutil

    from medtune.pipeline import Run, load_config, run_pipeline

    mine = tmp_path / "mine.jsonl"
    shutil.copy(SAMPLE, mine)
    cfg = {
        "name": "mix",
        "model": str(smollm2_dir),
        "runs_dir": str(tmp_path / "runs"),
        "prepare": {"dataset": [{"path": str(mine), "weight": 0.7}, {"path": SOURCES[1], "weight": 0.3}], **COMMON},
    }
    assert run_pipeline(cfg, only="prepare")["stages"] == {"prepare": "done"}
    manifest = json.loads((tmp_path / "runs" / "mix" / "data" / "manifest.json").read_text(encoding="utf-8"))
    assert [s["used"] for s in manifest["inputs"]["sources"]] == [66, 28]

    def dataset_inputs():
        return Run(load_config(cfg)).inputs("prepare")[0]["dataset"]

    before = dataset_inputs()
    assert len(before) == 2
    mine.write_text(mine.read_text(encoding="utf-8").replace("adrenaline", "epinephrine"), encoding="utf-8")
    after = dataset_inputs()
    assert after[0] != before[0] and after[1] == before[1]  # the edited source, and only it, changes the fingerprint
