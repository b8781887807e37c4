"""chrF users can trust: sacrebleu's corpus chrF (0-100, not chrF++), gathered across ranks,
one value per parallel source in results.json, the final table and the sweep table."""

import json
import math
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from sacrebleu.metrics import CHRF

from pipeline.evaluation.metrics import corpus_chrf, gather_objects
from pipeline.evaluation.sweeps import collect
from pipeline.train import train
from pipeline.training.results import format_results_table

# Hypotheses with an empty one, a zero-overlap one and partial matches.
HYPOTHESES = ["", "xyz qqq", "the cat sat", "Der Hund bellt laut"]
REFERENCES = ["hello world", "abc", "the cat sat on the mat", "Der Hund bellt"]


def test_corpus_chrf_is_sacrebleus_chrf_keeping_empty_and_zero_overlap_sentences():
    expected = CHRF(char_order=6, word_order=0, beta=2).corpus_score(HYPOTHESES, [REFERENCES]).score
    assert corpus_chrf(HYPOTHESES, REFERENCES) == pytest.approx(expected, abs=1e-9)
    assert corpus_chrf(HYPOTHESES, REFERENCES) == pytest.approx(CHRF().corpus_score(HYPOTHESES, [REFERENCES]).score)
    # Zero-overlap sentences count: dropping them (as torchmetrics 1.9 does) scores higher.
    kept = [(h, r) for h, r in zip(HYPOTHESES, REFERENCES, strict=True) if h in ("the cat sat", "Der Hund bellt laut")]
    assert corpus_chrf([h for h, _ in kept], [r for _, r in kept]) > corpus_chrf(HYPOTHESES, REFERENCES) + 1
    # 0-100 scale, chrF not chrF++ (word_order 0 differs from chrF++'s 2 on these strings).
    assert corpus_chrf(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    chrf_pp = CHRF(word_order=2).corpus_score(HYPOTHESES, [REFERENCES]).score
    assert corpus_chrf(HYPOTHESES, REFERENCES) != pytest.approx(chrf_pp)
    assert corpus_chrf([""], ["abc"]) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        corpus_chrf(["a", "b"], ["a"])


def _gather_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Uneven shares, rank 1 with the empty hypothesis; rank order of the gather is kept.
        mine = [(i, HYPOTHESES[i], REFERENCES[i]) for i in ((0,) if rank == 0 else (1, 2, 3))]
        rows = gather_objects(mine)
        score = corpus_chrf([h for _, h, _ in rows], [r for _, _, r in rows])
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"rows": rows, "chrf": score}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_gather_every_row_and_score_like_one_process(tmp_path):
    mp.start_processes(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    single = corpus_chrf(HYPOTHESES, REFERENCES)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [row[0] for row in result["rows"]] == [0, 1, 2, 3]
        assert result["chrf"] == pytest.approx(single, abs=1e-9)


def test_gather_objects_without_a_process_group_returns_the_items():
    assert gather_objects([1, 2]) == [1, 2]


def _record(sources):
    return {"status": "completed", "global_steps": 3, "num_parameters": 10, "wall_time_s": 1.0,
            "config_digest": "abc", "metrics": {}, "sources": sources}


def _source(kind, chrf):
    return {"kind": kind, "documents_train": 5, "samples_seen": 4.0, "tokens_seen": 40.0, "epochs": 0.8,
            "val_loss": 2.0, "val_ppl": 7.4, "val_chrf": chrf}


def test_table_has_a_chrf_column_with_parallel_sources():
    table = format_results_table(_record({"deu-eng": _source("parallel", 12.34), "eng": _source("mono", math.nan)}))
    header, deu, eng = table.splitlines()[1:4]
    assert header.split()[-1] == "chrF"
    assert deu.split()[-1] == "12.3" and eng.split()[-1] == "-"
    # A parallel source that got no score still shows the column (its '-' is the news).
    table = format_results_table(_record({"deu-eng": _source("parallel", math.nan)}))
    assert table.splitlines()[1].split()[-1] == "chrF" and table.splitlines()[2].split()[-1] == "-"
    mono_only = format_results_table(_record({"eng": _source("mono", math.nan)}))
    assert "chrF" not in mono_only


def test_tiny_translation_run_scores_every_parallel_source(compose_config, demo_data, tmp_path):
    """The embedded corpus's <xxx>-eng sources: results.json, the final table and the sweep
    table all carry a finite chrF per parallel source (per-target-language keys would not)."""
    run_dir = tmp_path / "run"
    overrides = ["experiment=demo", "sources.kinds=[parallel]", "run.total_steps=2", "run.global_batch_size=8",
                 "loader.micro_batch_size=8", "logger=none", "trainer.enable_progress_bar=false", "progress=false",
                 "validation.documents_per_source=2", "model.translation_eval.examples_per_source=2",
                 "model.translation_eval.max_new_tokens=4",
                 f"cache_dir={demo_data[0].cache_dir}", f"output_dir={run_dir}"]
    record = train(compose_config(overrides))
    saved = json.loads((run_dir / "results.json").read_text())
    parallel = {name: s for name, s in saved["sources"].items() if s["kind"] == "parallel"}
    assert len(parallel) == len(saved["sources"]) == 36  # every <xxx>-eng source of the embedded corpus
    for name, s in parallel.items():
        assert math.isfinite(s["val_chrf"]) and 0.0 <= s["val_chrf"] <= 100.0, name
        assert saved["metrics"][f"val/chrf/lang={name}"] == s["val_chrf"]
        # both directions decoded (example 0: xxx -> eng, example 1: eng -> xxx)
        src, tgt = name.split("-")
        assert f"val/chrf/lang={name}/to={tgt}" in saved["metrics"]
        assert f"val/chrf/lang={name}/to={src}" in saved["metrics"]
    table = format_results_table(record).splitlines()
    assert table[1].split()[-1] == "chrF"
    for line in table[2:2 + len(parallel)]:
        assert math.isfinite(float(line.split()[-1]))
    frame = collect(tmp_path)
    assert frame["source_val_chrf"].notna().all() and len(frame) == 36


def _train_subprocess(tmp_path: Path, cache: str, name: str, strategy: str, devices: int) -> dict:
    import os
    import subprocess
    import sys

    out = tmp_path / name
    command = [sys.executable, "-m", "pipeline.train", "experiment=demo", "sources.kinds=[parallel]",
               "sources.include=[deu-eng,fra-eng,jpn-eng,swh-eng,glv-eng]", "run.total_steps=2",
               "run.global_batch_size=8", "loader.micro_batch_size=2", "logger=none",
               "trainer.enable_progress_bar=false", "progress=false", "validation.documents_per_source=3",
               "model.translation_eval.examples_per_source=3", "model.translation_eval.max_new_tokens=4",
               f"cache_dir={cache}", f"output_dir={out}", f"hydra.run.dir={out / 'hydra'}",
               f"trainer.devices={devices}", f"strategy={strategy}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def single_translation_run(demo_data, tmp_path_factory) -> dict:
    return _train_subprocess(tmp_path_factory.mktemp("single"), demo_data[0].cache_dir, "single", "single", 1)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("deepspeed_zero3", marks=pytest.mark.slow)])
def test_two_process_runs_score_every_row_like_one_process(strategy, single_translation_run, demo_data, tmp_path):
    """Each rank decodes its share of the held-out rows (5 sources x 3 rows, padded to 8 per
    rank); the gathered corpus chrF per source equals the one-process run's."""
    single = single_translation_run
    pair = _train_subprocess(tmp_path, demo_data[0].cache_dir, strategy, strategy, 2)
    assert pair["world_size"] == 2
    for name, s in single["sources"].items():
        assert math.isfinite(s["val_chrf"]) and math.isfinite(pair["sources"][name]["val_chrf"]), name
        assert pair["sources"][name]["val_chrf"] == pytest.approx(s["val_chrf"], abs=1e-6), name
