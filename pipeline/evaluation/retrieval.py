"""Image-text evaluation: retrieval recall@K, zero-shot accuracy, model bias.

Shapes: N pairs, D embedding size, C labels, m sensitive attributes. Embeddings are
L2-normalised by the caller; scores are dot products. Pure functions below define every
number; `PairedEmbeddings` gathers the inputs across ranks (torchmetrics ``cat`` states).

* recall@K, image->text: the share of images i whose own text i is among the K highest
  scoring texts; rank = number of texts scoring strictly higher than text i (ties count in
  the image's favour). text->image likewise.
* zero-shot accuracy: each image's top-scoring label prompt is one of its positive labels
  (multi-label data: any positive counts); images with no positive label are skipped.
* representation bias (per attribute k): the share of reference images predicted s_k = 1
  (the "attribute present" prompt scores above the "absent" prompt) minus the target pi_k.
* association bias (per attribute k and label r): mean over images with s_k = 1 of the
  zero-shot probability of label r (softmax over label prompts) minus the same mean over
  images with s_k = 0. On a reference set where labels do not depend on attributes an
  unbiased model has gaps near 0; the metric logs the largest |gap| per attribute.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

KS = (1, 5, 10)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """(N,) rank of the diagonal entry in each row of an (N, N) score matrix (0 = best)."""
    diagonal = scores.diagonal()[:, None]
    return (scores > diagonal).sum(dim=1)


def retrieval_recall(image: torch.Tensor, text: torch.Tensor, ks=KS) -> dict[str, float]:
    """{"i2t_R@k", "t2i_R@k"} for paired (N, D) embeddings (pair i = row i of each)."""
    if image.shape != text.shape or image.ndim != 2 or image.shape[0] == 0:
        raise ValueError(f"need two non-empty (N, D) embeddings of one shape, got {tuple(image.shape)} "
                         f"and {tuple(text.shape)}")
    scores = image.double() @ text.double().T
    i2t, t2i = _ranks(scores), _ranks(scores.T)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t < k).double().mean())
        out[f"t2i_R@{k}"] = float((t2i < k).double().mean())
    return out


def zero_shot_probs(image: torch.Tensor, prompts: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(N, C) softmax over prompts of logit_scale * <image, prompt>."""
    return torch.softmax(logit_scale * (image.double() @ prompts.double().T), dim=1)


def zero_shot_accuracy(image: torch.Tensor, prompts: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images (with >= 1 positive label) whose top prompt is a positive label."""
    if labels.shape != (image.shape[0], prompts.shape[0]):
        raise ValueError(f"labels must be (N, C) = ({image.shape[0]}, {prompts.shape[0]}), "
                         f"got {tuple(labels.shape)}")
    top = (image.double() @ prompts.double().T).argmax(dim=1)
    has_positive = labels.sum(dim=1) > 0
    if not bool(has_positive.any()):
        return float("nan")
    hit = labels.gather(1, top[:, None]).squeeze(1) > 0
    return float(hit[has_positive].double().mean())


def predicted_attribute_rates(image: torch.Tensor, absent: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(m,) share of images whose "present" prompt k scores above its "absent" prompt k."""
    scores_present = image.double() @ present.double().T  # (N, m)
    scores_absent = image.double() @ absent.double().T
    return (scores_present > scores_absent).double().mean(dim=0)


def representation_bias(image: torch.Tensor, absent: torch.Tensor, present: torch.Tensor,
                        pi: torch.Tensor) -> torch.Tensor:
    """(m,) predicted attribute rate minus target pi on a reference set."""
    return predicted_attribute_rates(image, absent, present) - pi.double()


def association_gaps(probs: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """(m, C): mean label probability over s_k = 1 minus over s_k = 0 (nan: empty group)."""
    s = attributes.double()
    ones, zeros = s.sum(dim=0), (1 - s).sum(dim=0)  # (m,)
    mean_one = (s.T @ probs.double()) / ones[:, None]
    mean_zero = ((1 - s).T @ probs.double()) / zeros[:, None]
    gap = mean_one - mean_zero
    gap[(ones == 0) | (zeros == 0)] = float("nan")
    return gap


def data_association_gaps(labels: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """(m, C): the same gap computed from the true labels (the reference set's own skew)."""
    return association_gaps(labels.double(), attributes)


class PairedEmbeddings(Metric):
    """Gathers image/text embeddings, attributes and labels of evaluated rows over ranks.

    update(image (B, D), text (B, D), attributes (B, m), labels (B, c), keep (B,) bool);
    compute() -> (image, text, attributes, labels), each concatenated over every rank.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("image", "text", "attributes", "labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image, text, attributes, labels, keep=None) -> None:
        keep = torch.ones(image.shape[0], dtype=torch.bool, device=image.device) if keep is None else keep
        self.image.append(image[keep].detach().float())
        self.text.append(text[keep].detach().float())
        self.attributes.append(attributes[keep].detach().float())
        self.labels.append(labels[keep].detach().float())

    def compute(self):
        def cat(state):
            if isinstance(state, torch.Tensor):  # already concatenated by the sync
                return state
            return torch.cat(state) if state else torch.zeros(0)
        return cat(self.image), cat(self.text), cat(self.attributes), cat(self.labels)
