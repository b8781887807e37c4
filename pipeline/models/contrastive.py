"""Contrastive image-text LightningModule: CLIP (softmax) or SigLIP (sigmoid) loss.

Towers: an image tower (`pipeline.models.image_tower`: small ViT or conv net) and a text
tower, the decoder-only transformer of `pipeline.models.transformer` over the run's
multilingual SentencePiece tokenizer (causal, as in CLIP; the caption's feature is the
hidden state at its ``<eos>``). Linear projections to ``embed_dim``, L2 normalisation, a
learnable logit scale (stored as its log, clamped at 100) and, for sigmoid, a learnable bias.

Loss per micro-batch (B pairs over all ranks): `kernels.contrastive_loss` with per-example
weights w_i = plan loss weight of the row's source x the row's example weight (M4
``mode=weights``): softmax sum_i w_i (i2t_i + t2i_i) / 2B, sigmoid sum_ij (w_i + w_j)/2
softplus(-z_ij L_ij) / B. With several ranks the features are gathered, so negatives span
the global micro-batch; the kernel's gradient on each rank is that of the global loss, and
the returned loss is multiplied by the world size to undo data-parallel averaging.

Validation: per-source held-out loss, retrieval recall@1/5/10 (image->text, text->image)
over the held-out rows of every source, and on the reference rows (or the held-out rows
when the corpus has no reference source): zero-shot accuracy over label prompts,
representation bias per attribute and association bias (`pipeline.evaluation.retrieval`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.data.text_rows import PADDING_STEP
from pipeline.evaluation.metrics import PerSourceSum, source_key
from pipeline.evaluation.retrieval import (
    PairedEmbeddings,
    association_gaps,
    data_association_gaps,
    predicted_attribute_rates,
    retrieval_recall,
    zero_shot_accuracy,
    zero_shot_probs,
)
from pipeline.models.data_accounting import DataAccounting
from pipeline.models.gradient_scale import gradient_scale
from pipeline.models.image_tower import ImageTowerConfig, build_image_tower
from pipeline.models.optim import adamw_with_schedule, check_schedule
from pipeline.models.transformer import DecoderOnlyTransformer, TransformerConfig

OBJECTIVES = ("softmax", "sigmoid")
MAX_LOGIT_SCALE = 100.0
# cfg.loss.impl (shared with the language model) -> kernels.contrastive_loss impl.
KERNEL_IMPLS = {"torch": "torch", "fused": "auto"}


def contrastive_objective(image: torch.Tensor, text: torch.Tensor, *, kind: str, logit_scale, logit_bias,
                          weights: torch.Tensor | None, impl: str, group=None) -> torch.Tensor:
    """The contrastive loss through `kernels.contrastive_loss` (impl from `loss.impl`)."""
    from kernels import contrastive_loss

    if impl not in KERNEL_IMPLS:
        raise ValueError(f"loss.impl must be one of {sorted(KERNEL_IMPLS)} for the contrastive model, got {impl!r}")
    return contrastive_loss(image, text, kind=kind, logit_scale=logit_scale,
                            logit_bias=logit_bias if kind == "sigmoid" else None,
                            sample_weight=weights, group=group, impl=KERNEL_IMPLS[impl])


def rowwise_losses(image: torch.Tensor, text: torch.Tensor, kind: str, scale, bias) -> torch.Tensor:
    """(B,) each pair's share of the (unweighted) batch loss; they sum to the batch loss."""
    logits = scale * (image.float() @ text.float().T)
    b = logits.shape[0]
    rows = torch.arange(b, device=logits.device)
    if kind == "softmax":
        i2t = torch.logsumexp(logits, 1) - logits[rows, rows]
        t2i = torch.logsumexp(logits, 0) - logits[rows, rows]
        return (i2t + t2i) / (2 * b)
    sign = 2 * torch.eye(b, device=logits.device) - 1
    pair = -F.logsigmoid(sign * (logits + bias))
    return (pair.sum(1) + pair.sum(0)) / (2 * b)


