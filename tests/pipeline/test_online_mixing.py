"""Online mixing (`mixture=online_bandit`): the ODM bandit, its plan history and exact resume.

* Controller maths: the Exp3/ODM probabilities, the exploration floor, smoothing, excess loss,
  determinism (same observations -> the same bits).
* Sampler with a history: before the first update the stream is a static sampler's; decisions
  only append (earlier positions never move); a step whose plan is undecided raises.
* Resume: a saved history replays at world sizes 1, 2 and 3 (sampler level, the same fake
  losses fed at every world size): same stream and same later decisions; one process of real
  training (experiment=demo): 4 steps + resume (mid-window: the open window's partial sums
  are restored) equals 10 steps in losses, stream, logged probabilities and plan history.
  A 2-process training run is not in this file (too slow on 2 busy cores).
* The lag: a loader with workers stays within it, or raises PlanNotDecidedError.
* Ranks with different local losses agree: two gloo processes reduce different local sums.
* Bad input raises a named ValueError.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.mixing import Compose, MixingStage, MixturePlan, Temperature, Upweight
from pipeline.mixing.online import OnlineBandit, PlanNotDecidedError
from pipeline.mixing.report import build_report, format_report
from pipeline.mixing.schedule import OnlineSchedule, make_schedule
from pipeline.models.data_accounting import reduce_source_losses
from pipeline.sampling.sampler import MixtureSampler, RankBatchSampler

# pipeline.train, pipeline.data and pipeline.training are imported inside the tests that use
# them: the gloo test's spawned processes import this module, and those imports cost seconds.
DOCS = {"big": 900, "mid": 300, "small": 40, "tiny": 7}
NAMES = tuple(DOCS)


def _losses_at(step: int) -> tuple[np.ndarray, np.ndarray]:
    """Fake all-reduced (loss sums, token counts) of a step: a function of the step only."""
    rng = np.random.default_rng(1000 + step)
    counts = rng.integers(0, 40, len(DOCS)).astype(np.float64)
    return counts * rng.uniform(2.0, 8.0, len(DOCS)), counts


# -- controller maths ----------------------------------------------------------------------------
def test_probs_are_exp_weights_mixed_with_a_uniform_floor():
    bandit = OnlineBandit(lr=0.5, exploration=0.2)
    prior = np.array([0.5, 0.3, 0.2])
    rewards = np.array([1.0, 4.0, 2.0])
    expected_exp = prior * np.exp(0.5 * rewards)
    expected = 0.8 * expected_exp / expected_exp.sum() + 0.2 / 3
    probs = bandit.probs(prior, rewards)
    np.testing.assert_allclose(probs, expected, rtol=1e-14)
    assert probs.sum() == pytest.approx(1.0, abs=1e-15)
    # Floor: however large one reward, every source keeps gamma / S.
    extreme = bandit.probs(prior, np.array([0.0, 1e4, 0.0]))
    assert extreme.min() >= 0.2 / 3 - 1e-15 and extreme[1] == pytest.approx(0.8 + 0.2 / 3)
    # exploration = 1 is uniform; no rewards is the prior mixed with the floor.
    np.testing.assert_allclose(OnlineBandit(exploration=1.0).probs(prior, rewards), np.full(3, 1 / 3))
    np.testing.assert_allclose(bandit.probs(prior, np.zeros(3)), 0.8 * prior + 0.2 / 3)


def test_update_smooths_observed_sources_and_keeps_unobserved_ones():
    bandit = OnlineBandit(smoothing=0.75)
    names = ("a", "b", "c")
    state = bandit.initial_state(3)
    state = bandit.update(state, names, np.array([10.0, 0.0, 6.0]), np.array([2.0, 0.0, 3.0]))
    np.testing.assert_array_equal(state.rewards, [5.0, 0.0, 2.0])  # the first observation sets it
    np.testing.assert_array_equal(state.observed, [True, False, True])
    state = bandit.update(state, names, np.array([3.0, 8.0, 0.0]), np.array([1.0, 2.0, 0.0]))
    np.testing.assert_array_equal(state.rewards, [0.75 * 5 + 0.25 * 3, 4.0, 2.0])
    # DoReMi-style excess loss: max(loss - reference, 0).
    excess = OnlineBandit(smoothing=0.0, reference_losses={"a": 4.0, "b": 1.0, "c": 9.0})
    state = excess.update(excess.initial_state(3), names, np.array([10.0, 4.0, 6.0]), np.array([2.0, 2.0, 3.0]))
    np.testing.assert_array_equal(state.rewards, [1.0, 1.0, 0.0])


def test_higher_loss_sources_gain_probability_and_replays_are_bitwise_deterministic():
    def run() -> list[np.ndarray]:
        schedule = make_schedule(Compose([Temperature(2.0), OnlineBandit(lr=1.0, update_every=3)]), DOCS, 60)
        out = []
        for step in range(30):
            sums, counts = np.full(4, 30.0), np.full(4, 10.0)
            sums[3] = 60.0  # "tiny" is twice as hard
            decision = schedule.observe(step, sums, counts)
            if decision is not None:
                out.append(decision.probs)
        return out

    first, second = run(), run()
    assert len(first) == 10
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert first[-1][3] > 2 * first[-1][2]  # the hard source is drawn more than a same-sized-prior one


# -- the sampler with a plan history -------------------------------------------------------------
class FixedPlan(MixingStage):
    def __init__(self, plan: MixturePlan):
        self.fixed = plan

    def apply(self, sizes, progress, previous):
        return self.fixed


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_stream_before_the_first_update_is_the_static_samplers_and_decisions_only_append(mode):
    stage = Compose([Temperature(3.0), OnlineBandit(update_every=4, lag_windows=2)])
    online = MixtureSampler(stage, DOCS, 12, 40, seed=5, mode=mode)
    initial = online.plan_at(0)
    static = MixtureSampler(FixedPlan(initial), DOCS, 12, 40, seed=5, mode=mode, update_steps=4)
    first_update = (1 + 2) * 4
    assert online.decided_steps == first_update
    for step in range(first_update):
        a, b = online.global_batch(step), static.global_batch(step)
        assert np.array_equal(a.source, b.source) and np.array_equal(a.index, b.index), step
    before = [online.global_batch(t) for t in range(first_update)]
    for step in range(16):
        online.observe_losses(step, *_losses_at(step))
    assert online.decided_steps == first_update + 4 * 4
    for step, batch in enumerate(before):  # appended segments never move an earlier position
        assert np.array_equal(online.global_batch(step).index, batch.index)
    assert not np.array_equal(online.plan_at(first_update).sample_probs, initial.sample_probs)


def test_reading_an_undecided_step_raises_rather_than_guessing():
    sampler = MixtureSampler(Compose([OnlineBandit(update_every=3, lag_windows=1)]), DOCS, 8, 30, seed=1)
    assert sampler.decided_steps == 6
    with pytest.raises(PlanNotDecidedError, match="step 6 is not decided"):
        sampler.global_batch(6)
    with pytest.raises(PlanNotDecidedError):
        sampler.plan_at(6)
    with pytest.raises(PlanNotDecidedError):
        sampler.draw_counts(7)
    batches = iter(RankBatchSampler(sampler, 0, 2, micro_batch_size=2))
    consumed = [next(batches) for _ in range(6 * 2)]  # 6 steps x 2 micro-batches
    assert consumed[-1][0][2] == 5
    with pytest.raises(PlanNotDecidedError, match="asked for step 6"):
        next(batches)
    # Once the controller decides, the same iterator continues.
    batches = iter(RankBatchSampler(sampler, 0, 2, micro_batch_size=2, start_step=6))
    for step in range(3):
        sampler.observe_losses(step, *_losses_at(step))
    assert next(batches)[0][2] == 6
    with pytest.raises(ValueError, match="expected the losses of step 3, got step 5"):
        sampler.observe_losses(5, *_losses_at(5))


def test_the_lag_must_exceed_what_the_loader_prefetches():
    from pipeline.data.datamodule import check_online_lag, loader_lookahead

    sampler = MixtureSampler(Compose([OnlineBandit(update_every=2, lag_windows=1)]), DOCS, 8, 30)
    check_online_lag(sampler, accumulation=1, num_workers=0)  # 2 >= 1
    check_online_lag(sampler, accumulation=4, num_workers=2)  # 8 >= 5
    assert loader_lookahead(0) == 1 and loader_lookahead(4) == 9
    with pytest.raises(ValueError, match="online mixing lag too short"):
        check_online_lag(sampler, accumulation=1, num_workers=2)
    check_online_lag(MixtureSampler(Temperature(2.0), DOCS, 8, 30), accumulation=1, num_workers=8)  # static


class _Items(torch.utils.data.Dataset):
    def __getitem__(self, item):
        return item


def _first(items):
    return items


@pytest.mark.parametrize(("update_every", "raises"), [(3, False), (1, True)])
def test_a_loader_with_workers_stays_within_the_lag_or_raises(update_every, raises):
    """Two workers prefetch 4 micro-batches; accumulation 2. update_every=3 (slack 6 >= 5)
    passes the check and never reads an undecided step; update_every=1 (slack 2) fails the
    check, and the loader, run anyway, hits PlanNotDecidedError instead of guessing."""
    from pipeline.data.datamodule import check_online_lag

    sampler = MixtureSampler(Compose([OnlineBandit(update_every=update_every, lag_windows=1)]), DOCS, 8, 12)
    batches = RankBatchSampler(sampler, 0, 1, micro_batch_size=4)
    if raises:
        with pytest.raises(ValueError, match="lag too short"):
            check_online_lag(sampler, batches.accumulation, num_workers=2)
    else:
        check_online_lag(sampler, batches.accumulation, num_workers=2)
    loader = torch.utils.data.DataLoader(_Items(), batch_sampler=batches, collate_fn=_first, num_workers=2,
                                         multiprocessing_context="fork")
    seen = []

    def consume():
        for number, micro in enumerate(loader):
            seen.append(micro[0][2])
            if (number + 1) % batches.accumulation == 0:  # the step's optimizer step, then the controller
                sampler.observe_losses(micro[0][2], *_losses_at(micro[0][2]))

    if raises:
        with pytest.raises(PlanNotDecidedError):
            consume()
    else:
        consume()
        assert seen == [step for step in range(12) for _ in range(2)]


@pytest.mark.parametrize("mode", ["exact", "stochastic"])
def test_resume_at_another_world_size_replays_the_history_exactly(mode):
    """Uninterrupted at world size 1 vs checkpoint at step 14 then world sizes 1, 2, 3: the
    concatenated rank slices equal the global batches, and later decisions are identical."""
    stage = Compose([Upweight(tau=3.0), OnlineBandit(lr=0.8, exploration=0.15, update_every=3, lag_windows=1)])
    total, save_at, batch = 36, 14, 12

    def make():
        return MixtureSampler(stage, DOCS, batch, total, seed=9, mode=mode)

    full = make()
    stream, checkpoint = [], None
    for step in range(total):
        if step == save_at:
            checkpoint = json.loads(json.dumps(full.state_dict(step)))  # as plain data, exactly
        stream.append(full.global_batch(step))
        full.observe_losses(step, *_losses_at(step))
    assert len(full.schedule.decisions) == total // 3
    for world in (1, 2, 3):
        resumed = make()
        assert resumed.load_state_dict(checkpoint) == save_at
        assert len(resumed.schedule.decisions) == save_at // 3
        for step in range(save_at, total):
            slices = [resumed.rank_slice(step, rank, world) for rank in range(world)]
            assert np.array_equal(np.concatenate([s.index for s in slices]), stream[step].index), (world, step)
            assert np.array_equal(np.concatenate([s.source for s in slices]), stream[step].source)
            resumed.observe_losses(step, *_losses_at(step))
        assert resumed.state_dict(total)["plan_history"] == full.state_dict(total)["plan_history"]
        assert resumed.fingerprint == full.fingerprint


def test_a_tampered_or_foreign_history_is_refused():
    sampler = MixtureSampler(Compose([OnlineBandit(update_every=2)]), DOCS, 8, 20)
    for step in range(6):
        sampler.observe_losses(step, *_losses_at(step))
    state = json.loads(json.dumps(sampler.state_dict(6)))
    state["plan_history"]["decisions"][1]["probs"][0] += 1e-12
    with pytest.raises(ValueError, match="replaying decision 1 gives other probabilities"):
        MixtureSampler(Compose([OnlineBandit(update_every=2)]), DOCS, 8, 20).load_state_dict(state)
    state = sampler.state_dict(6)
    with pytest.raises(ValueError, match="observed 6 steps but the checkpoint is at step 4"):
        MixtureSampler(Compose([OnlineBandit(update_every=2)]), DOCS, 8, 20).load_state_dict({**state, "step": 4})
    with pytest.raises(ValueError, match="fingerprint"):  # another controller is another stream
        MixtureSampler(Compose([OnlineBandit(update_every=2, lr=2.0)]), DOCS, 8, 20).load_state_dict(state)


def test_the_report_shows_the_initial_plan_and_says_it_adapts():
    sampler = MixtureSampler(Compose([Temperature(5.0), OnlineBandit(update_every=10)]), DOCS, 16, 100)
    report = build_report(sampler)
    text = format_report(report)
    assert "ADAPTIVE" in text and "every 10 steps" in text and "first applied at step 20" in text
    np.testing.assert_allclose(report.phases[0].probs_start, sampler.plan_at(0).sample_probs)
    assert report.expected_draws.sum() == pytest.approx(1600)
    assert isinstance(sampler.schedule, OnlineSchedule)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0.0}, "controller learning rate"),
    ({"lr": -1.0}, "controller learning rate"),
    ({"lr": float("nan")}, "controller learning rate"),
    ({"exploration": 0.0}, r"exploration must be in \(0, 1\]"),
    ({"exploration": 1.5}, r"exploration must be in \(0, 1\]"),
    ({"update_every": 0}, "update_every must be an integer >= 1"),
    ({"update_every": 2.5}, "update_every must be an integer >= 1"),
    ({"lag_windows": 0}, "lag_windows must be an integer >= 1"),
    ({"smoothing": 1.0}, r"smoothing must be in \[0, 1\)"),
    ({"reference_losses": {"big": float("inf")}}, "reference loss of source 'big'"),
    ({"max_epochs": 0.0}, "max_epochs must be a finite number > 0"),
])
def test_bad_controller_parameters_raise_named_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OnlineBandit(**kwargs)


def test_bad_composition_and_observations_raise_named_errors():
    with pytest.raises(ValueError, match="must be the last mixing stage"):
        MixtureSampler(Compose([OnlineBandit(), Temperature(2.0)]), DOCS, 8, 20)
    with pytest.raises(ValueError, match="no value for source 'mid'"):
        MixtureSampler(Compose([OnlineBandit(reference_losses={"big": 1, "small": 1, "tiny": 1})]), DOCS, 8, 20)
    with pytest.raises(ValueError, match="unknown source 'xx'"):
        MixtureSampler(Compose([OnlineBandit(reference_losses={**dict.fromkeys(DOCS, 1.0), "xx": 1})]), DOCS, 8, 20)
    sampler = MixtureSampler(Compose([OnlineBandit(update_every=1)]), DOCS, 8, 20)
    with pytest.raises(ValueError, match="source 'mid' is not finite"):
        sampler.observe_losses(0, np.array([1.0, np.nan, 1.0, 1.0]), np.ones(4))
    with pytest.raises(ValueError, match="needs an online mixture"):
        MixtureSampler(Temperature(2.0), DOCS, 8, 20).observe_losses(0, np.ones(4), np.ones(4))


def test_allow_mismatch_cannot_restart_an_online_history_on_another_stream():
    from types import SimpleNamespace

    from pipeline.data.datamodule import MixtureDataModule

    sampler = MixtureSampler(Compose([OnlineBandit(update_every=2)]), DOCS, 8, 20)
    module = SimpleNamespace(restart_stream_on_load=True, sampler=sampler, start_step=0)
    with pytest.raises(ValueError, match="cannot restart an online mixture"):
        MixtureDataModule.load_state_dict(module, {"sampler": {"step": 4}})


# -- ranks with different local losses agree -----------------------------------------------------
def _agree_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        sampler = MixtureSampler(Compose([OnlineBandit(lr=2.0, update_every=2)]), DOCS, 8, 20, seed=3)
        rng = np.random.default_rng(rank)  # every rank sees other local losses
        for step in range(6):
            local = torch.zeros(2, len(DOCS), dtype=torch.float64)
            local[1] = torch.from_numpy(rng.integers(1, 30, len(DOCS)).astype(np.float64))
            local[0] = local[1] * torch.from_numpy(rng.uniform(1.0, 9.0, len(DOCS)) * (1 + 1e-9 * rank))
            sums, counts = reduce_source_losses(local)
            sampler.observe_losses(step, sums, counts)
        history = sampler.state_dict(6)["plan_history"]
        stream = [sampler.global_batch(t).index.tolist() for t in range(sampler.decided_steps)]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"history": history, "stream": stream}))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_with_different_local_losses_agree_on_the_plan(tmp_path):
    mp.start_processes(_agree_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert len(ranks[0]["history"]["decisions"]) == 3
    # The reduced sums are the sum of both ranks' local sums, not one rank's.
    counts = np.array(ranks[0]["history"]["decisions"][0]["token_counts"])
    assert (counts >= 2).all()


def test_reduce_source_losses_without_a_process_group_is_the_identity():
    local = torch.tensor([[3.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    sums, counts = reduce_source_losses(local)
    np.testing.assert_array_equal(sums, [3.0, 0.0])
    np.testing.assert_array_equal(counts, [2.0, 0.0])


# -- training: one process, exact resume -------------------------------------------------------
WINDOW, TOTAL, HALF = 3, 10, 4  # the checkpoint at step 4 is mid-window (window 1 = steps 3..5)
RUN = ["experiment=demo", "mixture=online_bandit", f"mixture.stages.0.update_every={WINDOW}",
       "mixture.stages.0.lr=20.0", f"run.total_steps={TOTAL}", "run.global_batch_size=8",
       "loader.micro_batch_size=4", "logger=csv", "trainer.enable_progress_bar=false", "progress=false",
       "trainer.log_every_n_steps=1", f"checkpoint.every_n_steps={HALF}", "validation.documents_per_source=1",
       "evaluation.every_n_steps=null", "model.schedule.warmup_steps=2", "record_consumed=true"]


def _run(compose_config, demo_data, out: Path, *overrides: str) -> dict:
    from pipeline.train import train

    return train(compose_config([*RUN, f"cache_dir={demo_data[0].cache_dir}", f"output_dir={out}", *overrides]))


def _metric(out: Path, key: str) -> list[float]:
    values = []
    for version in sorted((out / "csv").glob("version_*")):
        with open(version / "metrics.csv", newline="") as stream:
            values += [float(row[key]) for row in csv.DictReader(stream) if row.get(key)]
    return values


def _history(checkpoint: Path) -> dict:
    def find(node):
        if isinstance(node, dict):
            if "plan_history" in node:
                return node["plan_history"]
            for value in node.values():
                found = find(value)
                if found is not None:
                    return found
        return None

    return find(torch.load(checkpoint, map_location="cpu", weights_only=False))


def test_resumed_training_repeats_the_stream_and_the_controller_updates(compose_config, demo_data, tmp_path,
                                                                        one_thread):
    from pipeline.training.callbacks import read_consumed

    full = tmp_path / "full"
    record = _run(compose_config, demo_data, full)
    assert record["global_steps"] == TOTAL
    halves = tmp_path / "halves"
    _run(compose_config, demo_data, halves, f"+trainer.max_steps={HALF}")
    saved = _history(halves / "checkpoints" / f"step{HALF:06d}.ckpt")
    assert len(saved["decisions"]) == HALF // WINDOW and saved["pending"]["steps"] == HALF % WINDOW == 1
    second = _run(compose_config, demo_data, halves, "ckpt_path=last")
    assert second["global_steps"] == TOTAL and second["status"] == "completed"

    assert _metric(halves, "train/loss") == _metric(full, "train/loss")  # bit for bit
    assert read_consumed(halves / "consumed") == read_consumed(full / "consumed")
    final = f"step{TOTAL:06d}.ckpt"
    want, got = _history(full / "checkpoints" / final), _history(halves / "checkpoints" / final)
    assert got == want and len(want["decisions"]) == TOTAL // WINDOW
    # The controller moved the plan (logged as data/prob over time), identically in both runs.
    key = "data/prob/lang=eng"
    assert _metric(halves, key) == _metric(full, key)
    probs = _metric(full, key)
    assert len(set(probs)) > 1 and probs[0] == pytest.approx(1 / 37)


# -- training: two processes, then a resume at one --------------------------------------------
def _train_process(out: Path, cache: str, devices: int, *extra: str) -> None:
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pipeline.train", *RUN, "run.total_steps=6", "mixture.stages.0.update_every=1",
               "loader.micro_batch_size=2", "checkpoint.every_n_steps=3", f"cache_dir={cache}", f"output_dir={out}",
               f"hydra.run.dir={out / 'hydra'}", f"trainer.devices={devices}",
               f"strategy={'ddp' if devices > 1 else 'single'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("MASTER_PORT", None)
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_agree_and_a_resume_at_one_rank_replays_their_history(demo_data, tmp_path):
    """DDP on 2 processes (each rank sees other local losses) for 3 steps, then resumed on 1.

    Both ranks' consumed slices, concatenated, are the global batches a fresh sampler computes
    from rank 0's saved history (so both ranks followed the same plan); the resumed run keeps
    the 2-process decisions bit for bit and its own stream is the history's stream."""
    from pipeline.config.compose import compose_config
    from pipeline.config.data import datamodule_from_config
    from pipeline.training.callbacks import read_consumed

    out, cache = tmp_path / "run", demo_data[0].cache_dir
    _train_process(out, cache, 2, "+trainer.max_steps=3")
    saved = _history(out / "checkpoints" / "step000003.ckpt")
    assert len(saved["decisions"]) == 3
    _train_process(out, cache, 1, "ckpt_path=last")
    final = _history(out / "checkpoints" / "step000006.ckpt")
    assert final["decisions"][:3] == saved["decisions"]
    cfg = compose_config([*RUN, "run.total_steps=6", "mixture.stages.0.update_every=1", f"cache_dir={cache}"])
    sampler = datamodule_from_config(cfg, demo_data[1], demo_data[2]).sampler
    assert sampler.load_state_dict({"step": 6, "fingerprint": sampler.fingerprint, "sources": list(sampler.sources),
                                    "plan_history": final}) == 6
    expected = [(t, sampler.sources[s], i) for t in range(6)
                for s, i in zip(sampler.global_batch(t).source.tolist(), sampler.global_batch(t).index.tolist(),
                                strict=True)]
    assert read_consumed(out / "consumed") == expected


