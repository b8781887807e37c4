"""Pre-flight mixture report entry: ``python -m pipeline.report experiment=demo mixture=unimax``.

Per source and per schedule phase: size, sampling probability and loss weight at the
phase's first and last step, expected draws in the phase, and cumulative epochs at its end;
then the whole run, with flags for sources that round to zero draws or exceed the epoch
limit. Training logs the same table before its first step (`pipeline.mixing.report`).
"""

from __future__ import annotations

import logging

import hydra

from pipeline.config import CONFIG_DIR
from pipeline.config.data import build_sampler_for, build_split, selected_sources, source_windows, stage_sizes
from pipeline.mixing.report import MixtureReport, build_report, format_report
from pipeline.prepare import prepare

log = logging.getLogger(__name__)


def report_for_config(cfg) -> tuple[MixtureReport, str]:
    """Prepare (cached) the configured data, build the sampler and its report."""
    corpus, tokenizer = prepare(cfg)
    names = selected_sources(cfg, corpus)
    windows = source_windows(cfg, corpus, tokenizer, names)
    split = build_split(cfg, corpus, names, windows)
    sampler = build_sampler_for(cfg, corpus, split, windows=windows)
    report = build_report(sampler, stage_sizes(cfg, corpus, split, windows=windows),
                          cfg.mixture.get("size_unit", "documents"), cfg.get("report", {}).get("max_epochs", 10.0),
                          draw_unit="windows" if windows else "documents")
    return report, format_report(report)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _report_app(cfg) -> None:
    _, text = report_for_config(cfg)
    log.info("\n%s", text)


def main() -> None:
    """`python -m pipeline.report [overrides]` / `mixpipe-report [overrides]` (Hydra's CLI)."""
    _report_app()


if __name__ == "__main__":
    main()
