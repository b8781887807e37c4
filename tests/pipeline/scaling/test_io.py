"""Tables to law inputs: clear errors naming the column and value."""

import numpy as np
import pandas as pd
import pytest

from pipeline.scaling import read_tables, table_from_frame


def _frame(n=12):
    rng = np.random.default_rng(0)
    N = np.geomspace(1e7, 1e9, n)
    C = 6 * N * np.geomspace(1e9, 1e10, n)
    return pd.DataFrame({"params": N, "flops": C, "val_loss": 2 + rng.uniform(0, 1, n)})


def test_chinchilla_from_flops_derives_tokens():
    df = _frame()
    t = table_from_frame(df, law="chinchilla", n_col="params", c_col="flops", loss_col="val_loss")
    np.testing.assert_allclose(t.X[:, 1], df.flops / (6 * df.params))
    assert t.columns == {"loss": "val_loss", "N": "params", "C": "flops"}


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (lambda d: d, {"n_col": "model_size"}, r"column 'model_size' \(--n-col\) not found"),
        (lambda d: d, {"loss_col": "loss"}, r"column 'loss' \(--loss-col\) not found"),
        (
            lambda d: d.assign(params=d.params.where(d.index != 3, -5.0)),
            {},
            r"'params'.*must be > 0, row 3 has -5.0",
        ),
        (
            lambda d: d.assign(flops=d.flops.where(d.index != 2, 0.0)),
            {},
            r"'flops'.*must be > 0, row 2",
        ),
        (
            lambda d: d.assign(val_loss=d.val_loss.where(d.index != 4, np.nan)),
            {},
            r"'val_loss'.*NaN.*row 4",
        ),
        (
            lambda d: d.astype({"params": object}).assign(params=["x"] + list(d.params[1:])),
            {},
            r"'params'.*non-numeric value 'x'",
        ),
        (lambda d: d.head(4), {}, r"needs more than 5 points, got 4"),
    ],
)
def test_bad_tables_raise_value_error(mutate, kwargs, match):
    args = {
        "law": "chinchilla",
        "n_col": "params",
        "c_col": "flops",
        "loss_col": "val_loss",
    } | kwargs
    with pytest.raises(ValueError, match=match):
        table_from_frame(mutate(_frame()), **args)


def test_missing_flags_and_unknown_law():
    with pytest.raises(ValueError, match="--d-col"):
        table_from_frame(_frame(), law="chinchilla", n_col="params", loss_col="val_loss")
    with pytest.raises(ValueError, match="unknown law"):
        table_from_frame(_frame(), law="kaplan", loss_col="val_loss")


def test_multilingual_and_mixing_tables(tmp_path):
    long = pd.DataFrame(
        {
            "run": np.repeat(np.arange(6), 2),
            "N": np.repeat(np.geomspace(1e7, 1e9, 6), 2),
            "source": ["en", "sw"] * 6,
            "weight": [0.8, 0.2] * 6,
            "loss": np.linspace(3, 2, 12),
        }
    )
    t = table_from_frame(
        long, law="multilingual", n_col="N", w_col="weight", source_col="source", loss_col="loss"
    )
    assert t.law.sources == ["en", "sw"]
    assert set(t.X[:, 2]) == {0.0, 1.0}
    with pytest.raises(ValueError, match=r"'weight'.*\(0, 1\], row 0 has 1.5"):
        table_from_frame(
            long.assign(weight=1.5),
            law="multilingual",
            n_col="N",
            w_col="weight",
            source_col="source",
            loss_col="loss",
        )
    mix = pd.DataFrame(
        {"index": range(8), "r_a": np.linspace(0, 1, 8), "r_b": np.linspace(1, 0, 8)}
    )
    losses = pd.DataFrame({"index": range(8), "loss_a": np.linspace(3, 2, 8)})
    mix.to_csv(tmp_path / "mix.csv", index=False)
    losses.to_csv(tmp_path / "loss.csv", index=False)
    df = read_tables([tmp_path / "mix.csv", tmp_path / "loss.csv"], on="index")
    t = table_from_frame(df, law="mixing", mixture_cols=["r_a", "r_b"], loss_col="loss_a")
    assert t.law.domains == ["r_a", "r_b"] and t.X.shape == (8, 2)
    with pytest.raises(ValueError, match="CSV not found"):
        read_tables([tmp_path / "nope.csv"])