def test_the_epoch_cap_bounds_the_draws_of_hard_small_sources():
    """"tiny" (7 documents) has the highest loss: uncapped, the bandit draws it for ~40 epochs;
    with max_epochs=3 its planned draws stay within 3 x 7 (the exact allocator keeps the actual
    draws within one of the plan), the others take the excess, and a replay gives the same bits."""
    def run(max_epochs):
        sampler = MixtureSampler(Compose([OnlineBandit(lr=3.0, update_every=2, max_epochs=max_epochs)]),
                                 DOCS, 8, 40, seed=2)
        for step in range(40):
            counts = np.full(4, 10.0)
            sampler.observe_losses(step, counts * np.array([2.0, 2.0, 3.0, 6.0]), counts)
        return sampler

    free, capped = run(None), run(3.0)
    assert free.draw_counts(40)[3] > 10 * 7
    counts = capped.draw_counts(40)
    assert counts[3] <= 3 * 7 + 1 and counts.sum() == 8 * 40
    assert np.allclose(capped.schedule.probs.sum(1), 1.0)
    replayed = MixtureSampler(Compose([OnlineBandit(lr=3.0, update_every=2, max_epochs=3.0)]), DOCS, 8, 40, seed=2)
    replayed.load_state_dict(capped.state_dict(40))
    assert np.array_equal(replayed.schedule.probs, capped.schedule.probs)
    np.testing.assert_allclose(OnlineBandit().capped(np.array([0.7, 0.2, 0.1]), np.array([0.3, 1.0, 1.0])),
                               [0.3, 0.2 + 0.4 * 2 / 3, 0.1 + 0.4 / 3])
    np.testing.assert_array_equal(OnlineBandit().capped(np.array([0.5, 0.5]), np.array([0.2, 0.2])), [0.5, 0.5])
