"""Mixture search (issue 14, part 1): the pure draws, the fits, and the loop end to end.

The loop runs on the embedded demo corpus with tiny proxies (4 steps of 8 documents, 2
validation documents per source): it checks the plumbing (draws -> mixture files -> one
multirun -> collection -> fits on held-out proxies -> optimised mixture -> a file that
`python -m pipeline.train mixture=<name>` trains with; a rerun trains only what is missing),
not the quality of a search; at 4 steps the losses barely depend on the mixture.
"""

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli.search_mixture import main as search_main
from pipeline.mixing.search import (
    apply_caps,
    check_num_mixtures,
    draw_mixtures,
    epoch_caps,
    expand_to_sources,
    group_domains,
    prior_probs,
)
from pipeline.mixing.temperature import temperature_probs
from pipeline.scaling.mixture import optimise_mixture
from pipeline.scaling.regmix import (
    MODELS,
    compare_models,
    cross_validate,
    fit_linear,
    fit_model,
    held_out_split,
    with_max_increase,
)

REPO = Path(__file__).resolve().parents[2]
SIZES = {"big": 10_000.0, "mid": 1_000.0, "small": 50.0, "tiny": 10.0}

# -- the draws (pure) ------------------------------------------------------------------------


def test_draws_are_seeded_on_the_simplex_and_centred_on_the_prior():
    a = draw_mixtures(SIZES, 2000, seed=3, tau=5.0)
    assert a.shape == (2000, 4)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    assert (a >= 0).all()
    np.testing.assert_array_equal(a, draw_mixtures(SIZES, 2000, seed=3, tau=5.0))
    assert not np.array_equal(a, draw_mixtures(SIZES, 2000, seed=4, tau=5.0))
    # Dirichlet(c * p0) has mean p0: the prior is tau-sampling over the sizes
    p0 = temperature_probs(np.array(list(SIZES.values())), 5.0)
    np.testing.assert_allclose(a.mean(axis=0), p0, atol=0.02)
    # a larger concentration keeps the draws nearer the prior
    tight = draw_mixtures(SIZES, 2000, seed=3, tau=5.0, concentration=1000.0)
    assert np.abs(tight - p0).mean() < 0.2 * np.abs(a - p0).mean()
    # an explicit prior
    prior = {"big": 1.0, "mid": 1.0, "small": 1.0, "tiny": 1.0}
    np.testing.assert_allclose(prior_probs(SIZES, prior), 0.25)
    np.testing.assert_allclose(draw_mixtures(SIZES, 4000, seed=0, prior=prior).mean(axis=0), 0.25, atol=0.02)


def test_epoch_caps_hold_and_the_rest_is_renormalised():
    budget, max_epochs = 5_000.0, 2.0
    caps = epoch_caps(np.array(list(SIZES.values())), budget, max_epochs)
    np.testing.assert_allclose(caps, [1.0, 0.4, 0.02, 0.004])
    draws = draw_mixtures(SIZES, 500, seed=1, tau=10.0, concentration=2.0, budget=budget, max_epochs=max_epochs)
    np.testing.assert_allclose(draws.sum(axis=1), 1.0, atol=1e-12)
    assert (draws <= caps * (1 + 1e-9)).all()
    assert np.isclose(draws[:, 3], caps[3]).sum() > 50  # the tiny source's cap binds often
    # water-filling: the mass above a cap goes to the others in proportion; repeated
    np.testing.assert_allclose(apply_caps(np.array([0.5, 0.3, 0.2]), np.array([1, 0.1, 0.1])), [0.8, 0.1, 0.1])
    np.testing.assert_allclose(apply_caps(np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.35, 1.0])),
                               [0.4, 0.35, 0.25])
    np.testing.assert_allclose(apply_caps(np.array([1.0, 0.0, 0.0]), np.array([0.5, 0.25, 0.75])),
                               [0.5, 0.125, 0.375])  # the free ones drew 0: by the room under their caps


