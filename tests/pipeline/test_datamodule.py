import numpy as np
import pytest
import torch

from pipeline.config.data import datamodule_from_config
from pipeline.data.datamodule import MixtureDataModule, select_sources
from pipeline.data.split import SourceSplit
from pipeline.data.text_rows import (
    IGNORE_INDEX,
    PADDING_STEP,
    MixtureCollator,
    MixtureDataset,
    num_targets,
)
from pipeline.mixing import Compose, Cooldown, Upweight
from pipeline.sampling.sampler import MixtureSampler


def _module(demo_data, kinds=("mono",), stage=None, pack=False, workers=0, micro=8):
    _, corpus, tokenizer = demo_data
    names = select_sources(corpus, kinds)
    split = SourceSplit({n: corpus.num_documents(n) for n in names}, val_documents=4)
    sampler = MixtureSampler(stage or Compose([Cooldown(5, 1, 0.5), Upweight()]),
                             split.train, global_batch_size=16, total_steps=10, seed=3)
    return MixtureDataModule(corpus, tokenizer, sampler, split, micro_batch_size=micro, max_length=48,
                             pack=pack, num_workers=workers)


def test_batches_carry_sources_weights_and_shifted_targets(demo_data):
    module = _module(demo_data)
    batch = next(iter(module.train_dataloader()))
    b, t = batch["input_ids"].shape
    assert b == 8 and t <= 47
    for key in ("labels", "token_weights", "token_source_ids", "attention_mask"):
        assert batch[key].shape == (b, t)
    targets = batch["labels"] != IGNORE_INDEX
    # Weights live exactly on target tokens and equal the plan's weight of the row's source.
    assert ((batch["token_weights"] > 0) == targets).all()
    plan = module.sampler.plan_at(0)
    for row in range(b):
        expected = plan.loss_weights[int(batch["source_ids"][row])]
        assert torch.allclose(batch["token_weights"][row][targets[row]], torch.tensor(expected, dtype=torch.float))
    # Labels are the next input token (where that token is inside the row) and rows end in eos.
    inside = targets[:, :-1] & batch["attention_mask"][:, 1:].bool()
    assert torch.equal(batch["labels"][:, :-1][inside], batch["input_ids"][:, 1:][inside])
    last = batch["attention_mask"].sum(1) - 1
    assert (batch["labels"][torch.arange(b), last] == demo_data[2].eos_id).all()
    assert batch["num_target_tokens"] == targets.sum()


def test_rows_match_the_sampler_and_the_source_text(demo_data):
    module = _module(demo_data)
    _, corpus, tokenizer = demo_data
    batch = next(iter(module.train_dataloader()))
    expected = module.sampler.rank_slice(0, 0, 1)
    assert batch["source_ids"].tolist() == expected.source[:8].tolist()
    name = module.sources[int(expected.source[0])]
    row = int(module.split.train_rows(name, [int(expected.index[0])])[0])
    text = corpus.dataset(name)[row]["text"]
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert ids[0] == tokenizer.bos_id and tokenizer.decode(ids[1:]) == text[: len(tokenizer.decode(ids[1:]))]


def test_translation_rows_train_only_the_target_side(demo_data):
    _, corpus, tokenizer = demo_data
    split = SourceSplit({"deu-eng": corpus.num_documents("deu-eng")})
    dataset = MixtureDataset(corpus, tokenizer, ["deu-eng"], split, max_length=64, direction="to_eng")
    example = dataset[(0, 5, 0)]
    row = corpus.dataset("deu-eng")[int(split.train_rows("deu-eng", [5])[0])]
    ids = example["ids"]
    assert ids[0] == tokenizer.lang_tag_id("eng")
    target = ids[example["target_from"]:-1]
    assert tokenizer.decode(target) == row["tgt"]
    reverse = MixtureDataset(corpus, tokenizer, ["deu-eng"], split, max_length=64,
                             direction="from_eng")[(0, 5, 0)]
    assert reverse["ids"][0] == tokenizer.lang_tag_id("deu")


def test_packing_keeps_per_token_sources_and_all_targets(demo_data):
    padded = next(iter(_module(demo_data, pack=False, micro=16).train_dataloader()))
    packed = next(iter(_module(demo_data, pack=True, micro=16).train_dataloader()))
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    assert packed["num_target_tokens"] == padded["num_target_tokens"]

    def per_source(b):
        return np.bincount(b["token_source_ids"][b["labels"] != IGNORE_INDEX].numpy(), minlength=40)

    np.testing.assert_array_equal(per_source(packed), per_source(padded))
    assert packed["token_weights"].sum() == pytest.approx(float(padded["token_weights"].sum()), rel=1e-6)


def test_workers_give_identical_batches(demo_data):
    def batches(workers):
        return [b["input_ids"].tolist() for b in _module(demo_data, workers=workers).train_dataloader()]

    assert batches(0) == batches(2)


def test_state_dict_resumes_the_stream(demo_data):
    module = _module(demo_data)
    everything = [b["input_ids"].tolist() for b in module.train_dataloader()]
    module.start_step = 4
    state = module.state_dict()
    fresh = _module(demo_data)
    fresh.load_state_dict(state)
    resumed = [b["input_ids"].tolist() for b in fresh.train_dataloader()]
    assert resumed == everything[4 * 2:]  # 2 micro-batches per step
    with pytest.raises(ValueError, match="sampler"):
        fresh.load_state_dict({})


