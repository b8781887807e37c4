"""The prepare entry: compose the shipped config, run it in-process and as a CLI."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipeline.data.corpus import PreparedCorpus
from pipeline.prepare import format_table, prepare

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
TATOEBA = REPO / ".." / "shared" / "data" / "tatoeba"


def _absent_group_overrides() -> list[str]:
    """Drop default groups whose files are not there yet (prepare reads only data/tokenizer)."""
    out = []
    for entry in OmegaConf.load(CONF / "config.yaml").defaults:
        if not isinstance(entry, dict) and not OmegaConf.is_dict(entry):
            continue
        for group, choice in entry.items():
            if group.startswith("optional ") or group in ("data", "tokenizer") or choice is None:
                continue
            if not (CONF / group / f"{choice}.yaml").is_file():
                out.append(f"~{group}")
    return out


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*_absent_group_overrides(), *overrides])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mixpipe-cache")


def test_default_config_composes():
    cfg = _compose([])
    assert cfg.data._target_ == "data_recipes.embedded_cldr.EmbeddedCLDR"
    assert cfg.tokenizer._target_ == "pipeline.data.tokenizer.TokenizerConfig"
    assert cfg.cache_dir == ".cache/mixpipe"


def test_prepare_embedded_default(cache, caplog):
    cfg = _compose([f"cache_dir={cache}"])
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        corpus, tok = prepare(cfg, progress=False)
    assert corpus.path.parent == cache / "prepared"
    assert len(corpus.languages()) >= 20
    tokens = corpus.sizes("tokens")
    assert sorted(tokens) == corpus.source_names and all(v > 0 for v in tokens.values())
    assert tok.lang_tag_id("deu") > 3
    table = caplog.text
    assert "tok/char" in table and "deu-eng" in table and "TOTAL" in table
    # The counts persist: a fresh load sees them without recounting.
    assert PreparedCorpus.load(corpus.path).sizes("tokens") == tokens
    assert "parallel" in format_table(corpus)


def test_cli_subprocess(cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.prepare",
        f"cache_dir={cache}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *_absent_group_overrides(),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOTAL" in proc.stdout + proc.stderr
    assert any((cache / "prepared").glob("embedded_cldr-*/manifest.json"))


def test_missing_required_field_is_a_clear_error(tmp_path):
    cfg = _compose(["data=hf_generic", f"cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="path"):
        prepare(cfg, progress=False)


def test_tatoeba_mono_subset(tmp_path, monkeypatch):
    if not (TATOEBA / "mono").is_dir():
        pytest.skip(f"Tatoeba data not found at {TATOEBA} (shared data folder absent)")
    monkeypatch.chdir(REPO)  # the config path is ../shared relative to the repo root
    monkeypatch.delenv("MIXPIPE_SHARED", raising=False)
    cfg = _compose(
        [
            f"cache_dir={tmp_path}",
            "data=tatoeba_mono",
            "data.languages=[eng,deu,amh,tzl]",
            "data.max_documents_per_source=300",
            "tokenizer.vocab_size=800",
            "tokenizer.sample_sentences=3000",
        ]
    )
    corpus, tok = prepare(cfg, progress=False)
    assert corpus.source_names == ["amh", "deu", "eng", "tzl"]
    assert corpus.sizes("documents")["eng"] == 300
    assert corpus.source_info("amh")["script"] == "Ethi"
    assert tok.lang_tag_id("tzl") > 3