class DualEncoder(nn.Module):
    """Images (B, 3, H, W) and captions (B, T) -> unit embeddings (B, embed_dim)."""

    def __init__(self, vocab_size: int, image_tower: dict, text_tower: dict, embed_dim: int,
                 objective: str, init_logit_scale: float, init_logit_bias: float):
        super().__init__()
        self.image_tower = build_image_tower(ImageTowerConfig(**image_tower))
        self.text_tower = DecoderOnlyTransformer(TransformerConfig(vocab_size=vocab_size, **text_tower))
        image_width = self.image_tower.norm.normalized_shape[0]
        self.image_proj = nn.Linear(image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_tower.config.d_model, embed_dim, bias=False)
        # Shape (1,), not 0-d: DeepSpeed's parameter broadcast cannot view 0-d tensors as bytes.
        self.log_scale = nn.Parameter(torch.tensor([math.log(init_logit_scale)]))
        self.bias = nn.Parameter(torch.tensor([float(init_logit_bias)]), requires_grad=objective == "sigmoid")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_tower(images)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, eos_positions: torch.Tensor) -> torch.Tensor:
        hidden = self.text_tower(input_ids)  # causal: padding after <eos> cannot leak back
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return F.normalize(self.text_proj(hidden[rows, eos_positions]), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        """Scalar multiplier exp(log_scale), clamped at MAX_LOGIT_SCALE."""
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp().squeeze(0)

    @property
    def logit_bias(self) -> torch.Tensor:
        """Scalar sigmoid bias (fixed, unused for softmax)."""
        return self.bias.squeeze(0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ContrastiveModel(DataAccounting, pl.LightningModule):
    """Args:
        vocab_size, sources: from the prepared data (sources index `source_ids`).
        image_tower: ImageTowerConfig fields; text_tower: TransformerConfig fields (no vocab).
        embed_dim: joint embedding size. objective: softmax (CLIP) | sigmoid (SigLIP).
        init_logit_scale / init_logit_bias: initial multiplier and (sigmoid) bias.
        optimizer, schedule: as the language model (AdamW; warmup then cosine/linear/constant).
        loss: the run's `cfg.loss`; only `impl` is used (torch: reference, fused: tiled kernel).
        total_steps: planned optimizer steps. bias_eval: {pi: target attribute rate (float or
            list of m)}. Other arguments of the training entry are accepted and unused.
        tokenizer_path: tokenizer for the zero-shot prompts (None: no zero-shot/bias metrics).
    """

    def __init__(self, vocab_size: int, sources: list[str], image_tower: dict, text_tower: dict,
                 embed_dim: int, optimizer: dict, schedule: dict, total_steps: int,
                 objective: str = "softmax", init_logit_scale: float = 10.0, init_logit_bias: float = -10.0,
                 loss: dict | None = None, bias_eval: dict | None = None, tokenizer_path: str | None = None,
                 source_kinds: list[str] | None = None, target_languages: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters()
        if objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {OBJECTIVES}, got {objective!r}")
        check_schedule(schedule)
        if init_logit_scale <= 0:
            raise ValueError(f"model.init_logit_scale must be > 0, got {init_logit_scale}")
        self.sources = list(sources)
        self.objective = objective
        self.loss_impl = (loss or {}).get("impl", "torch")
        if self.loss_impl not in KERNEL_IMPLS:
            raise ValueError(f"loss.impl must be one of {sorted(KERNEL_IMPLS)}, got {self.loss_impl!r}")
        self.model = DualEncoder(vocab_size, image_tower, text_tower, embed_dim, objective,
                                 init_logit_scale, init_logit_bias)
        num = len(self.sources)
        self.val_loss = PerSourceSum(num)
        self.init_data_accounting(num)  # seen_tokens, seen_rows (pipeline.models.data_accounting)
        self.val_pairs = PairedEmbeddings()
        self.reference_pairs = PairedEmbeddings()
        self.bias_eval = dict(bias_eval or {})
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._step_loss = 0.0

    # -- setup -----------------------------------------------------------------------------
    def configure_optimizers(self):
        return adamw_with_schedule(self, self.hparams.optimizer, self.hparams.schedule, self.hparams.total_steps,
                                   default_betas=(0.9, 0.98))

    def _group(self):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _encode(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.model.encode_image(batch["images"]),
                self.model.encode_text(batch["input_ids"], batch["eos_positions"]))

    def batch_loss(self, batch) -> torch.Tensor:
        """The weighted contrastive loss of one micro-batch (global over ranks)."""
        image, text = self._encode(batch)
        return contrastive_objective(image, text, kind=self.objective, logit_scale=self.model.logit_scale(),
                                     logit_bias=self.model.logit_bias, weights=batch["weights"],
                                     impl=self.loss_impl, group=self._group())

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            self._step_loss = 0.0
        loss = self.batch_loss(batch)
        self._step_loss += float(loss.detach()) / self.trainer.accumulate_grad_batches
        # Caption tokens (<bos> ... <eos>) per row.
        self.count_data(batch["eos_positions"] + 1, batch["source_ids"], batch["source_ids"])
        return loss * gradient_scale(self.trainer, per_micro_batch_loss=False)

    def on_train_start(self) -> None:
        """Log the pre-flight M4 data statistics (before/after balancing), if any."""
        report = getattr(getattr(self.trainer, "datamodule", None), "balance_report", None)
        if report:
            metrics = {f"data/m4_{when}/{key.removeprefix('data/m4/')}": float(value)
                       for when in ("before", "after") for key, value in report[when].items()}
            self.log_dict(metrics, rank_zero_only=True, batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        step = self.trainer.global_step
        # The kernel's value is already the global loss on every rank.
        self.log("train/loss", self._step_loss, rank_zero_only=True, batch_size=1)
        self.log("train/logit_scale", float(self.model.logit_scale().detach()), rank_zero_only=True, batch_size=1)
        if self.logs_step(step):
            self.log_data_metrics(step)

    # -- validation ------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        image, text = self._encode(batch)
        real = batch["step"] != PADDING_STEP
        reference = batch["is_reference"].bool() & real
        held_out = ~batch["is_reference"].bool() & real
        if bool(held_out.any()):
            rows = rowwise_losses(image[held_out], text[held_out], self.objective,
                                  self.model.logit_scale(), self.model.logit_bias)
            # Per-pair share times the pairs in the batch: a per-pair loss on the batch's scale.
            self.val_loss.update(rows * rows.shape[0], batch["source_ids"][held_out])
        self.val_pairs.update(image, text, batch["attributes"], batch["labels"], held_out)
        self.reference_pairs.update(image, text, batch["attributes"], batch["labels"], reference)

    def on_validation_epoch_end(self) -> None:
        sums, counts = self.val_loss.per_source()
        self.val_loss.reset()
        metrics: dict[str, Any] = {}
        for i, name in enumerate(self.sources):
            if counts[i] > 0:
                metrics[f"val/loss/{source_key(name)}"] = float(sums[i] / counts[i])
        if counts.sum() > 0:
            metrics["val/loss"] = float(sums.sum() / counts.sum())
        image, text, attributes, labels = self.val_pairs.compute()
        self.val_pairs.reset()
        if image.shape[0] > 0:
            metrics.update({f"val/retrieval/{k}": v for k, v in retrieval_recall(image, text).items()})
        ref = self.reference_pairs.compute()
        self.reference_pairs.reset()
        if ref[0].shape[0] == 0:
            ref = (image, text, attributes, labels)
        if ref[0].shape[0] > 0:
            metrics.update(self.bias_metrics(*ref))
        self.log_dict(metrics, batch_size=1, sync_dist=False, rank_zero_only=True)

    # -- zero-shot and bias ------------------------------------------------------------------
    def _prompt_tokenizer(self):
        if self._tokenizer is None and self._tokenizer_path is not None:
            from pipeline.data.tokenizer import Tokenizer

            self._tokenizer = Tokenizer.load(self._tokenizer_path)
        return self._tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), embed_dim) unit text embeddings of prompt strings."""
        tok = self._prompt_tokenizer()
        ids = [[tok.bos_id, *row, tok.eos_id] for row in tok.encode(list(prompts))]
        length = max(len(r) for r in ids)
        batch = torch.full((len(ids), length), tok.pad_id, dtype=torch.long, device=self.device)
        for i, row in enumerate(ids):
            batch[i, : len(row)] = torch.tensor(row, device=self.device)
        eos = torch.tensor([len(r) - 1 for r in ids], device=self.device)
        return self.model.encode_text(batch, eos).float()

    def bias_metrics(self, image, text, attributes, labels) -> dict[str, float]:
        """Zero-shot accuracy and model bias from the corpus's prompts (needs the datamodule)."""
        info = getattr(getattr(self.trainer, "datamodule", None), "info", None)
        if not info or self._prompt_tokenizer() is None:
            return {}
        out: dict[str, float] = {}
        scale = float(self.model.logit_scale().detach())
        if info.get("label_prompts"):
            prompts = self.encode_prompts(info["label_prompts"]).to(image.device)
            out["val/zero_shot/accuracy"] = zero_shot_accuracy(image, prompts, labels)
            gaps = association_gaps(zero_shot_probs(image, prompts, scale), attributes)
            data_gaps = data_association_gaps(labels, attributes)
            for k, name in enumerate(info["attribute_names"]):
                if not torch.isnan(gaps[k]).all():
                    out[f"val/bias/association/{name}"] = float(gaps[k].abs().nan_to_num(0).max())
                    out[f"val/bias/association_data/{name}"] = float(data_gaps[k].abs().nan_to_num(0).max())
            if not torch.isnan(gaps).all():
                out["val/bias/association_max"] = float(gaps.abs().nan_to_num(0).max())
        if info.get("attribute_prompts"):
            pairs = info["attribute_prompts"]
            absent = self.encode_prompts([p[0] for p in pairs]).to(image.device)
            present = self.encode_prompts([p[1] for p in pairs]).to(image.device)
            rates = predicted_attribute_rates(image, absent, present)
            pi = torch.as_tensor(self.bias_eval.get("pi", 0.5), dtype=torch.float64).expand(len(pairs))
            true_rates = attributes.double().mean(dim=0)
            for k, name in enumerate(info["attribute_names"]):
                out[f"val/bias/representation/{name}"] = float(rates[k] - pi[k])
                out[f"val/bias/representation_data/{name}"] = float(true_rates[k] - pi[k])
            out["val/bias/representation_max"] = float((rates - pi.to(rates)).abs().max())
        return out
