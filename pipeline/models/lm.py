"""LightningModule for multilingual language modelling and decoder-only translation.

Training objective per optimizer step: sum_i w_i * CE_i / N_global over the global batch
(`pipeline.models.losses`). Lightning divides a returned loss by the accumulation steps and data
parallelism averages gradients over ranks, so each micro-batch returns
``accumulation * world_size * sum_i w_i CE_i / N_global``: the summed gradient is then
exactly the gradient of the global objective. Logged ``train/loss`` is the objective itself.

Metrics: per-source validation loss and perplexity, chrF per parallel source from greedy
decoding of held-out translation rows, and the shared ``data/*`` accounting (target tokens
and rows seen per source, mixture probabilities, loss weights and epochs:
`pipeline.models.data_accounting`, checkpointed with the run).

chrF is sacrebleu's corpus chrF (character 6-grams, no word n-grams: chrF, not chrF++;
beta 2; 0-100) over the hypothesis and reference strings of every rank (gathered, so one
process, DDP and DeepSpeed score the same rows). ``val/chrf/lang=deu-eng`` counts every
decoded row of source ``deu-eng``, both directions when ``loader.direction=both``;
``val/chrf/lang=deu-eng/to=deu`` and ``.../to=eng`` split it by target language.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy

from pipeline.data.text_rows import IGNORE_INDEX
from pipeline.evaluation.metrics import PerSourceSum, corpus_chrf, gather_objects, source_key
from pipeline.models.data_accounting import DataAccounting
from pipeline.models.gradient_scale import gradient_scale
from pipeline.models.losses import LossConfig, TokenLossHead
from pipeline.models.optim import adamw_with_schedule, check_schedule
from pipeline.models.transformer import DecoderOnlyTransformer, TransformerConfig


class LanguageModel(DataAccounting, pl.LightningModule):
    supports_source_losses = True  # training losses per source for online mixing
    """Args:
        vocab_size, sources: from the prepared data (sources index `source_ids`).
        transformer: TransformerConfig fields (d_model, n_layers, n_heads, d_ff, ...).
        optimizer: AdamW settings: lr, weight_decay, betas.
        schedule: warmup_steps, name (cosine | linear | constant), min_lr_ratio.
        loss: LossConfig fields (impl, label_smoothing, z_loss).
        total_steps: planned optimizer steps (for the schedule).
        translation_eval: {examples_per_source, max_new_tokens} for chrF (0 disables): the
            first `examples_per_source` held-out rows of each parallel source are decoded.
        tokenizer_path: tokenizer to decode with for chrF (None: no chrF).
    """

    def __init__(self, vocab_size: int, sources: list[str], transformer: dict, optimizer: dict,
                 schedule: dict, loss: dict, total_steps: int, source_kinds: list[str] | None = None,
                 target_languages: list[str] | None = None, translation_eval: dict | None = None,
                 tokenizer_path: str | None = None):
        super().__init__()
        # Plain strings in the saved hyperparameters: the composed config's enum values
        # (pipeline.config.schema.LossImpl) would tie checkpoints to that class.
        loss = {k: v.value if isinstance(v, Enum) else v for k, v in dict(loss).items()}
        self.save_hyperparameters()
        self.sources = list(sources)
        self.model = DecoderOnlyTransformer(TransformerConfig(vocab_size=vocab_size, **transformer))
        self.loss_head = TokenLossHead(LossConfig(**loss))
        check_schedule(schedule)
        num = len(self.sources)
        self.val_loss = PerSourceSum(num)
        self.init_data_accounting(num)  # seen_tokens, seen_rows (pipeline.models.data_accounting)
        self.source_kinds = list(source_kinds or ["mono"] * num)
        self.target_languages = list(target_languages or [])
        # (source index, target language, hypothesis, reference) decoded this validation pass.
        self._translations: list[tuple[int, str, str, str]] = []
        self.translation_eval = dict(translation_eval or {})
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._normalizer: torch.Tensor | None = None
        self._step_loss = 0.0
        self._grad_norm = math.nan

    # -- setup -----------------------------------------------------------------------------
    def configure_model(self) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "zero_stage_3", False):
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            # The tied LM head is the embedding: gather it for the loss head's forward too.
            register_external_parameter(self.loss_head, self.model.embed.weight)

    def configure_optimizers(self):
        return adamw_with_schedule(self, self.hparams.optimizer, self.hparams.schedule, self.hparams.total_steps,
                                   default_betas=(0.9, 0.95))

    # -- training --------------------------------------------------------------------------
    def _hidden(self, batch) -> torch.Tensor:
        documents = batch["document_ids"]
        packed = bool((documents.amax(dim=1) > 0).any())  # padded rows need only the causal mask
        return self.model(batch["input_ids"], documents if packed else None)

    def _global_normalizer(self, batch) -> torch.Tensor:
        """N_global of this step: all-reduced on each step's first micro-batch."""
        local = batch["step_target_tokens"]
        if int(local) >= 0:
            total = local.to(self.device, torch.float64).clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(total)
            self._normalizer = total.clamp(min=1).float()
            self._step_loss = 0.0
        if self._normalizer is None:
            raise ValueError("first micro-batch of the step carried no step_target_tokens")
        return self._normalizer

    def training_step(self, batch, batch_idx):
        normalizer = self._global_normalizer(batch)
        hidden = self._hidden(batch)
        labels = batch["labels"].flatten()
        if self.track_source_losses:  # online mixing: unweighted per-token losses, then the weighted sum
            losses = self.loss_head(hidden.flatten(0, 1), self.model.lm_head_weight, labels, reduction="none")
            self.add_source_losses(losses, batch["token_source_ids"].flatten(), labels != IGNORE_INDEX)
            weighted_sum = (losses * batch["token_weights"].flatten()).sum()
        else:
            weighted_sum = self.loss_head(hidden.flatten(0, 1), self.model.lm_head_weight, labels,
                                          batch["token_weights"].flatten())
        objective = weighted_sum / normalizer
        self._step_loss += float(objective.detach())
        self.count_data(torch.ones_like(labels, dtype=torch.float64), batch["token_source_ids"].flatten(),
                        batch["source_ids"], labels != IGNORE_INDEX)
        return objective * gradient_scale(self.trainer, per_micro_batch_loss=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Before clipping, after the data-parallel all-reduce: the gradient of the global
        # objective (DeepSpeed keeps its gradients in partitioned buffers: read after step).
        # Only on steps that are logged: 37+ per-parameter float64 norms cost ~0.7 ms a step.
        if not isinstance(self.trainer.strategy, DeepSpeedStrategy) and self.logs_step(self.trainer.global_step + 1):
            # Accumulated in float64: a float32 norm over the embedding's 10^5+ entries is
            # off by ~3e-5 relative, more than the cross-strategy tests allow.
            norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in self.parameters()
                     if p.grad is not None]
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _global_grad_norm(self) -> float:
        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            norm = strategy.deepspeed_engine.get_global_grad_norm()
            return math.nan if norm is None else float(norm)
        return self._grad_norm

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        step = self.trainer.global_step  # already advanced by this batch's optimizer step
        if not self.logs_step(step):
            # Lightning writes step metrics to the loggers only on these steps anyway, and each
            # self.log costs ~1 ms (result collection): 2 ms of a 25 ms demo step.
            return
        loss = torch.tensor(self._step_loss, device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)  # each rank holds its share of the global objective
        self.log("train/loss", loss, rank_zero_only=True, batch_size=1)
        # Pre-clipping norm of the global objective's gradient: the same at any world size
        # and accumulation when gradient_scale() is right (tests/pipeline/test_distributed_train.py).
        self.log("train/grad_norm", self._global_grad_norm(), rank_zero_only=True, batch_size=1)
        self.log_data_metrics(step)

    # -- validation ------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        hidden = self._hidden(batch)
        labels = batch["labels"].flatten()
        losses = self.loss_head(hidden.flatten(0, 1), self.model.lm_head_weight, labels, reduction="none")
        self.val_loss.update(losses.float(), batch["token_source_ids"].flatten(), labels != IGNORE_INDEX)
        if self.target_languages and self.translation_eval.get("examples_per_source", 0) > 0:
            self._translate_and_score(batch)

    def on_validation_epoch_start(self) -> None:
        self._translations = []  # an interrupted pass must not leak rows into the next

    def on_validation_epoch_end(self) -> None:
        sums, counts = self.val_loss.per_source()
        self.val_loss.reset()
        metrics: dict[str, Any] = {}
        per_source = []
        for i, name in enumerate(self.sources):
            if counts[i] > 0:
                loss = float(sums[i] / counts[i])
                per_source.append(loss)
                metrics[f"val/loss/{source_key(name)}"] = loss
                metrics[f"val/ppl/{source_key(name)}"] = math.exp(min(loss, 50.0))
        if counts.sum() > 0:
            metrics["val/loss"] = float(sums.sum() / counts.sum())  # token-weighted
            metrics["val/loss_macro"] = sum(per_source) / len(per_source)  # every source equal
        if self.target_languages:
            metrics.update(self._chrf_metrics())
        self.log_dict(metrics, batch_size=1, sync_dist=False, rank_zero_only=True)

    # -- translation evaluation --------------------------------------------------------------
    def _chrf_metrics(self) -> dict[str, float]:
        """chrF per parallel source (and per source and target language) over every rank's
        decoded rows. A collective: every rank calls it, with or without rows of its own."""
        rows = gather_objects(self._translations)
        self._translations = []
        groups: dict[str, list[tuple[str, str]]] = {}
        for source, lang, hypothesis, reference in rows:
            key = source_key(self.sources[source])
            groups.setdefault(f"val/chrf/{key}", []).append((hypothesis, reference))
            if lang:
                groups.setdefault(f"val/chrf/{key}/to={lang}", []).append((hypothesis, reference))
        return {name: corpus_chrf([h for h, _ in pairs], [r for _, r in pairs])
                for name, pairs in sorted(groups.items())}

    def _decoder_tokenizer(self):
        if self._tokenizer is None and self._tokenizer_path is not None:
            from pipeline.data.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self._tokenizer_path)
        return self._tokenizer

    def _translate_and_score(self, batch) -> None:
        """Greedy-decode the batch's first held-out translation rows and update chrF.

        Every rank runs exactly `max_new_tokens` forward passes per validation batch (a
        dummy prompt when no row qualifies), so ZeRO-3's collective parameter gathering
        stays in lock-step across ranks.
        """
        tokenizer = self._decoder_tokenizer()
        if tokenizer is None:
            return
        limit = self.translation_eval.get("examples_per_source", 4)
        max_new = self.translation_eval.get("max_new_tokens", 32)
        prompts, references, languages, sources = [], [], [], []
        for row in range(batch["input_ids"].shape[0]):
            source = int(batch["source_ids"][row])
            targets = batch["labels"][row] != IGNORE_INDEX
            if self.source_kinds[source] != "parallel" or not targets.any():
                continue
            if int(batch["example_index"][row]) >= limit:
                continue
            first = int(targets.nonzero()[0])
            prompts.append(batch["input_ids"][row, : first + 1].tolist())
            references.append(tokenizer.decode(batch["labels"][row][targets].tolist()[:-1]))  # no eos
            languages.append(self._target_language(prompts[-1][0], tokenizer))
            sources.append(source)
        outputs = self.model.greedy_decode_batch(prompts or [[tokenizer.eos_id]], tokenizer.eos_id,
                                                 max_new, tokenizer.pad_id)
        for hypothesis, reference, lang, source in zip(outputs, references, languages, sources, strict=False):
            self._translations.append((source, lang, tokenizer.decode(hypothesis), reference))

    def _target_language(self, tag_id: int, tokenizer) -> str:
        for lang in self.target_languages:
            if tokenizer.lang_tag_id(lang) == tag_id:
                return lang
        return ""
