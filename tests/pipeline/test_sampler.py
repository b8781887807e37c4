import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from pipeline.mixing import Compose, Cooldown, OrderMatters, Temperature, Upweight
from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes
from pipeline.sampling.sampler import MixtureSampler, RankBatchSampler

SIZES = {"eng": 5000, "fra": 700, "deu": 650, "swh": 90, "kab": 12, "fao": 3}


def make(mode="exact", seed=7, batch=24, steps=40, stage=None, sizes=SIZES, **kw):
    stage = stage or Compose([Cooldown(5, 1, 0.5)])
    return MixtureSampler(stage, sizes, global_batch_size=batch, total_steps=steps, seed=seed,
                          mode=mode, **kw)


def stream(sampler, steps):
    return [(b.source.tolist(), b.index.tolist()) for b in map(sampler.global_batch, range(steps))]


def targets_at(sampler, positions):
    """(len(positions), S) expected draws before each stream position."""
    starts = sampler.schedule.boundaries * sampler.global_batch_size
    ends = np.append(starts[1:], np.iinfo(np.int64).max)
    positions = np.asarray(positions)[:, None]
    overlap = np.clip(np.minimum(positions, ends) - starts, 0, None)  # (K, M+1)
    return overlap @ sampler.schedule.probs


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_same_seed_same_stream_and_seed_matters(mode):
    assert stream(make(mode), 30) == stream(make(mode), 30)
    assert stream(make(mode, seed=8), 30) != stream(make(mode), 30)


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_closed_form_counts_match_the_stream(mode):
    sampler = make(mode, steps=50)
    source, _, draw = sampler.positions(0, 50 * 24 + 100)
    for k in [0, 1, 23, 24, 500, 1200, 1300]:
        np.testing.assert_array_equal(sampler.allocator.counts_at(k), np.bincount(source[:k], minlength=6))
    for source_id in range(6):  # each source's draws are numbered 0, 1, 2, ... in order
        np.testing.assert_array_equal(draw[source == source_id], np.arange((source == source_id).sum()))


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_every_epoch_is_a_permutation(mode):
    sampler = make(mode, steps=200)
    source, index, draw = sampler.positions(0, 200 * 24)
    for source_id, size in enumerate(sampler.num_documents):
        picked, draws = index[source == source_id], draw[source == source_id]
        for epoch in range(int(draws.max() // size)):  # complete epochs only
            assert sorted(picked[draws // size == epoch].tolist()) == list(range(size))
    # Different epochs use different orders.
    fao = index[source == 5]
    assert fao[:3].tolist() != fao[3:6].tolist() or fao[3:6].tolist() != fao[6:9].tolist()


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_save_rebuild_load_continues_exactly(mode):
    consumed, more = 11, 9
    first = RankBatchSampler(make(mode), rank=0, world_size=1, micro_batch_size=8)
    iterator = iter(first)
    for _ in range(consumed * 3):  # 3 micro-batches per step
        next(iterator)
    state = first.sampler.state_dict(consumed)
    rebuilt = make(mode)
    step = rebuilt.load_state_dict(state)
    resumed = list(RankBatchSampler(rebuilt, micro_batch_size=8, start_step=step, num_steps=more))
    uninterrupted = list(RankBatchSampler(make(mode), micro_batch_size=8))
    assert resumed == uninterrupted[consumed * 3:(consumed + more) * 3]


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
@pytest.mark.parametrize("old_world, new_world", [(2, 1), (1, 3), (3, 2)])
def test_resume_on_another_world_size_continues_the_global_stream(mode, old_world, new_world):
    sampler = make(mode)
    reference = stream(sampler, 20)

    def global_steps(world, start, count):
        per_rank = [list(RankBatchSampler(sampler, r, world, start_step=start, num_steps=count))
                    for r in range(world)]
        steps = []
        for i in range(count):
            merged = [triple for r in range(world) for triple in per_rank[r][i]]
            assert {t for _, _, t in merged} == {start + i}
            steps.append(([s for s, _, _ in merged], [x for _, x, _ in merged]))
        return steps

    before = global_steps(old_world, 0, 8)
    state = sampler.state_dict(8)
    after = global_steps(new_world, make(mode).load_state_dict(state), 12)
    assert before + after == reference


def test_ranks_get_disjoint_equal_slices():
    sampler = make("exact", batch=48, steps=10)
    for step in range(10):
        slices = [sampler.rank_slice(step, r, 4) for r in range(4)]
        assert {len(s.source) for s in slices} == {12}
        pairs = [(s, d) for sl in slices for s, d in zip(sl.source.tolist(), sl.draw.tolist(), strict=True)]
        assert len(set(pairs)) == 48  # no draw is served to two ranks


def test_exact_prefix_property_within_the_proven_bound():
    """Every prefix is within the allocator's bound of its target; compare Megatron's greedy."""
    sampler = make("exact", batch=32, steps=60, stage=Compose([Cooldown(5, 1, 0.4, shape="linear")]))
    positions = np.arange(60 * 32 + 1)
    source, _, _ = sampler.positions(0, positions[-1])
    counts = np.vstack([np.zeros(6), np.cumsum(np.eye(6)[source], axis=0)])
    deviation = np.abs(counts - targets_at(sampler, positions))
    assert (deviation.max(0) <= sampler.allocator.error_bound() + 1e-9).all()
    assert deviation.max() < 1.0  # below one sample on this long-tailed mix

    # Megatron-style greedy on a constant plan, for reference: ours is no worse by > 0.25.
    plan = Compose([Temperature(3)]).plan(SIZES)
    probs, greedy = plan.sample_probs, np.zeros(6)
    worst_greedy = 0.0
    for k in range(2000):
        greedy[np.argmax(probs * (k + 1) - greedy)] += 1
        worst_greedy = max(worst_greedy, np.abs(greedy - probs * (k + 1)).max())
    constant = make("exact", batch=20, steps=100, stage=Compose([Temperature(3)]))
    src, _, _ = constant.positions(0, 2000)
    ours = np.abs(np.cumsum(np.eye(6)[src], 0) - np.outer(np.arange(1, 2001), probs)).max()
    assert ours <= worst_greedy + 0.25


def test_stochastic_mode_matches_probabilities_statistically():
    sampler = make("stochastic", batch=100, steps=400, stage=Compose([Temperature(2)]))
    counts = sampler.draw_counts(400)
    expected = sampler.plan_at(0).sample_probs * 40_000
    chi2 = (((counts - expected) ** 2) / expected).sum()
    assert chi2 < 25  # 5 dof: p < 1e-4 for a correct sampler to fail


def test_order_matters_phase_one_draws_only_high_resource():
    sampler = make(stage=OrderMatters(switch_at=0.5, high_resource=["eng", "fra"]), steps=20)
    early = sampler.draw_counts(10)
    assert early[2:].sum() == 0 and early.sum() == 240
    assert sampler.draw_counts(20)[2:].sum() > 0


def test_plan_and_loss_weights_follow_the_schedule():
    sampler = make(stage=Compose([Cooldown(5, 1, 0.5), Upweight()]), steps=40)
    assert sampler.plan_at(19).weight("fao") > 1 and sampler.plan_at(20).weight("fao") == pytest.approx(1)
    assert 20 in sampler.schedule.boundaries.tolist()


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_resume_from_step_only_is_fast_at_a_million_steps(mode):
    rng = np.random.default_rng(0)
    sizes = {f"src{i:03d}": int(n) for i, n in enumerate(np.exp(rng.normal(8, 2.5, 100)) + 1)}
    sampler = MixtureSampler(Compose([Cooldown(5, 1, 0.5, shape="cosine")]), sizes,
                             global_batch_size=512, total_steps=10**6, seed=1, mode=mode)
    started = time.perf_counter()
    counts = sampler.draw_counts(10**6 - 3)
    batch = sampler.global_batch(10**6 - 3)
    elapsed = time.perf_counter() - started
    assert counts.sum() == (10**6 - 3) * 512 and len(batch.source) == 512
    assert elapsed < 1.0, f"resume took {elapsed:.2f}s"


class _PairDataset(Dataset):
    def __getitem__(self, triple):
        return torch.tensor(triple)


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_dataloader_workers_do_not_change_the_stream(mode):
    def collect(workers):
        batches = RankBatchSampler(make(mode), rank=1, world_size=2, micro_batch_size=4, num_steps=6)
        loader = DataLoader(_PairDataset(), batch_sampler=batches, num_workers=workers,
                            collate_fn=torch.stack, prefetch_factor=3 if workers else None)
        return [b.tolist() for b in loader]

    assert collect(0) == collect(2)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="not divisible by world size 5"):
        make().rank_slice(0, 0, 5)
    with pytest.raises(ValueError, match="loader.micro_batch_size=5"):
        RankBatchSampler(make(), micro_batch_size=5)
    with pytest.raises(ValueError, match="mode"):
        make(mode="greedy")
    with pytest.raises(ValueError, match="'fao' has zero documents"):
        make(sizes={**SIZES, "fao": 0})
    state = make().state_dict(5)
    with pytest.raises(ValueError, match="fingerprint"):
        make(seed=99).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        make(batch=48).load_state_dict(state)
    with pytest.raises(ValueError, match="missing key 'step'"):
        make().load_state_dict({"fingerprint": "x", "sources": []})


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=12),
    tau=st.floats(0.5, 10),
    switch=st.floats(0.1, 0.9),
    batch=st.integers(1, 17),
    steps=st.integers(1, 30),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(["exact", "stochastic"]),
    split=st.integers(0, 30),
)
def test_properties(sizes, tau, switch, batch, steps, seed, mode, split):
    names = {f"s{i}": n for i, n in enumerate(sizes)}
    sampler = MixtureSampler(Compose([Cooldown(tau, 1, switch)]), names, batch, steps, seed, mode)
    split = min(split, steps)
    whole = sampler.positions(0, steps * batch)
    first, second = sampler.positions(0, split * batch), sampler.positions(split * batch, steps * batch)
    for full, a, b in zip(whole, first, second, strict=True):
        np.testing.assert_array_equal(full, np.concatenate([a, b]))  # any split, same stream
    source, index, draw = whole
    assert (index >= 0).all() and (index < sampler.num_documents[source]).all()
    np.testing.assert_array_equal(sampler.draw_counts(steps), np.bincount(source, minlength=len(sizes)))
    if mode == "exact":
        positions = np.arange(steps * batch + 1)
        counts = np.vstack([np.zeros(len(sizes)), np.cumsum(np.eye(len(sizes))[source], 0)])
        deviation = np.abs(counts - targets_at(sampler, positions)).max(0)
        assert (deviation <= sampler.allocator.error_bound() + 1e-9).all()


def test_stochastic_chunks_blocks_and_tail_agree_with_the_stream(monkeypatch):
    from pipeline.sampling.allocation import StochasticAllocator

    monkeypatch.setattr(StochasticAllocator, "CHUNK", 1000)  # many chunks, also in the tail
    sampler = make("stochastic", batch=24, steps=40)
    sampler.allocator.block = 50
    total = 24 * 40 + 3000  # 3000 positions past the planned run
    source, _, draw = sampler.positions(0, total)
    for k in [0, 49, 50, 51, 960, 999, 1000, 1001, 2500, 3959, total]:
        np.testing.assert_array_equal(sampler.allocator.counts_at(k), np.bincount(source[:k], minlength=6))
    for source_id in range(6):
        np.testing.assert_array_equal(draw[source == source_id], np.arange((source == source_id).sum()))
    fresh = make("stochastic", batch=24, steps=40)
    fresh.allocator.block = 50
    np.testing.assert_array_equal(fresh.positions(2500, 2600)[0], source[2500:2600])


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_resume_far_past_the_planned_run_is_fast(mode):
    sampler = MixtureSampler(Compose([Cooldown()]), SIZES, global_batch_size=1024, total_steps=10**6,
                             seed=2, mode=mode)
    started = time.perf_counter()
    counts = sampler.draw_counts(2 * 10**7)
    assert counts.sum() == 2 * 10**7 * 1024
    assert time.perf_counter() - started < 1.0


# -- the plan's example_keep (M4 subsample) ---------------------------------------------------

class _Keep(MixingStage):
    """A hand-made plan: proportional probabilities and a keep mask per listed source."""

    def __init__(self, keep):
        self.keep = keep

    def apply(self, sizes, progress, previous):
        names, array = validate_sizes(sizes)
        return MixturePlan(names, array / array.sum(), np.ones(len(names)), example_keep=self.keep)


KEEP_SIZES = {"big": 100, "other": 30}
KEPT = np.array([3, 7, 11, 19, 42, 43, 58, 71, 88, 99])  # 10 of 100


def _mask(n=100, kept=KEPT):
    mask = np.zeros(n, bool)
    mask[kept] = True
    return mask


def _keep_stages():
    from pipeline.balance.m4 import M4

    q = _mask().astype(float)  # q in {0, 1}: the seeded Bernoulli draw keeps exactly KEPT
    return {"hand-made": _Keep({"big": _mask()}),
            "M4 stage": Compose([Temperature(3.0), M4({"big": q}, mode="subsample", seed=5)])}


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
@pytest.mark.parametrize("stage", ["hand-made", "M4 stage"])
def test_example_keep_is_honoured_over_several_epochs(mode, stage):
    sampler = make(mode, batch=16, steps=30, stage=_keep_stages()[stage], sizes=KEEP_SIZES)
    source, index, draw = sampler.positions(0, 30 * 16)
    big = index[source == 0]
    assert big.size >= 5 * KEPT.size  # several passes over the kept examples
    assert set(big.tolist()) == set(KEPT.tolist())  # never a dropped example; every kept one
    # Each pass over the kept examples is a permutation of them.
    draws = draw[source == 0]
    for epoch in range(int(draws.max() // KEPT.size)):
        assert sorted(big[draws // KEPT.size == epoch].tolist()) == KEPT.tolist()
    assert sampler.num_documents.tolist() == [10, 30]  # what a pass is: the kept examples
    assert sampler.total_documents.tolist() == [100, 30]
    assert sampler.epochs(30)["big"] == pytest.approx(big.size / 10)
    other = index[source == 1]
    assert set(other.tolist()) == set(range(30))


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_example_keep_stream_resumes_and_is_world_size_independent(mode):
    def build():
        return make(mode, batch=12, steps=20, stage=_Keep({"big": _mask()}), sizes=KEEP_SIZES)

    reference = stream(build(), 20)
    for world in (1, 2, 3):
        sampler = build()
        step = build().load_state_dict(sampler.state_dict(7))
        merged = []
        for s in range(step, 20):
            slices = [sampler.rank_slice(s, r, world) for r in range(world)]
            merged.append(([x for sl in slices for x in sl.source.tolist()],
                           [x for sl in slices for x in sl.index.tolist()]))
        assert merged == reference[7:]
    # Another mask is another stream: a checkpoint of one does not resume the other.
    other = make(mode, batch=12, steps=20, stage=_Keep({"big": _mask(kept=np.append(KEPT[1:], 4))}),
                 sizes=KEEP_SIZES)
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(build().state_dict(3))


def test_example_keep_must_fit_the_source():
    with pytest.raises(ValueError, match="example_keep for source 'big' has 99 entries"):
        make(stage=_Keep({"big": _mask(99, KEPT[:-1])}), sizes=KEEP_SIZES)
    with pytest.raises(ValueError, match="keeps no example"):
        make(stage=_Keep({"big": np.zeros(100, bool)}), sizes=KEEP_SIZES)
    with pytest.raises(ValueError, match="unknown source"):
        make(stage=_Keep({"nope": _mask()}), sizes=KEEP_SIZES)

    class Changing(MixingStage):  # a mask that changes mid-run cannot keep a closed-form stream
        def apply(self, sizes, progress, previous):
            names, array = validate_sizes(sizes)
            kept = KEPT if progress < 0.5 else KEPT[:5]
            return MixturePlan(names, array / array.sum(), np.ones(len(names)), example_keep={"big": _mask(kept=kept)})

        def breakpoints(self):
            return (0.5,)

    with pytest.raises(ValueError, match="example_keep changes"):
        make(stage=Changing(), sizes=KEEP_SIZES)