def test_bad_input_raises_a_named_error():
    with pytest.raises(ValueError, match=r"K=5 mixtures is too few: the mixing law has 5 parameters .* K >= 6"):
        draw_mixtures(SIZES, 5, seed=0)
    with pytest.raises(ValueError, match=r"K >= 9"):
        check_num_mixtures(8, 4, num_held_out=3)
    check_num_mixtures(9, 4, num_held_out=3)
    with pytest.raises(ValueError, match=r"prior names unknown source/domain 'klingon'"):
        draw_mixtures(SIZES, 8, seed=0, prior={**dict.fromkeys(SIZES, 1.0), "klingon": 1.0})
    with pytest.raises(ValueError, match=r"prior has no mass for domain 'tiny'"):
        draw_mixtures(SIZES, 8, seed=0, prior={"big": 1, "mid": 1, "small": 1})
    with pytest.raises(ValueError, match=r"prior mass for 'mid' must be finite and >= 0, got -1.0"):
        prior_probs(SIZES, {"big": 1, "mid": -1, "small": 1, "tiny": 1})
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"Dirichlet concentration must be a finite number > 0"):
            draw_mixtures(SIZES, 8, seed=0, concentration=bad)
    with pytest.raises(ValueError, match=r"tau must be a finite number > 0"):
        draw_mixtures(SIZES, 8, seed=0, tau=0.0)
    with pytest.raises(ValueError, match=r"both budget and max_epochs"):
        draw_mixtures(SIZES, 8, seed=0, budget=100.0)
    with pytest.raises(ValueError, match=r"budget 1e\+06 exceeds max_epochs=1"):
        draw_mixtures(SIZES, 8, seed=0, budget=1e6, max_epochs=1.0)
    with pytest.raises(ValueError, match=r"source 'tiny' has zero documents"):
        draw_mixtures({**SIZES, "tiny": 0.0}, 8, seed=0)
    with pytest.raises(ValueError, match=r"group 'low' names unknown source 'klingon'"):
        group_domains(list(SIZES), {"low": ["tiny", "klingon"]})
    with pytest.raises(ValueError, match=r"source 'tiny' is in group 'a' and in group 'b'"):
        group_domains(list(SIZES), {"a": ["tiny"], "b": ["tiny", "small"]})


def test_groups_are_domains_split_by_size():
    domains = group_domains(list(SIZES), {"low": ["small", "tiny"]})
    assert domains == {"low": ["small", "tiny"], "rest": ["big", "mid"]}
    assert group_domains(list(SIZES), None) == {name: [name] for name in SIZES}
    probs = expand_to_sources({"low": 0.6, "rest": 0.4}, domains, SIZES)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert probs["small"] == pytest.approx(0.6 * 50 / 60) and probs["big"] == pytest.approx(0.4 * 10 / 11)


# -- the fits (pure) --------------------------------------------------------------------------


def test_fits_recover_their_own_law_and_are_scored_on_held_out_proxies():
    rng = np.random.default_rng(0)
    R = rng.dirichlet(np.ones(3), 24)
    W = np.array([[3.0, 4.0, 5.0], [4.5, 3.0, 4.0]])
    linear = fit_linear(R, R @ W.T)
    np.testing.assert_allclose(linear.W, W, rtol=1e-4)
    # data from the mixing law L = c + exp(t . r): the law wins on held-out proxies
    t = np.array([[0.2, -1.5, 0.5], [-1.0, 0.8, 0.1]])
    Y = 2.0 + np.exp(R @ t.T)
    mask = held_out_split(24, 6, seed=0)
    assert mask.sum() == 6 and np.array_equal(mask, held_out_split(24, 6, seed=0))
    scores = compare_models(R, Y, ["a", "b", "c"], mask)
    assert set(scores) == set(MODELS)
    assert scores["mixing_law"]["errors"]["rmse_log"] < 1e-3
    assert scores["mixing_law"]["errors"]["spearman"] > 0.99
    assert scores["mixing_law"]["errors"]["rmse_log"] < scores["linear"]["errors"]["rmse_log"]
    loss = fit_model("log_linear", R, Y, ["a", "b", "c"])
    assert loss(R[0]).shape == (2,)
    with pytest.raises(ValueError, match=r"unknown model 'gbm'"):
        fit_model("gbm", R, Y, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"loss \[1, 0\] is not finite"):
        fit_linear(R[:5], np.where(np.arange(5)[:, None] == 1, np.nan, Y[:5]))
    # too few proxies for the law: reported, not fatal; the others are still scored
    few = compare_models(R[:5], Y[:5], ["a", "b", "c"], held_out_split(5, 2, seed=0))
    assert "needs K >= 5 proxies, got 3" in few["mixing_law"]["error"] and "errors" in few["linear"]


