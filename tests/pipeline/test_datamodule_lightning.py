"""The datamodule inside a real Lightning Trainer: checkpoint, resume, same stream."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.datamodule import MixtureDataModule, select_sources
from pipeline.data.split import SourceSplit
from pipeline.data.text_rows import IGNORE_INDEX
from pipeline.mixing import Compose, Cooldown, Upweight
from pipeline.sampling.sampler import MixtureSampler


class TinyLM(pl.LightningModule):
    """Bigram model with the weighted, token-normalised loss; records what it trained on."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((int(batch["step"][0]), batch["input_ids"][:, 0:4].flatten().tolist()))
        logits = self.head(self.embed(batch["input_ids"]))
        losses = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                 ignore_index=IGNORE_INDEX, reduction="none")
        return (losses * batch["token_weights"].flatten()).sum() / batch["num_target_tokens"].clamp(min=1)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _datamodule(demo_data, total_steps=6):
    _, corpus, tokenizer = demo_data
    names = select_sources(corpus, ["mono"])
    split = SourceSplit({n: corpus.num_documents(n) for n in names}, val_documents=2)
    sampler = MixtureSampler(Compose([Cooldown(5, 1, 0.5), Upweight()]), split.train,
                             global_batch_size=8, total_steps=total_steps, seed=11)
    return MixtureDataModule(corpus, tokenizer, sampler, split, micro_batch_size=4, max_length=24)


def _trainer(tmp_path, max_steps, accumulate=2):
    return pl.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
                      devices=1)


def test_checkpoint_resume_continues_the_stream(demo_data, tmp_path):
    vocab = demo_data[2].vocab_size
    torch.manual_seed(0)
    full = TinyLM(vocab)
    _trainer(tmp_path, 6).fit(full, datamodule=_datamodule(demo_data))
    assert [step for step, _ in full.seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]

    torch.manual_seed(0)
    first = TinyLM(vocab)
    trainer = _trainer(tmp_path, 3)
    trainer.fit(first, datamodule=_datamodule(demo_data))
    checkpoint = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["MixtureDataModule"]["sampler"]["step"] == 3

    resumed = TinyLM(vocab)
    _trainer(tmp_path, 6).fit(resumed, datamodule=_datamodule(demo_data), ckpt_path=checkpoint)
    assert first.seen + resumed.seen == full.seen
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_mismatched_accumulation_is_refused(demo_data, tmp_path):
    with pytest.raises(ValueError, match="accumulate_grad_batches=1"):
        _trainer(tmp_path, 2, accumulate=1).fit(TinyLM(demo_data[2].vocab_size),
                                                datamodule=_datamodule(demo_data))


def test_a_second_epoch_continues_the_stream(demo_data, tmp_path):
    """max_steps beyond the planned run: the next Lightning epoch goes on from step 3."""
    model = TinyLM(demo_data[2].vocab_size)
    module = _datamodule(demo_data, total_steps=3)
    _trainer(tmp_path, 5).fit(model, datamodule=module)
    assert [step for step, _ in model.seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    reference = _datamodule(demo_data, total_steps=3)
    reference.start_step = 3  # no trainer: read the stream directly from step 3
    first = next(iter(reference.train_dataloader()))
    assert model.seen[6][1] == first["input_ids"][:, 0:4].flatten().tolist()
