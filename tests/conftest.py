"""Test-wide settings: never touch the network."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def compose(overrides=()):
    """The root config with overrides, composed without running a Hydra app."""
    from pipeline.config.compose import compose_config

    return compose_config(overrides)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """(cfg, corpus, tokenizer) for the embedded demo corpus, prepared once per session."""
    from pipeline.prepare import prepare

    cache = tmp_path_factory.mktemp("cache")
    cfg = compose(["experiment=demo", f"cache_dir={cache}", "progress=false"])
    corpus, tokenizer = prepare(cfg, progress=False)
    return cfg, corpus, tokenizer


@pytest.fixture
def compose_config():
    """`compose(overrides)` as a fixture (conftest is not importable in importlib mode)."""
    return compose


@pytest.fixture
def one_thread():
    """Fixed thread count: float32 CPU reductions may group differently with more threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
