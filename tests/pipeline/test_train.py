"""The training entry end to end on CPU (single process): experiments, results, loss weights."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.text_rows import IGNORE_INDEX
from pipeline.train import train

REPO = Path(__file__).resolve().parents[2]
TATOEBA = REPO.parent / "shared" / "data" / "tatoeba"
# Language-model experiments; the image-text ones have tests/pipeline/test_multimodal_training.py.
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if "multimodal" not in p.stem)
FAST = ["run.total_steps=3", "run.global_batch_size=8", "loader.micro_batch_size=4", "logger=csv",
        "trainer.enable_progress_bar=false", "progress=false", "model=lm_tiny",
        "model.translation_eval.max_new_tokens=4", "validation.documents_per_source=2"]
# Tatoeba runs use a handful of languages (including the smallest) and a small tokenizer.
TATOEBA_FAST = ["data.languages=[eng,deu,swh,kab,ber,fao]", "tokenizer.vocab_size=1000",
                "tokenizer.sample_sentences=3000"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_trains_a_few_steps(experiment, compose_config, demo_data, tmp_path):
    overrides = [f"experiment={experiment}", *FAST, f"output_dir={tmp_path}"]
    if experiment.startswith("tatoeba"):
        if not TATOEBA.is_dir():
            pytest.skip(f"{TATOEBA} is absent (real Tatoeba data lives beside the project in CI)")
        overrides += [*TATOEBA_FAST, f"cache_dir={tmp_path / 'cache'}"]
        if experiment == "tatoeba_translation":
            overrides[overrides.index("data.languages=[eng,deu,swh,kab,ber,fao]")] = "data.languages=[deu,swh,kab,fao]"
    else:
        overrides.append(f"cache_dir={demo_data[0].cache_dir}")
    record = train(compose_config(overrides))
    assert record["status"] == "completed" and record["global_steps"] == 3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config_digest"] == record["config_digest"]
    assert json.loads((tmp_path / "checkpoints" / "last.json").read_text())["checkpoint"] == "step000003.ckpt"
    losses = [s["val_loss"] for s in saved["sources"].values()]
    assert all(0 < loss < 20 for loss in losses)
    if experiment == "tatoeba_translation":
        assert any(key.startswith("val/chrf/lang=") for key in saved["metrics"])


def test_results_account_for_every_token(compose_config, demo_data, tmp_path):
    record = train(compose_config(["experiment=demo", *FAST, f"output_dir={tmp_path}",
                                   f"cache_dir={demo_data[0].cache_dir}", "run.total_steps=4"]))
    sources = record["sources"]
    assert sum(s["samples_seen"] for s in sources.values()) == 4 * 8
    assert sum(s["tokens_seen"] for s in sources.values()) == record["tokens_seen_total"] > 0
    assert record["num_parameters"] > 0 and record["world_size"] == 1
    # The sampler's draws (epochs x documents) and the model's counted rows agree per source.
    for s in sources.values():
        assert s["samples_seen"] == pytest.approx(s["epochs"] * s["documents_train"], abs=1e-6)
    mixture_table = (tmp_path / "csv" / "version_0" / "mixture.csv").read_text().splitlines()
    assert mixture_table[0].startswith("source,") and len(mixture_table) == 1 + len(sources)


def test_a_single_source_trains_logs_and_resumes(compose_config, demo_data, tmp_path):
    """One source: torchmetrics squeezes (1,) results to 0-d; logging, checkpoints, resume and
    results must still see one per-source entry."""
    run = ["experiment=demo", *FAST, f"output_dir={tmp_path}", f"cache_dir={demo_data[0].cache_dir}",
           "sources.include=[eng]", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2",
           "run.total_steps=4"]
    first = train(compose_config([*run, "+trainer.max_steps=2"]))
    assert first["global_steps"] == 2
    record = train(compose_config([*run, "ckpt_path=last"]))
    assert record["status"] == "completed" and record["global_steps"] == 4
    assert list(record["sources"]) == ["eng"]
    assert record["sources"]["eng"]["samples_seen"] == 4 * 8  # counts continue across the resume
    assert 0 < record["sources"]["eng"]["val_loss"] < 20


def test_wandb_logger_runs_offline(compose_config, demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(compose_config(["experiment=demo", *FAST, "logger=wandb", f"output_dir={tmp_path}",
                          f"cache_dir={demo_data[0].cache_dir}", "run.total_steps=2"]))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def _loss_pieces(module, batch):
    hidden = module._hidden(batch).flatten(0, 1)
    labels = batch["labels"].flatten()
    return hidden, labels


def test_upweighting_scales_each_sources_gradient_by_its_plan_weight(demo_data, compose_config, tmp_path):
    """Weighted objective == sum_s w_s * (unweighted CE sum of source s) / N, gradients too."""
    from hydra.utils import instantiate

    from pipeline.config.data import datamodule_from_config

    cfg = compose_config(["experiment=demo", *FAST, "mixture=upweight", f"cache_dir={demo_data[0].cache_dir}"])
    _, corpus, tokenizer = demo_data
    datamodule = datamodule_from_config(cfg, corpus, tokenizer)
    batch = next(iter(datamodule.train_dataloader()))
    plan = datamodule.sampler.plan_at(0)
    assert len(set(plan.loss_weights.round(6))) > 1  # upweighting really weights sources
    module = instantiate(cfg.model, vocab_size=tokenizer.vocab_size, sources=datamodule.sources,
                         total_steps=3, loss={"impl": "torch"}, _convert_="all")
    hidden, labels = _loss_pieces(module, batch)
    weight = module.model.lm_head_weight
    weighted = module.loss_head(hidden, weight, labels, batch["token_weights"].flatten())
    per_token = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    token_sources = batch["token_source_ids"].flatten()
    expected = sum(plan.loss_weights[s] * per_token[token_sources == s].sum() for s in token_sources.unique().tolist()
                   if s >= 0)
    torch.testing.assert_close(weighted, expected.float(), rtol=1e-5, atol=1e-5)
    grad_weighted = torch.autograd.grad(weighted, weight, retain_graph=True)[0]
    grad_expected = torch.autograd.grad(expected, weight)[0]
    torch.testing.assert_close(grad_weighted, grad_expected.float(), rtol=1e-4, atol=1e-6)


def test_unit_weights_give_plain_cross_entropy(demo_data, compose_config):
    from hydra.utils import instantiate

    from pipeline.config.data import datamodule_from_config

    cfg = compose_config(["experiment=demo", *FAST, "mixture=proportional", f"cache_dir={demo_data[0].cache_dir}"])
    _, corpus, tokenizer = demo_data
    datamodule = datamodule_from_config(cfg, corpus, tokenizer)
    batch = next(iter(datamodule.train_dataloader()))
    module = instantiate(cfg.model, vocab_size=tokenizer.vocab_size, sources=datamodule.sources,
                         total_steps=3, loss={"impl": "torch"}, _convert_="all")
    hidden, labels = _loss_pieces(module, batch)
    weight = module.model.lm_head_weight
    objective = module.loss_head(hidden, weight, labels, batch["token_weights"].flatten()) / batch["num_target_tokens"]
    plain = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(objective, plain, rtol=1e-5, atol=1e-6)