def test_leave_one_out_predicts_every_proxy_from_the_others():
    rng = np.random.default_rng(1)
    R = rng.dirichlet(np.ones(3), 12)
    t = np.array([[0.2, -1.5, 0.5], [-1.0, 0.8, 0.1]])
    Y = 2.0 + np.exp(R @ t.T)
    cv = cross_validate(R, Y, ["a", "b", "c"], "mixing_law", target_weights=[1.0, 2.0])
    assert cv["pred"].shape == (12, 2) and cv["errors"]["num_points"] == 24
    assert cv["errors"]["rmse_log"] < 1e-3 and min(cv["spearman"]) > 0.99
    assert cv["objective_errors"]["spearman"] > 0.99
    assert "needs K >= 5" in cross_validate(R[:4], Y[:4], ["a", "b", "c"], "mixing_law")["error"]


def test_max_increase_keeps_every_target_near_its_reference():
    # two targets that pull the mixture to opposite corners; the reference is the middle
    def loss(r):
        return np.array([3.0 - r[0], 3.0 - 0.5 * r[1]])

    free = optimise_mixture(loss, 2, seed=0)
    assert free.r[0] == pytest.approx(1.0, abs=1e-6)  # target 1 gains 1, target 2 loses 0.25
    reference = loss(np.array([0.5, 0.5]))
    bounded = optimise_mixture(with_max_increase(loss, reference, 0.1), 2, target_weights=[1.0, 1.0, 1.0], seed=0)
    increase = loss(bounded.r) - reference
    assert increase.max() <= 0.1 + 1e-3 and bounded.r[0] == pytest.approx(0.7, abs=1e-2)
    with pytest.raises(ValueError, match=r"slack must be a finite number >= 0, got -1"):
        with_max_increase(loss, reference, -1)


# -- the loop, end to end on the demo corpus ---------------------------------------------------

K, GROUPS = 8, ("high=eng,rus,deu", "low=san,haw,cor")
PROXY = ("experiment=demo", "run.total_steps=4", "run.global_batch_size=8", "loader.micro_batch_size=8",
         "logger=none", "trainer.enable_progress_bar=false", "progress=false",
         "validation.documents_per_source=2", "checkpoint.every_n_steps=100")


