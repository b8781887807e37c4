import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.mixing import build_stage
from pipeline.mixing import Compose, Cooldown, OrderMatters, Temperature
from pipeline.mixing.report import build_report, format_report
from pipeline.report import report_for_config
from pipeline.sampling.sampler import MixtureSampler

REPO = Path(__file__).resolve().parents[3]
MIXTURES = sorted(p.stem for p in (REPO / "conf" / "mixture").glob("*.yaml"))
SIZES = {"eng": 50_000, "fra": 2_000, "swh": 300, "fao": 2}


def test_phases_follow_breakpoints_and_draws_add_up():
    # Later sampling stages overwrite earlier ones: OrderMatters last keeps its phase-1 mask.
    sampler = MixtureSampler(Compose([Cooldown(5, 1, 0.5), OrderMatters(0.25, min_size=1000)]),
                             SIZES, global_batch_size=10, total_steps=100)
    report = build_report(sampler, max_epochs=5)
    assert [(p.first_step, p.end_step) for p in report.phases] == [(0, 25), (25, 50), (50, 100)]
    assert report.phases[0].probs_start[report.sources.index("swh")] == 0
    total = sum(p.expected_draws for p in report.phases)
    np.testing.assert_allclose(total, report.expected_draws)
    assert report.expected_draws.sum() == pytest.approx(1000)
    # The exact sampler delivers what the report promised (within its deviation bound).
    assert np.abs(sampler.draw_counts(100) - report.expected_draws).max() <= sampler.allocator.error_bound().max()


def test_flags_zero_draws_and_too_many_epochs():
    sampler = MixtureSampler(Compose([Temperature(1)]), {"big": 10**7, "tiny": 3, "small": 40},
                             global_batch_size=8, total_steps=50)
    report = build_report(sampler, max_epochs=2)
    assert "ZERO" in report.flags["tiny"]
    over = MixtureSampler(Compose([Temperature(100)]), {"big": 10**7, "tiny": 3}, 8, 50)
    flagged = build_report(over, max_epochs=2)
    assert flagged.flags["tiny"] == ["EPOCHS>2"]
    text = format_report(flagged)
    assert "1 exceed 2 epochs: tiny" in text and "Phase 1" in text


@pytest.mark.parametrize("mixture", MIXTURES)
def test_every_shipped_mixture_composes_and_reports(demo_data, compose_config, mixture):
    compose = compose_config
    cfg, corpus, _ = demo_data
    overrides = ["experiment=demo", f"cache_dir={cfg.cache_dir}", f"mixture={mixture}", "progress=false"]
    if mixture == "order_matters":
        overrides.append("mixture.stages.0.min_size=2000")
    cfg = compose(overrides)
    report, text = report_for_config(cfg)
    assert len(report.sources) == 37 and "Whole run" in text
    assert report.expected_draws.sum() == pytest.approx(cfg.run.total_steps * cfg.run.global_batch_size)


@pytest.mark.slow  # the documented `pipeline.report` commands run by tests/docs cover the CLI by default
def test_report_cli_runs(demo_data, tmp_path):
    cfg, _, _ = demo_data
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.report", "experiment=demo", f"cache_dir={cfg.cache_dir}",
         "mixture=upweight", f"hydra.run.dir={tmp_path}", "progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Whole run" in result.stderr + result.stdout


def test_bad_mixture_config_names_the_stage(demo_data, compose_config):
    compose = compose_config
    cfg = compose(["mixture=temperature", "mixture.stages.0.tau=-1"])
    with pytest.raises(ValueError, match=r"mixture.stages\[0\].*tau"):
        build_stage(cfg.mixture)
    with pytest.raises(ValueError, match="size_unit"):
        report_for_config(compose(["experiment=demo", f"cache_dir={demo_data[0].cache_dir}",
                                   "mixture.size_unit=bytes", "progress=false"]))
