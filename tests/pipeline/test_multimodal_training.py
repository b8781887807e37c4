"""The contrastive image-text model end to end on CPU: batches, loss, training, M4, DeepSpeed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.compose import compose_config
from pipeline.config.data import image_text_datamodule_from_config
from pipeline.models.contrastive import contrastive_objective, rowwise_losses
from pipeline.prepare import prepare
from pipeline.train import train

REPO = Path(__file__).resolve().parents[2]
# A small corpus and run: the same recipe and experiment as the demo, fewer rows and steps.
SMALL = ["experiment=demo_multimodal", "data.sizes={eng:240,fra:120,deu:60}", "data.reference_size=64",
         "progress=false", "logger=csv", "trainer.enable_progress_bar=false",
         "run.global_batch_size=16", "loader.micro_batch_size=16", "validation.documents_per_source=8",
         "model.image_tower.n_layers=1", "model.text_tower.n_layers=1"]


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "multimodal_cache"
    cfg = compose_config([*SMALL, f"cache_dir={cache}"])
    corpus, tokenizer = prepare(cfg, progress=False)
    return cfg, corpus, tokenizer


def _build(cfg, corpus, tokenizer):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    dm = image_text_datamodule_from_config(cfg, corpus, tokenizer)
    model = instantiate(cfg.model, vocab_size=tokenizer.vocab_size, sources=dm.sources,
                        total_steps=cfg.run.total_steps, loss=OmegaConf.to_container(cfg.loss, resolve=True),
                        tokenizer_path=str(tokenizer.path), _convert_="all")
    return dm, model


def test_batches_carry_images_captions_attributes_and_weights(mm, compose_config):
    cfg, corpus, tokenizer = mm
    dm, _ = _build(cfg, corpus, tokenizer)
    assert dm.sources == ["img-deu", "img-eng", "img-fra"] and dm.reference == ["reference"]
    items = [(0, 0, 0), (1, 5, 0), (2, 7, 3)]
    batch = dm.collate(dm.train_set.__getitems__(items))
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert -1.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0
    assert batch["attributes"].shape == (3, 2) and batch["labels"].shape == (3, 8)
    assert batch["labels"][:, :4].sum(1).tolist() == [1, 1, 1]  # one shape each
    # Captions decode back to the stored text, and <eos> sits at eos_positions.
    rows = dm.split.rows_many(dm.sources, np.array([1]), np.array([5]), "train")
    stored = corpus.dataset("img-eng")[int(rows[0])]
    eos = int(batch["eos_positions"][1])
    assert int(batch["input_ids"][1, eos]) == tokenizer.eos_id
    assert tokenizer.decode(batch["input_ids"][1, 1:eos].tolist()) == stored["text"]
    assert batch["attributes"][1].tolist() == stored["attributes"]
    # Weights are the plan's per-source loss weights (1 under temperature sampling).
    assert batch["weights"].tolist() == [1.0, 1.0, 1.0]
    # Validation: held-out rows of every source, then every reference row.
    val = [i for b in dm.val_items() for i in b]
    assert len(val) == sum(dm.split.val.values()) + corpus.num_documents("reference")
    ref = dm.val_collate(dm.val_set.__getitems__(dm.val_items()[-1]))
    assert bool(ref["is_reference"].all())
    # Caption languages mix like text sources: temperature sampling over their training sizes.
    sizes = np.array([dm.split.train[n] for n in dm.sources], dtype=float)
    expected = sizes ** (1 / 3.33) / (sizes ** (1 / 3.33)).sum()
    assert np.allclose(dm.sampler.plan_at(0).sample_probs, expected)


def test_example_weights_flow_into_the_loss(mm):
    cfg, corpus, tokenizer = mm
    dm, model = _build(cfg, corpus, tokenizer)
    batch = dm.collate(dm.train_set.__getitems__([(1, i, 0) for i in range(8)]))
    image, text = model._encode(batch)
    scale = model.model.logit_scale()
    weights = torch.tensor([0.0, 2.0, 1.0, 1.0, 0.5, 1.0, 3.0, 1.0])
    got = contrastive_objective(image, text, kind="softmax", logit_scale=scale, logit_bias=None,
                                weights=weights, impl="fused")
    rows = rowwise_losses(image, text, "softmax", scale, None)  # each pair's share, unweighted
    assert float(got.detach()) == pytest.approx(float((weights * rows).sum().detach()), rel=1e-5)
    for kind in ("softmax", "sigmoid"):
        torch_impl = contrastive_objective(image, text, kind=kind, logit_scale=scale, logit_bias=model.model.logit_bias,
                                           weights=weights, impl="torch")
        tiled = contrastive_objective(image, text, kind=kind, logit_scale=scale, logit_bias=model.model.logit_bias,
                                      weights=weights, impl="fused")
        assert float(tiled.detach()) == pytest.approx(float(torch_impl.detach()), rel=1e-5)
    with pytest.raises(ValueError, match="loss.impl"):
        contrastive_objective(image, text, kind="softmax", logit_scale=scale, logit_bias=None, weights=None, impl="x")


@pytest.mark.parametrize("objective", ["softmax", "sigmoid"])
def test_a_few_training_steps_lower_the_loss(mm, compose_config, objective):
    cfg, corpus, tokenizer = mm
    cfg = compose_config([*SMALL, f"cache_dir={cfg.cache_dir}", f"model.objective={objective}"])
    torch.manual_seed(0)
    dm, model = _build(cfg, corpus, tokenizer)
    batch = dm.collate(dm.train_set.__getitems__([(s, i, 0) for s in range(3) for i in range(10)]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # 3e-3 can collapse to chance at step 1
    losses = []
    for _ in range(12):
        image, text = model._encode(batch)
        loss = contrastive_objective(image, text, kind=objective, logit_scale=model.model.logit_scale(),
                                     logit_bias=model.model.logit_bias, weights=batch["weights"], impl="fused")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    # Softmax starts near log(30) = 3.4 (chance) and must leave it; sigmoid starts high.
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("balance", [[], ["balance=m4", "balance.eta=0.6", "balance.solver=exact",
                                           "balance.mode=weights", "balance.eps_a=0.03"]])
def test_training_entry_runs_and_reports_retrieval_and_bias(mm, compose_config, tmp_path, balance):
    cfg, _, _ = mm
    record = train(compose_config([*SMALL, f"cache_dir={cfg.cache_dir}", "run.total_steps=3",
                                   f"output_dir={tmp_path}", *balance]))
    assert record["status"] == "completed" and record["global_steps"] == 3
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    for key in ("val/retrieval/i2t_R@1", "val/retrieval/t2i_R@10", "val/zero_shot/accuracy",
                "val/bias/representation/ring", "val/bias/association/ring", "val/loss/lang=img-eng"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert 0 <= metrics["val/retrieval/i2t_R@1"] <= metrics["val/retrieval/i2t_R@10"] <= 1
    assert sum(s["samples_seen"] for s in record["sources"].values()) == 3 * 16
    # The pre-flight M4 data statistics reach the run's metrics.
    if balance:
        assert metrics["data/m4_before/bias/representation/ring"] > 0.1
        assert abs(metrics["data/m4_after/bias/representation/ring"]) <= 0.05 + 1e-6
        assert metrics["data/m4_after/kept_fraction"] == pytest.approx(0.6, abs=1e-6)
    else:
        assert not any(key.startswith("data/m4") for key in metrics)


@pytest.mark.parametrize("mode", ["subsample", "weights"])
def test_m4_balancing_reaches_the_sampler_or_the_loss(mm, compose_config, mode):
    cfg, corpus, tokenizer = mm
    cfg = compose_config([*SMALL, f"cache_dir={cfg.cache_dir}", "balance=m4", "balance.eta=0.6",
                          "balance.solver=exact", f"balance.mode={mode}", "balance.eps_a=0.03"])
    dm = image_text_datamodule_from_config(cfg, corpus, tokenizer)
    report = dm.balance_report
    assert report["before"]["max_abs_representation"] > 0.1  # ring skew 0.7 vs pi 0.5
    assert report["after"]["max_abs_representation"] <= 0.05 + 1e-6
    assert report["after"]["max_abs_association"] <= 0.03 + 1e-6
    plan = dm.sampler.plan_at(0)  # M4 reaches training through the plan, as any mixing stage
    if mode == "subsample":
        kept = sum(report["kept_rows"].values())
        total = sum(dm.split.train.values())
        assert 0.45 * total < kept < 0.75 * total and plan.example_weights is None
        assert {n: int(plan.example_keep[n].sum()) for n in dm.sources} == report["kept_rows"]
        # A pass over a source is a pass over its kept rows; the mixture is computed over them.
        assert [int(n) for n in dm.sampler.num_documents] == [report["kept_rows"][n] for n in dm.sources]
        sizes = np.array([report["kept_rows"][n] for n in dm.sources], dtype=float)
        assert np.allclose(plan.sample_probs, sizes ** (1 / 3.33) / (sizes ** (1 / 3.33)).sum())
        # The sampler draws only kept rows, and those are training rows: never a held-out row.
        source, index, _ = dm.sampler.positions(0, 4 * total)
        for s, name in enumerate(dm.sources):
            drawn = index[source == s]
            assert set(drawn.tolist()) == set(np.flatnonzero(plan.example_keep[name]).tolist())
            rows = set(dm.split.rows_many(dm.sources, np.full(drawn.size, s), drawn).tolist())
            assert not rows & set(dm.split.val_rows(name).tolist())
    else:
        assert plan.example_keep is None
        weights = np.concatenate([plan.example_weights[n] for n in dm.sources])
        assert weights.mean() == pytest.approx(1.0) and weights.std() > 0.1
        batch = dm.collate(dm.train_set.__getitems__([(1, i, 0) for i in range(6)]))
        assert batch["weights"].tolist() == pytest.approx(plan.example_weights["img-eng"][:6].tolist())


@pytest.mark.parametrize("override, match", [
    ("+balance.method=reweigh", "balance.method must be one of"),
    ("+balance.mystery=1", "unknown balance option"),
    ("+balance.eta=1.5", "eta"),
    ("+balance.eps_r=-0.1", "eps"),
])
def test_bad_balance_options_raise(mm, compose_config, override, match):
    cfg, corpus, tokenizer = mm
    base = [] if override.startswith("+balance.method") else ["+balance.method=m4"]
    cfg = compose_config([*SMALL, f"cache_dir={cfg.cache_dir}", *base, override])
    with pytest.raises(ValueError, match=match):
        image_text_datamodule_from_config(cfg, corpus, tokenizer)


def test_mixing_image_text_with_text_sources_is_refused(compose_config, mm):
    from pipeline.config.data import is_image_text

    cfg, corpus, _ = mm
    assert is_image_text(cfg, corpus)
    with pytest.raises(ValueError, match="not image_text"):
        from pipeline.data.image_text import image_text_info

        class Fake:
            def kind(self, name):
                return "mono"
        image_text_info(Fake(), ["deu"])


@pytest.mark.distributed
def test_two_process_deepspeed_zero2_contrastive_run(mm, tmp_path):
    """torchrun, 2 CPU processes over gloo, DeepSpeed ZeRO-2: trains, validates, writes results."""
    cfg, _, _ = mm
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
               "-m", "pipeline.train", *SMALL, f"cache_dir={cfg.cache_dir}", "strategy=deepspeed_zero2",
               "trainer.devices=2", "run.total_steps=2", "loader.micro_batch_size=8", f"output_dir={tmp_path}",
               f"hydra.run.dir={tmp_path / 'hydra'}"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["world_size"] == 2 and record["global_steps"] == 2
    assert sum(s["samples_seen"] for s in record["sources"].values()) == 2 * 16
    assert np.isfinite(record["metrics"]["val/retrieval/i2t_R@1"])
    assert np.isfinite(record["metrics"]["train/loss"])