def run_search(out: Path, cache: str, *extra: str) -> tuple[int, str]:
    argv = ["--out", str(out), "-k", str(K), *(a for g in GROUPS for a in ("--group", g)), "--quiet",
            *extra, *PROXY, f"cache_dir={cache}"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = search_main(argv)
    return code, stdout.getvalue() + stderr.getvalue()


@pytest.fixture(scope="module")
def searched(tmp_path_factory, demo_data):
    out = tmp_path_factory.mktemp("search")
    cache = str(demo_data[0].cache_dir)
    code, output = run_search(out, cache)
    assert code == 0, output
    return out, cache, output


def test_search_draws_trains_collects_fits_and_writes_a_mixture(searched):
    out, _, output = searched
    assert f"training {K} proxies" in output
    state = json.loads((out / "search.json").read_text())
    assert list(state["settings"]["domains"]) == ["high", "low", "rest"]
    for k in range(K):
        name = f"search_{k:03d}"
        record = json.loads((out / "proxies" / name / "results.json").read_text())
        assert record["status"] == "completed"
        # the proxy trained the drawn mixture: Manual weights as written, probabilities per source
        stage = yaml.safe_load((out / "conf" / "mixture" / f"{name}.yaml").read_text())["stages"][0]
        assert record["mixture"]["stages"][0]["weights"] == stage["weights"]
        drawn = state["mixtures"][name]
        high = sum(record["sources"][s]["final_prob"] for s in ("eng", "rus", "deu"))
        assert high == pytest.approx(drawn["high"], abs=1e-6)
    report = json.loads((out / "report.json").read_text())
    assert report["num_completed"] == K and report["num_held_out"] == 3 and len(report["held_out"]) == 3
    assert report["model"] in MODELS
    for model in MODELS:
        assert set(report["fits"][model]["errors"]) >= {"rmse_log", "mape", "spearman"}
        assert len(report["leave_one_out"][model]["spearman"]) == 3  # one per domain, over the K proxies
    chosen_by = {m: report["leave_one_out"][m]["errors"]["rmse_log"] for m in MODELS}
    assert report["model"] == min(chosen_by, key=chosen_by.get)
    chosen = report["chosen"]["domain_probs"]
    assert sum(chosen.values()) == pytest.approx(1.0)
    assert all(chosen[d] <= report["caps"][d] + 1e-6 for d in chosen)
    assert set(report["baselines"]) == {"tau=1", "tau=5", "unimax(max_epochs=1)"}
    assert sum(report["chosen"]["source_probs"].values()) == pytest.approx(1.0)
    assert len(report["chosen"]["source_probs"]) == 37
    text = (out / "report.md").read_text()
    assert "| mixing_law" in text and "| linear" in text and "predicted objective" in text
    assert "LOO Spearman per domain" in text and "minus that at tau = 1" in text
    assert (out / "proxies.csv").is_file() and (out / "conf" / "mixture" / "searched.yaml").is_file()


def test_the_searched_mixture_trains(searched, tmp_path):
    out, cache, _ = searched
    report = json.loads((out / "report.json").read_text())
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.train", *PROXY, "run.total_steps=2", f"cache_dir={cache}",
               f"hydra.searchpath=[file://{out / 'conf'}]", "mixture=searched", f"output_dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "results.json").read_text())
    assert record["status"] == "completed" and record["global_steps"] == 2
    for source, p in report["chosen"]["source_probs"].items():
        assert record["sources"][source]["final_prob"] == pytest.approx(p, abs=1e-6)


def test_a_rerun_trains_only_the_missing_proxies(searched):
    out, cache, _ = searched
    proxies = out / "proxies"
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in proxies.glob("*/results.json")}
    drawn = {p.name: p.stat().st_mtime_ns for p in (out / "conf" / "mixture").glob("search_*.yaml")}
    # an interrupted search: one proxy never finished, one finished without validation losses
    (proxies / "search_005" / "results.json").unlink()
    for path in (proxies / "search_005" / "checkpoints").glob("*"):
        path.unlink()
    record = json.loads((proxies / "search_002" / "results.json").read_text())
    record["sources"]["eng"]["val_loss"] = None
    (proxies / "search_002" / "results.json").write_text(json.dumps(record))
    code, output = run_search(out, cache)
    assert code == 0, output
    assert f"{K - 2} proxies already completed: not retrained" in output
    assert "training 2 proxies" in output and "search_002: completed without validation losses" in output
    after = {p.parent.name: p.stat().st_mtime_ns for p in proxies.glob("*/results.json")}
    assert {n for n in after if after[n] != mtimes.get(n)} == {"search_002", "search_005"}
    assert drawn == {p.name: p.stat().st_mtime_ns for p in (out / "conf" / "mixture").glob("search_*.yaml")}
    assert list((out / "stale").iterdir())[0].name.startswith("search_002-")
    # nothing left to train: a third run trains nothing, and refits for another objective
    code, output = run_search(out, cache, "--objective", "low=3", "--max-increase", "0.05")
    assert code == 0 and "training" not in output.replace("trains", "")
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == {"high": 1.0, "low": 3.0, "rest": 1.0} and report["max_increase"] == 0.05
    assert max(report["chosen"]["increase_over_tau1"].values()) <= 0.05 + 1e-3
    # another seed in the same folder is refused, naming the setting
    code, output = run_search(out, cache, "--seed", "1")
    assert code == 2 and "other settings (seed" in output


def test_bad_search_input_exits_2(tmp_path, demo_data):
    cache = str(demo_data[0].cache_dir)
    argv = ["--out", str(tmp_path / "s"), *(a for g in GROUPS for a in ("--group", g)), *PROXY, f"cache_dir={cache}"]
    for extra, message in ((["-k", "6"], "K=6 mixtures is too few"),
                           (["--objective", "klingon=1"], "--objective names unknown domain 'klingon'"),
                           (["--group", "x=klingon"], "group 'x' names unknown source 'klingon'"),
                           (["--concentration", "0"], "Dirichlet concentration must be a finite number > 0"),
                           (["mixture=unimax"], "override 'mixture' is set by the search")):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            assert search_main([*extra, *argv]) == 2
        assert message in stderr.getvalue()
