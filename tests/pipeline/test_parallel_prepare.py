"""Parallel preparation: 1 vs 3 processes and a job array's shards write identical token stores."""

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_recipes.base import SourceRecords
from pipeline.config.compose import compose_config
from pipeline.data import token_store as ts
from pipeline.data.build_corpus import prepare_sources
from pipeline.data.tokenizer import TokenizerConfig
from pipeline.data.train_tokenizer import train_tokenizer
from pipeline.prepare import prepare, prepare_options

REPO = Path(__file__).resolve().parents[2]
SMALL = ["progress=false", "data.locales=[de,sw,gv]", "tokenizer.vocab_size=1000", "tokenizer.sample_sentences=5000"]


class LongTail:
    """Five mono sources, 600 down to 3 documents of seeded made-up words, one of them long."""

    name = "long_tail"

    def fingerprint(self):
        return {"recipe": self.name, "version": 1}

    def sources(self):
        rng = random.Random(0)
        letters = "abcdefghijklmnoprstuvwyz"
        for name, n in (("aaa", 600), ("bbb", 250), ("ccc", 90), ("ddd", 17), ("eee", 3)):
            docs = [" ".join("".join(rng.choices(letters, k=rng.randint(1, 8))) for _ in range(rng.randint(1, 80)))
                    for _ in range(n)]
            yield SourceRecords(name, "mono", [{"text": d} for d in docs], name, "Latn")


def store_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file under a stores folder, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.distributed
def test_one_and_three_processes_write_identical_bytes(tmp_path):
    corpus = prepare_sources(LongTail(), tmp_path, progress=False)
    tokenizer = train_tokenizer(corpus, TokenizerConfig(vocab_size=400, sample_sentences=2000), tmp_path)
    root = ts.stores_dir(corpus.path, tokenizer.content_hash)
    digests = {}
    for workers in (1, 3):
        shutil.rmtree(root, ignore_errors=True)
        stores = ts.build_token_stores(corpus, tokenizer.model_file, tokenizer.vocab_size, tokenizer.content_hash,
                                       workers=workers, shard_documents=64, progress=False)
        assert sorted(stores) == corpus.source_names
        digests[workers] = store_bytes(root)
    assert len(ts.plan_units(corpus, 64)) == 10 + 4 + 2 + 1 + 1  # several shards of the large source
    assert len(digests[1]) == 5 * 3 and digests[1] == digests[3]


def test_prepare_builds_stores_only_when_asked(tmp_path):
    cfg = compose_config([*SMALL, f"cache_dir={tmp_path}"])
    assert cfg.prepare.pretokenize is False  # the default path is unchanged
    corpus, tokenizer = prepare(cfg)
    assert corpus.token_stores is None
    assert not list(corpus.path.glob("token_stores-*"))
    counts = corpus.sizes("tokens")
    cfg = compose_config([*SMALL, f"cache_dir={tmp_path}", "prepare.pretokenize=true"])
    corpus, tokenizer = prepare(cfg)
    assert sorted(corpus.token_stores) == corpus.source_names
    assert {n: s.total_tokens for n, s in corpus.token_stores.items()} == counts
    assert list(corpus.path.glob(f"token_stores-{tokenizer.content_hash[:16]}"))


def test_prepare_options_are_checked():
    assert prepare_options(OmegaConf.create({}))["workers"] == 1
    for bad, match in (({"workers": 0}, "prepare.workers"), ({"shard_documents": -1}, "prepare.shard_documents"),
                       ({"pretokenize": True, "shard": 1}, "go together"),
                       ({"shard": 0, "num_shards": 2}, "pretokenize=true"), ({"worker": 2}, "unknown key")):
        with pytest.raises(ValueError, match=match):
            prepare_options(OmegaConf.create({"prepare": bad}))


def test_bad_shard_index_is_refused(tmp_path):
    corpus = prepare_sources(LongTail(), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"prepare.shard must be an int in \[0, 2\)"):
        ts.build_token_stores(corpus, "unused.model", 200, "e" * 64, shard=2, num_shards=2, progress=False)


@pytest.mark.distributed
def test_job_array_shards_as_separate_processes_then_publish(tmp_path):
    """What a SLURM job array does, on one machine: prepare once, run each shard as its own
    process against the shared cache, then a plain run publishes the stores."""
    cache = tmp_path / "cache"
    base = [*SMALL, f"cache_dir={cache}", "prepare.pretokenize=true", "prepare.shard_documents=500"]
    corpus, tokenizer = prepare(compose_config([*SMALL, f"cache_dir={cache}"]))  # step 1: sources + tokenizer
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.prepare", *base, f"prepare.shard={i}",
                               "prepare.num_shards=2", f"hydra.run.dir={tmp_path / f'run{i}'}"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, output[-3000:]
        assert f"pre-tokenize shard {i} of 2" in output, output[-3000:]
    parts = ts.parts_dir(corpus.path, tokenizer.content_hash)
    units = ts.plan_units(corpus, 500)
    assert all(ts.unit_done(parts, u, ts.text_columns(corpus.kind(u.source))) for u in units)
    root = ts.stores_dir(corpus.path, tokenizer.content_hash)
    assert not root.exists()  # nothing published by the shards

    def refuse(*args, **kwargs):
        raise AssertionError("the publish step re-encoded a shard")

    original = ts.encode_unit
    ts.encode_unit = refuse
    try:
        published, _ = prepare(compose_config(base))  # step 3: publish (and count tokens)
    finally:
        ts.encode_unit = original
    assert not parts.exists()
    sharded = store_bytes(root)
    shutil.rmtree(root)
    in_process, _ = prepare(compose_config(base))
    assert store_bytes(root) == sharded
    assert published.sizes("tokens") == in_process.sizes("tokens")


def test_the_prepare_entry_imports_no_torch_or_lightning():
    """`prepare.workers` spawns processes that import the entry module again: with torch and
    Lightning behind it, each worker paid ~12 CPU-s of imports before encoding anything."""
    probe = ("import sys, pipeline.prepare; heavy = sorted({'torch', 'lightning', 'datasets'} & set(sys.modules)); "
             "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"pipeline.prepare imports {result.stdout.strip()}\n{result.stderr[-2000:]}"
