"""The sampler at scale (issue 13, item 5): rank-local positions, constant plans stored once,
lazy row reads, and the epoch cap at the end of the planned run. Every check is an equality
with the computation it replaces (no timings here: scripts/bench_sampler_scale.py has them)."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from pipeline.mixing import Compose, Cooldown, Temperature, UniMax, Upweight
from pipeline.mixing.base import MixingStage
from pipeline.mixing.plan import MixturePlan, validate_sizes
from pipeline.sampling.allocation import ExactAllocator, StochasticAllocator
from pipeline.sampling.sampler import MixtureSampler, RankBatchSampler

MODES = ["exact", "stochastic"]


class _KeepSome(MixingStage):
    """Temperature-like probabilities (tau from progress: changes each segment) and a fixed
    keep mask on the first source."""

    def __init__(self, mask, tau=3.0):
        self.mask, self.tau = mask, tau

    def apply(self, sizes, progress, previous):
        names, array = validate_sizes(sizes)
        probs = array ** (1.0 / (self.tau - (self.tau - 1) * progress))
        return MixturePlan(names, probs / probs.sum(), np.ones(len(names)), example_keep={names[0]: self.mask})


def _stage(kind, sizes, tau, switch, seed):
    if kind == "temperature":
        return Compose([Temperature(tau)])
    if kind == "cooldown":
        return Compose([Cooldown(tau, 1, switch), Upweight()])
    mask = np.random.default_rng(seed).random(sizes[0]) < 0.5
    mask[0] = True
    return _KeepSome(mask, tau)


def _sampler(sizes, kind, tau, switch, batch, steps, seed, mode, block=None):
    names = {f"s{i}": n for i, n in enumerate(sizes)}
    sampler = MixtureSampler(_stage(kind, sizes, tau, switch, seed), names, batch, steps, seed, mode)
    if block is not None and mode == "stochastic":
        sampler.allocator.block = block  # many blocks in a short stream
    return sampler


SAMPLERS = dict(
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=10),
    kind=st.sampled_from(["temperature", "cooldown", "keep"]),
    tau=st.floats(1.5, 8),
    switch=st.floats(0.1, 0.9),
    batch=st.integers(1, 24),
    steps=st.integers(1, 25),
    seed=st.integers(0, 2**31),
    mode=st.sampled_from(MODES),
)


@settings(max_examples=60, deadline=None)
@given(**SAMPLERS, start=st.integers(0, 400), length=st.integers(0, 700), data=st.data())
def test_positions_at_equals_the_contiguous_stream(sizes, kind, tau, switch, batch, steps, seed, mode,
                                                   start, length, data):
    sampler = _sampler(sizes, kind, tau, switch, batch, steps, seed, mode, block=37)
    whole = sampler.positions(start, start + length)
    for full, at in zip(whole, sampler.positions_at(np.arange(start, start + length)), strict=True):
        np.testing.assert_array_equal(full, at)
    picked = np.flatnonzero(data.draw(st.lists(st.booleans(), min_size=length, max_size=length)))
    for full, at in zip(whole, sampler.positions_at(start + picked), strict=True):
        np.testing.assert_array_equal(full[picked], at)  # any sorted subset, including gaps


@settings(max_examples=25, deadline=None)
@given(**SAMPLERS)
def test_rank_slices_concatenate_to_the_global_batch(sizes, kind, tau, switch, batch, steps, seed, mode):
    sampler = _sampler(sizes, kind, tau, switch, batch * 24, steps, seed, mode, block=53)
    reference = [sampler.global_batch(step) for step in range(steps + 2)]  # also past the plan
    for world in (1, 2, 3, 8):
        ranks = [list(RankBatchSampler(sampler, r, world, num_steps=steps + 2)) for r in range(world)]
        for step, expected in enumerate(reference):
            merged = [triple for rank in ranks for triple in rank[step]]
            assert merged == [(s, i, step) for s, i in zip(expected.source.tolist(), expected.index.tolist(),
                                                              strict=True)]


@pytest.mark.parametrize("mode", MODES)
def test_a_rank_window_spans_many_steps_and_resumes_anywhere(mode, monkeypatch):
    """Small windows (several per pass) and a start inside one give the same items."""
    sampler = _sampler([900, 80, 7, 3000], "cooldown", 4.0, 0.5, 48, 30, 3, mode, block=61)
    whole = list(RankBatchSampler(sampler, 2, 4, micro_batch_size=4))
    monkeypatch.setattr(RankBatchSampler, "WINDOW_SAMPLES", 50)
    assert list(RankBatchSampler(sampler, 2, 4, micro_batch_size=4)) == whole
    assert list(RankBatchSampler(sampler, 2, 4, micro_batch_size=4, start_step=7)) == whole[7 * 3:]


def test_positions_at_refuses_unsorted_positions():
    sampler = _sampler([10, 20], "temperature", 2.0, 0.5, 4, 5, 0, "exact")
    for bad in ([3, 2], [1, 1], [-1, 4]):
        with pytest.raises(ValueError, match="strictly increasing"):
            sampler.positions_at(np.array(bad))


# -- constant plans are stored once, and nothing of the stream moves ---------------------------

def _unmerged_digest(schedule):
    """The fingerprint as computed before plans were stored once (over the stacked array)."""
    hasher = hashlib.sha256()
    hasher.update("\0".join(schedule.sources).encode())
    hasher.update(schedule.boundaries.tobytes())
    hasher.update(np.ascontiguousarray(schedule.probs).tobytes())
    return hasher.hexdigest()[:16]


def _materialised(schedule):
    """The same schedule with every plan's rows stacked, C-ordered (the representation before
    plans were stored once: `np.stack` of the rows)."""
    schedule.probs = np.stack(list(schedule.probs))
    schedule.loss_weights = np.stack(list(schedule.loss_weights))
    return schedule


LONG_TAIL = {f"src{i:03d}": int(n) for i, n in enumerate(np.exp(np.random.default_rng(4).normal(7, 2.5, 60)) + 1)}


@pytest.mark.parametrize("stage", [Compose([Temperature(3.3)]), Compose([Cooldown(5, 1, 0.4)]),
                                   Compose([Cooldown(7, 1.2, 0.3, shape="linear"), Upweight()])])
@pytest.mark.parametrize("mode", MODES)
def test_stored_once_plans_give_the_same_stream_bit_for_bit(stage, mode):
    sampler = MixtureSampler(stage, LONG_TAIL, 96, 5000, seed=11, mode=mode)
    reference = MixtureSampler(stage, LONG_TAIL, 96, 5000, seed=11, mode=mode)
    _materialised(reference.schedule)
    lengths = np.diff(reference.schedule.boundaries).astype(np.float64)
    np.testing.assert_array_equal(  # the tree's weights, bit for bit
        sampler.schedule.mean_probs(), (reference.schedule.probs[:-1] * lengths[:, None]).sum(0) / lengths.sum())
    reference.allocator = (ExactAllocator(reference.schedule, 96) if mode == "exact"
                           else StochasticAllocator(reference.schedule, 96, 11))
    assert sampler.schedule.digest() == _unmerged_digest(reference.schedule)
    if mode == "exact":
        for node_id, node in sampler.allocator.nodes.items():
            np.testing.assert_array_equal(node.share_left, reference.allocator.nodes[node_id].share_left)
            np.testing.assert_array_equal(sampler.allocator.bases[node_id], reference.allocator.bases[node_id])
    for start, stop in [(0, 20_000), (96 * 4990, 96 * 5010), (96 * 10**6, 96 * 10**6 + 3000)]:
        for ours, theirs in zip(sampler.positions(start, stop), reference.positions(start, stop), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(sampler.draw_counts(123_456), reference.draw_counts(123_456))


def test_a_constant_mixture_holds_one_plan_and_one_row():
    sampler = MixtureSampler(Compose([Temperature(3.3)]), LONG_TAIL, 96, 5000, seed=1)
    schedule = sampler.schedule
    assert schedule.num_segments == 1001 and all(plan is schedule.plans[0] for plan in schedule.plans)
    assert schedule.probs.strides[0] == 0 and schedule.loss_weights.strides[0] == 0  # one row, broadcast
    assert all(node.share_left.strides[0] == 0 for node in sampler.allocator.nodes.values())
    cooled = MixtureSampler(Compose([Cooldown(5, 1, 0.5)]), LONG_TAIL, 96, 5000, seed=1).schedule
    assert cooled.probs.strides[0] != 0 and len({id(plan) for plan in cooled.plans}) == 2  # a step schedule


# -- the epoch cap holds only over the planned run: no step past it -----------------------------

UNIMAX_SIZES = {"a": 50, "b": 200, "c": 5000}


def _unimax_sampler(mode="exact"):
    return MixtureSampler(Compose([UniMax(budget=20 * 32, max_epochs=1.0)]), UNIMAX_SIZES, 32, 20, mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_an_epoch_capping_mixture_refuses_steps_past_the_plan(mode):
    sampler = _unimax_sampler(mode)
    if mode == "exact":  # the cap holds over the plan (to the allocator's rounding)
        cap = np.array(list(UNIMAX_SIZES.values())) + sampler.allocator.error_bound()
        assert (sampler.draw_counts(20) <= cap).all()
    with pytest.raises(ValueError, match="step 20 is past run.total_steps=20"):
        sampler.global_batch(20)
    with pytest.raises(ValueError, match="run.total_steps=20"):
        sampler.positions_at(np.array([20 * 32]))
    with pytest.raises(ValueError, match="run.total_steps=20"):
        list(RankBatchSampler(sampler, num_steps=21))
    assert len(list(RankBatchSampler(sampler, start_step=5))) == 15  # to the end of the plan
    assert list(RankBatchSampler(sampler, start_step=20)) == []  # a resume at the end: no second pass
    uncapped = MixtureSampler(Compose([Temperature(2.0)]), UNIMAX_SIZES, 32, 20)
    assert len(uncapped.global_batch(25).source) == 32  # other mixtures continue with the last plan


def test_trainer_max_steps_past_the_plan_is_refused_at_config_time():
    from pipeline.training.assemble import check_max_steps

    cfg = OmegaConf.create({"run": {"total_steps": 100}, "trainer": {"max_steps": 110},
                            "mixture": {"stages": [{"_target_": "pipeline.mixing.UniMax", "budget": 10}]}})
    with pytest.raises(ValueError, match="trainer.max_steps=110 exceeds run.total_steps=100"):
        check_max_steps(cfg)
    cfg.trainer.max_steps = -1  # Lightning's "no limit"
    with pytest.raises(ValueError, match="trainer.max_steps=-1 exceeds run.total_steps=100"):
        check_max_steps(cfg)
    for max_steps in (100, 50, None):
        cfg.trainer.max_steps = max_steps
        check_max_steps(cfg)
    cfg.trainer.max_steps = 110
    cfg.mixture.stages[0]._target_ = "pipeline.mixing.Temperature"
    check_max_steps(cfg)  # no cap: the last plan may continue


# -- rows through pyarrow, opened on first read ----------------------------------------------------

def test_row_reader_gives_the_rows_datasets_gives_and_opens_lazily(demo_data):
    from pipeline.data.row_reader import RowReader

    _, corpus, _ = demo_data
    names = corpus.source_names
    reader = RowReader(corpus, names)
    assert reader._tables == {}  # nothing opened before a read
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, len(names), int(rng.integers(1, 60)))
        rows = np.array([rng.integers(0, reader.sizes[i]) for i in ids])
        expected = [dict(corpus.dataset(names[i])[int(r)]) for i, r in zip(ids, rows, strict=True)]
        assert reader.read(ids, rows) == expected
    fresh = RowReader(corpus, names)
    mono = [i for i, name in enumerate(names) if corpus.kind(name) == "mono"][:2]
    columns = fresh.read_columns(np.array([mono[1], mono[0], mono[1]]), np.array([2, 0, 1]))
    assert columns["text"] == [corpus.dataset(names[mono[1]])[2]["text"], corpus.dataset(names[mono[0]])[0]["text"],
                               corpus.dataset(names[mono[1]])[1]["text"]]
    assert sorted(fresh._tables) == sorted(mono)  # only the sources read


def test_row_reader_names_an_unreadable_source(demo_data, tmp_path):
    import shutil

    from pipeline.data.corpus import SOURCES_DIR
    from pipeline.data.row_reader import RowReader

    _, corpus, _ = demo_data
    name = corpus.source_names[0]
    copy = tmp_path / "corpus"
    shutil.copytree(corpus.path, copy)
    (copy / SOURCES_DIR / name / "state.json").write_text("{}")

    class Moved:
        path = copy

        def kind(self, n):
            return corpus.kind(n)

        def num_documents(self, n):
            return corpus.num_documents(n)

    reader = RowReader(Moved(), [name])
    with pytest.raises(ValueError, match=f"prepared source .*{name}.* is unreadable"):
        reader.read(np.array([0]), np.array([0]))


def test_stochastic_block_descents_reused_in_any_order_give_the_same_stream(monkeypatch):
    """The allocator keeps its last block descent; reads in any order match fresh samplers."""
    monkeypatch.setattr(StochasticAllocator, "CHUNK", 700)  # several chunks, each of several blocks

    def sampler():
        return _sampler([5000, 700, 650, 90, 12, 3], "cooldown", 5.0, 0.5, 24, 40, 7, "stochastic", block=29)

    reused = sampler()
    for start, stop in [(900, 1400), (0, 300), (2000, 2100), (299, 905), (1399, 2500)]:
        for ours, fresh in zip(reused.positions(start, stop), sampler().positions(start, stop), strict=True):
            np.testing.assert_array_equal(ours, fresh)
        np.testing.assert_array_equal(reused.allocator.counts_at(stop), sampler().allocator.counts_at(stop))