def test_from_config_selects_sources(demo_data):
    cfg, corpus, tokenizer = demo_data
    module = datamodule_from_config(cfg, corpus, tokenizer)
    assert all(corpus.kind(n) == "mono" for n in module.sources) and "eng" in module.sources
    with pytest.raises(ValueError, match="unknown source 'xxx'"):
        select_sources(corpus, ["mono"], include=["xxx"])
    with pytest.raises(ValueError, match="no sources selected"):
        select_sources(corpus, ["image"])


def test_collator_caps_rows_at_max_length(demo_data):
    _, corpus, tokenizer = demo_data
    collate = MixtureCollator(lambda step: [1.0], tokenizer.pad_id, max_length=8)
    long = {"ids": list(range(4, 30)), "target_from": 1, "source_id": 0, "step": 0}
    batch = collate([long])
    assert batch["input_ids"].shape == (1, 8)
    assert batch["labels"][0].tolist() == list(range(5, 13))


def test_split_is_disjoint_complete_and_deterministic():
    split = SourceSplit({"a": 1000, "b": 24, "c": 1}, val_documents=32, val_fraction=0.1, seed=5)
    assert split.val == {"a": 32, "b": 2, "c": 0} and split.train == {"a": 968, "b": 22, "c": 1}
    for name, total in split.total.items():
        rows = set(split.val_rows(name).tolist()) | set(split.train_rows(name, range(split.train[name])).tolist())
        assert rows == set(range(total))
        assert not set(split.val_rows(name).tolist()) & set(split.train_rows(name, range(split.train[name])).tolist())
    again = SourceSplit({"a": 1000, "b": 24, "c": 1}, val_documents=32, seed=5)
    assert again.val_rows("a").tolist() == split.val_rows("a").tolist()
    with pytest.raises(ValueError, match="out of range for source 'b'"):
        split.train_rows("b", [22])


def test_first_micro_batch_carries_the_step_target_count(demo_data):
    module = _module(demo_data, micro=4)  # 4 micro-batches per step
    loader = iter(module.train_dataloader())
    micro = [next(loader) for _ in range(4)]
    assert int(micro[0]["step_target_tokens"]) == sum(int(b["num_target_tokens"]) for b in micro)
    assert all(int(b["step_target_tokens"]) == -1 for b in micro[1:])


def test_validation_is_sharded_in_lock_step(demo_data):
    module = _module(demo_data, micro=5)
    shards = [module.val_items(rank, 3) for rank in range(3)]
    assert len({len(s) for s in shards}) == 1 and len({sum(map(len, s)) for s in shards}) == 1
    real = [t for s in shards for b in s for t in b if t[2] != PADDING_STEP]
    assert len(real) == len(set(real)) == sum(module.split.val.values())
    batch = next(iter(module.val_dataloader()))
    assert (batch["token_weights"][batch["labels"] != IGNORE_INDEX] == 1).all()


def test_num_targets_matches_the_collator(demo_data):
    module = _module(demo_data)
    examples = module.train_set.build([(0, i, 0) for i in range(6)])
    batch = module.collate(examples)
    assert int(batch["num_target_tokens"]) == sum(num_targets(e, module.max_length) for e in examples)


def test_collator_multiplies_the_plan_example_weights_in():
    collate = MixtureCollator(lambda step: [2.0, 1.0], 0, max_length=8,
                              example_weights=lambda step: [np.array([0.5, 3.0]), None])
    rows = [{"ids": [1, 5, 6, 2], "target_from": 1, "source_id": 0, "index": i, "step": 0} for i in (0, 1)]
    rows.append({"ids": [1, 5, 2], "target_from": 1, "source_id": 1, "index": 4, "step": 0})
    batch = collate(rows)
    targets = batch["labels"] != IGNORE_INDEX
    assert [sorted(set(batch["token_weights"][r][targets[r]].tolist())) for r in range(3)] == [[1.0], [6.0], [1.0]]


def test_plan_example_weights_reach_the_batches(demo_data):
    from pipeline.balance.m4 import M4

    _, corpus, _ = demo_data
    names = select_sources(corpus, ("mono",))
    split = SourceSplit({n: corpus.num_documents(n) for n in names}, val_documents=4)
    q = {name: np.random.default_rng(i).uniform(0.05, 1.0, split.train[name]) for i, name in enumerate(names[:8])}
    module = _module(demo_data, stage=Compose([Cooldown(5, 1, 0.5), Upweight(), M4(q, mode="weights")]))
    weighted = 0
    for batch in module.train_dataloader():
        targets = batch["labels"] != IGNORE_INDEX
        for row in range(batch["source_ids"].shape[0]):
            s, index = int(batch["source_ids"][row]), int(batch["example_index"][row])
            plan = module.sampler.plan_at(int(batch["step"][row]))
            factor = plan.example_weights[names[s]][index] if names[s] in plan.example_weights else 1.0
            weighted += names[s] in plan.example_weights
            expected = torch.tensor(plan.loss_weights[s] * factor, dtype=torch.float32)
            assert torch.equal(batch["token_weights"][row][targets[row]],
                               expected.expand(int(targets[row].sum()))), (names[s], index)
    assert weighted > 0
