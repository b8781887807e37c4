"""Window mode (`loader.unit=window`): every token trained once per pass, document masks at
window boundaries, a world-size-independent resumable stream, and sizes counted in windows."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config.data import datamodule_from_config, source_windows, stage_sizes
from pipeline.data.text_rows import IGNORE_INDEX, num_targets
from pipeline.data.windows import TokenWindows
from pipeline.models.transformer import DecoderOnlyTransformer, TransformerConfig
from pipeline.sampling.sampler import RankBatchSampler
from pipeline.train import train

BOS, EOS = 1, 2
MAX_LENGTH = 12  # embedded CLDR documents are short: small windows make them straddle boundaries


class _ArrayStore:
    """The part of a `TokenStore` windows read, over in-memory arrays."""

    source = "synthetic"

    def __init__(self, lengths, rng):
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._tokens = rng.integers(3, 1000, int(self._offsets[-1])).astype(np.uint16)

    def tokens(self, column):
        return self._tokens

    def offsets(self, column):
        return self._offsets


def _documents(store):
    return [store.tokens("text")[a:b] for a, b in zip(store.offsets("text")[:-1], store.offsets("text")[1:], strict=True)]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12), max_length=st.integers(1, 17),
       seed=st.integers(0, 2**16))
def test_every_token_is_a_target_exactly_once_per_pass(lengths, max_length, seed):
    store = _ArrayStore(lengths, np.random.default_rng(seed))
    windows = TokenWindows(store, max_length, BOS, EOS)
    read = windows.read(np.arange(windows.num_windows))
    # Targets of the pass, in window order, with cross-document targets dropped...
    targets = np.concatenate([ids[1:][segments[1:] == segments[:-1]] for ids, segments in read])
    # ...are each document's ids then <eos>, every document once.
    expected = np.concatenate([np.append(doc.astype(np.int64), EOS) for doc in _documents(store)])
    assert np.array_equal(targets, expected)
    assert windows.num_targets == expected.size == int(windows.targets(np.arange(windows.num_windows)).sum())
    assert all(ids.size <= max_length + 1 for ids, _ in read) and all(ids.size >= 2 for ids, _ in read)
    # Windows tile the framed stream, overlapping by the one token that is both target and next input.
    stream = np.concatenate([[BOS, *doc.tolist(), EOS] for doc in _documents(store)])
    assert np.array_equal(np.concatenate([read[0][0]] + [ids[1:] for ids, _ in read[1:]]), stream)


def test_out_of_range_windows_raise_naming_the_source():
    windows = TokenWindows(_ArrayStore([5, 7], np.random.default_rng(0)), 4, BOS, EOS)
    with pytest.raises(IndexError, match="window 4 out of range for source 'synthetic' \\(4 windows\\)"):
        windows.read([4])
    with pytest.raises(ValueError, match="loader.max_length"):
        TokenWindows(_ArrayStore([5], np.random.default_rng(0)), 0, BOS, EOS)


@pytest.fixture(scope="module")
def window_data(demo_data):
    """(cfg, corpus, tokenizer) of the demo corpus in window mode (its token stores built once)."""
    from pipeline.config.compose import compose_config
    from pipeline.prepare import prepare

    cfg = compose_config(["experiment=demo", f"cache_dir={demo_data[0].cache_dir}", "progress=false",
                          "loader.unit=window", f"loader.max_length={MAX_LENGTH}", "run.global_batch_size=12",
                          "run.total_steps=20"])
    corpus, tokenizer = prepare(cfg, progress=False)
    return cfg, corpus, tokenizer


def _datamodule(window_data, compose_config, *overrides):
    cfg, corpus, tokenizer = window_data
    cfg = compose_config(["experiment=demo", f"cache_dir={cfg.cache_dir}", "progress=false", "loader.unit=window",
                          f"loader.max_length={MAX_LENGTH}", "run.global_batch_size=12", "run.total_steps=20",
                          *overrides])
    return datamodule_from_config(cfg, corpus, tokenizer)


def test_a_pass_over_a_source_trains_each_of_its_tokens_once(window_data, compose_config):
    module = _datamodule(window_data, compose_config, "validation.documents_per_source=0")
    name = module.sources[0]
    source = module.sources.index(name)
    store = window_data[1].token_stores[name]
    count = module.split.train[name]
    assert count == module.windows[name].num_windows  # nothing held out: the split is over windows
    # One pass in the stream's order of windows: training index j is window rows[j].
    order = np.argsort(module.split.train_rows(name, np.arange(count)))
    examples = module.train_set.build([(source, int(j), 0) for j in order])
    batch = module.collate(examples)
    trained = batch["labels"][batch["labels"] != IGNORE_INDEX].numpy()
    expected = np.concatenate([np.append(doc.astype(np.int64), window_data[2].eos_id) for doc in _documents(store)])
    assert np.array_equal(trained, expected)
    assert int((batch["token_weights"] > 0).sum()) == expected.size
    assert sum(num_targets(e, MAX_LENGTH) for e in examples) == expected.size


def test_document_boundaries_inside_a_window_mask_attention_and_the_crossing_target(window_data, compose_config):
    module = _datamodule(window_data, compose_config)
    tokenizer = window_data[2]
    items = [(s, j, 0) for s in range(3) for j in range(4)]
    batch = module.collate(module.train_set.build(items))
    ids, labels, documents = batch["input_ids"], batch["labels"], batch["document_ids"]
    row = int(torch.nonzero((documents.amax(1) > 0) & (documents.amin(1) == 0))[0])  # a row with 2+ documents
    starts = torch.nonzero(ids[row] == tokenizer.bos_id).flatten()
    starts = starts[starts > 0]
    assert starts.numel() >= 1
    for start in starts.tolist():
        # The token before a <bos> is the previous document's <eos>: its target (the <bos>) is dropped,
        # and the document id steps up exactly there.
        assert ids[row, start - 1] == tokenizer.eos_id and labels[row, start - 1] == IGNORE_INDEX
        assert documents[row, start] == documents[row, start - 1] + 1
        assert batch["token_weights"][row, start - 1] == 0
    # Attention: the later document's hidden states do not depend on the earlier document's tokens.
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(TransformerConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                          max_length=MAX_LENGTH)).eval()
    first = int(starts[0])
    changed = ids.clone()
    changed[row, :first - 1] = (changed[row, :first - 1] + 7) % tokenizer.vocab_size
    with torch.no_grad():
        before = model(ids[row:row + 1], documents[row:row + 1])[0, first:]
        after = model(changed[row:row + 1], documents[row:row + 1])[0, first:]
    assert torch.allclose(before, after, atol=1e-6)


def _stream(module, world_size, start, steps):
    """Per global step: the (source, index, input ids) of every row, ranks concatenated in order."""
    per_step = {}
    for rank in range(world_size):
        sampler = RankBatchSampler(module.sampler, rank, world_size, start_step=start, num_steps=steps)
        for micro in sampler:
            batch = module.collate(module.train_set.build(micro))
            for item, ids in zip(micro, batch["input_ids"].tolist(), strict=True):
                per_step.setdefault(item[2], []).append((item[0], item[1], tuple(ids)))
    return per_step


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_window_stream_is_world_size_independent(window_data, compose_config, world_size):
    module = _datamodule(window_data, compose_config)
    assert _stream(module, world_size, 0, 4) == _stream(module, 1, 0, 4)


def test_the_window_stream_resumes_at_any_world_size(window_data, compose_config):
    module = _datamodule(window_data, compose_config)
    whole = _stream(module, 1, 0, 8)
    state = json.loads(json.dumps(module.sampler.state_dict(5)))  # what a checkpoint stores
    resumed = _datamodule(window_data, compose_config)
    resumed.load_state_dict({"sampler": state})
    assert resumed.start_step == 5
    assert _stream(resumed, 3, 5, 3) == {step: whole[step] for step in range(5, 8)}


def test_sizes_epochs_and_unimax_caps_count_windows(window_data, compose_config):
    cfg, corpus, tokenizer = window_data
    module = _datamodule(window_data, compose_config, "mixture=unimax", "mixture.stages.0.max_epochs=1.5",
                         "run.total_steps=60")
    train_windows = np.array([module.split.train[n] for n in module.sources])
    assert np.array_equal(module.sampler.num_documents, train_windows)
    assert (train_windows > np.array([corpus.num_documents(n) for n in module.sources])).any()
    # UniMax's cap holds in windows over the planned run.
    epochs = module.sampler.epochs(60)
    assert max(epochs.values()) <= 1.5 + 1e-9
    # size_unit=tokens: the targets the training windows train (held-out windows excluded).
    tokens_cfg = compose_config(["experiment=demo", f"cache_dir={cfg.cache_dir}", "loader.unit=window",
                                 f"loader.max_length={MAX_LENGTH}", "mixture.size_unit=tokens"])
    windows = source_windows(tokens_cfg, corpus, tokenizer, module.sources)
    sizes = stage_sizes(tokens_cfg, corpus, module.split, windows=windows)
    for name in module.sources[:5]:
        held_out = module.split.val_rows(name)
        assert sizes[name] == windows[name].num_targets - windows[name].targets(held_out).sum()
        assert sizes[name] == corpus.token_counts[name] + corpus.num_documents(name) - windows[name].targets(held_out).sum()


def test_bad_window_configs_fail_before_training(window_data, compose_config):
    with pytest.raises(ValueError, match="loader.pack=true .* set loader.pack=false"):
        _datamodule(window_data, compose_config, "loader.pack=true")
    with pytest.raises(Exception, match="loader.unit"):
        compose_config(["experiment=demo", "loader.unit=sentence"])


def test_window_mode_trains_and_reports_windows(window_data, compose_config, tmp_path):
    cfg = window_data[0]
    record = train(compose_config(["experiment=demo", f"cache_dir={cfg.cache_dir}", "loader.unit=window",
                                   "loader.max_length=32", "run.total_steps=3", "run.global_batch_size=8",
                                   "logger=csv", "trainer.enable_progress_bar=false", "progress=false",
                                   "validation.documents_per_source=2", f"output_dir={tmp_path}"]))
    assert record["status"] == "completed" and record["global_steps"] == 3 and record["draw_unit"] == "windows"
    assert sum(s["samples_seen"] for s in record["sources"].values()) == 3 * 8
    # Rows are full windows (32 inputs), bar targets dropped at document boundaries; documents of the
    # demo corpus are short, so document rows would hold far fewer.
    assert 3 * 8 * 32 * 0.5 < record["tokens_seen_total"] <= 3 * 8 * 32


def test_document_mode_reads_the_token_stores_and_builds_the_same_rows(window_data, demo_data):
    from pipeline.data.split import SourceSplit
    from pipeline.data.text_rows import MixtureDataset

    _, stored, tokenizer = window_data
    _, encoded_on_the_fly, _ = demo_data
    assert stored.token_stores and encoded_on_the_fly.token_stores is None
    names = list(stored.source_names)  # mono and parallel sources
    split = SourceSplit({n: stored.num_documents(n) for n in names}, val_documents=2)
    from_stores = MixtureDataset(stored, tokenizer, names, split, "train", max_length=24)
    from_text = MixtureDataset(encoded_on_the_fly, tokenizer, names, split, "train", max_length=24)
    assert from_stores.stores is not None and from_text.stores is None
    rng = np.random.default_rng(0)
    items = [(s, int(rng.integers(split.train[n])), 0) for s, n in enumerate(names) for _ in range(3)]
    assert from_stores.build(items) == from_text.build(items)


def test_windows_pickle_as_their_store_path_not_their_tokens(window_data):
    """Spawned dataloader workers get the windows by pickle: the memory maps are mapped again
    there instead of copied into the message."""
    import pickle

    cfg, corpus, tokenizer = window_data
    name = max((n for n in corpus.source_names if corpus.kind(n) == "mono"), key=lambda n: corpus.token_stores[n].total_tokens)
    windows = TokenWindows(corpus.token_stores[name], MAX_LENGTH, tokenizer.bos_id, tokenizer.eos_id)
    blob = pickle.dumps(windows)
    assert len(blob) < corpus.token_stores[name].tokens().nbytes
    again = pickle.loads(blob)
    every = np.arange(windows.num_windows)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
               for a, b in zip(windows.read(every), again.read(every), strict=True))


@pytest.mark.parametrize("unit", ["window", "document"])
def test_a_steps_targets_are_counted_from_lengths_as_the_collator_keeps_them(window_data, compose_config, unit):
    """The first micro-batch of a step carries the rank's target count for the whole step;
    windows and pre-tokenized mono rows count it without building the step's other rows."""
    from pipeline.sampling.sampler import MicroBatch

    module = _datamodule(window_data, compose_config, f"loader.unit={unit}", "sources.kinds=[mono]",
                         "loader.max_length=8")  # short rows: document mode truncates some
    assert module.train_set.stores is not None
    step = [(s, j, 3) for s in range(0, 30, 3) for j in range(2)]
    assert module.train_set.count_targets(step) is not None
    first = module.train_set.__getitems__(MicroBatch(step[:4], step_items=step))
    built = module.train_set.build(step)
    if unit == "document":  # some of these documents are longer than a row: truncated
        rows = module.split.rows_many(module.sources, np.array([i[0] for i in step]), np.array([i[1] for i in step]))
        assert any(module.train_set.stores[i[0]].document(int(r)).size + 1 > 8 for i, r in zip(step, rows, strict=True))
    assert first[0]["step_target_tokens"] == sum(num_targets(e, 8) for e in built)
    assert module.train_set.count_targets(step) == sum(num_targets(e, 8) for e in built)


def test_dataloader_workers_give_the_same_batches_and_step_counts(window_data, compose_config):
    """Workers count a step's targets from lengths (the main process builds the step): the
    batches, the step target counts included, are the same."""
    batches = {}
    for workers in (0, 2):
        module = _datamodule(window_data, compose_config, f"loader.num_workers={workers}",
                             "loader.micro_batch_size=3")
        loader = iter(module.train_dataloader())
        batches[workers] = [next(loader) for _ in range(8)]  # two steps of 4 micro-batches
    for zero, two in zip(batches[0], batches[2], strict=True):
        assert zero.keys() == two.keys()
        for key in zero:
            assert torch.equal(zero[key], two[key]), key
    assert [int(b["step_target_tokens"]) for b in batches[2]][::4] == [int(b["step_target_tokens"]) for b in batches[0]][::4]
    assert all(int(b["step_target_tokens"]) > 0 for b in batches[2][::4])
