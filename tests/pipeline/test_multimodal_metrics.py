"""Retrieval, zero-shot and bias metrics on constructed embeddings, against hand-computed values."""

import math

import pytest
import torch

from pipeline.evaluation.retrieval import (
    PairedEmbeddings,
    association_gaps,
    data_association_gaps,
    predicted_attribute_rates,
    representation_bias,
    retrieval_recall,
    zero_shot_accuracy,
    zero_shot_probs,
)


def unit(*angles_deg):
    """(N, 2) unit vectors at the given angles (degrees)."""
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_recall_at_k_matches_hand_counted_ranks():
    image = unit(0, 90, 180, 270)
    text = unit(10, 160, 215, 300)
    # Angular distances (smaller = higher score), image -> texts:
    #   image0: 10, 160, 145, 60  -> text0 nearest            rank 0
    #   image1: 80, 70, 125, 150  -> text1 nearest            rank 0
    #   image2: 170, 20, 35, 120  -> text1 then text2         rank 1
    #   image3: 100, 110, 55, 30  -> text3 nearest            rank 0
    r = retrieval_recall(image, text, ks=(1, 2))
    assert r["i2t_R@1"] == pytest.approx(3 / 4)
    assert r["i2t_R@2"] == pytest.approx(1.0)
    # text -> images: text0: 10, 80, 170, 100 (rank 0); text1: 160, 70, 20, 110 (image2 first,
    # rank 1); text2: 145, 125, 35, 55 (rank 0); text3: 60, 150, 120, 30 (rank 0).
    assert r["t2i_R@1"] == pytest.approx(3 / 4)
    assert r["t2i_R@2"] == pytest.approx(1.0)


def test_recall_ties_count_in_the_queries_favour():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # text1 scores exactly as text0 for image0
    r = retrieval_recall(image, text, ks=(1,))
    # image0: text0 ties text1 -> rank 0 (hit); image1: both texts score 0 -> rank 0 (hit).
    assert r["i2t_R@1"] == 1.0
    # text0 and text1 both prefer image0: text1's own image1 is second -> miss.
    assert r["t2i_R@1"] == 0.5


def test_recall_default_ks_and_perfect_alignment():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    r = retrieval_recall(x, x)
    assert set(r) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in r.values())
    # Reversed pairing: text i = image (N-1-i); recall@1 is 0 unless i == N-1-i (none for even N).
    r = retrieval_recall(x, x.flip(0))
    assert r["i2t_R@1"] == 0.0 and r["t2i_R@1"] == 0.0


def test_recall_rejects_bad_shapes():
    with pytest.raises(ValueError, match="embeddings"):
        retrieval_recall(torch.zeros(3, 2), torch.zeros(4, 2))


def test_zero_shot_accuracy_and_probabilities():
    prompts = unit(0, 90, 180)  # labels A, B, C
    image = unit(5, 80, 100, 175)  # nearest: A, B, B, C
    labels = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    # hits: row0 A positive yes; row1 B yes; row2 B not positive -> no; row3 C not positive -> no.
    assert zero_shot_accuracy(image, prompts, labels) == pytest.approx(2 / 4)
    # An image with no positive label is skipped.
    labels[3] = 0
    assert zero_shot_accuracy(image, prompts, labels) == pytest.approx(2 / 3)
    probs = zero_shot_probs(image[:1], prompts, logit_scale=2.0)
    logits = 2.0 * torch.tensor([math.cos(math.radians(5)), math.cos(math.radians(85)), math.cos(math.radians(175))])
    assert torch.allclose(probs[0], torch.softmax(logits.double(), 0))


def test_representation_bias_counts_present_over_absent_prompt():
    # Attribute 0: absent prompt at 0 deg, present at 90 deg; attribute 1: absent 180, present 90.
    absent, present = unit(0, 180), unit(90, 90)
    image = unit(10, 50, 60, 80, 170)
    # attribute 0: present wins when the angle is above 45 -> 50, 60, 80, 170 -> 4/5.
    # attribute 1: present (90) beats absent (180) when the angle is below 135 -> 10..80 -> 4/5.
    rates = predicted_attribute_rates(image, absent, present)
    assert rates.tolist() == pytest.approx([0.8, 0.8])
    bias = representation_bias(image, absent, present, torch.tensor([0.5, 0.7]))
    assert bias.tolist() == pytest.approx([0.3, 0.1])


def test_association_gaps_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]], dtype=torch.float64)
    attributes = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 1]], dtype=torch.float64)
    gaps = association_gaps(probs, attributes)
    # attribute 0: s=1 rows 0,1 -> mean label0 0.8, label1 0.2; s=0 rows 2,3 -> 0.3, 0.7.
    assert gaps[0].tolist() == pytest.approx([0.5, -0.5])
    # attribute 1: s=1 rows 0,2,3 -> label0 (0.9+0.2+0.4)/3 = 0.5; s=0 row 1 -> 0.7.
    assert gaps[1].tolist() == pytest.approx([0.5 - 0.7, 0.5 - 0.3])
    # A group with no member gives nan, not a division error.
    assert torch.isnan(association_gaps(probs, torch.ones(4, 1))).all()
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 0]], dtype=torch.float64)
    assert data_association_gaps(labels, attributes)[0].tolist() == pytest.approx([0.5, -0.5])


def test_paired_embeddings_keeps_masked_rows_in_order():
    metric = PairedEmbeddings()
    a = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    metric.update(a, a + 10, torch.ones(3, 1), torch.zeros(3, 2), torch.tensor([True, False, True]))
    metric.update(a + 100, a, torch.zeros(3, 1), torch.ones(3, 2))
    image, text, attributes, labels = metric.compute()
    assert image.shape == (5, 2) and image[0].tolist() == [0, 1] and image[1].tolist() == [4, 5]
    assert text[0].tolist() == [10, 11] and attributes[:2, 0].tolist() == [1, 1]
    assert labels[2:].sum() == 6
