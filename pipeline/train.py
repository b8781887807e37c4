"""Training entry: ``python -m pipeline.train experiment=demo [overrides]``. Wiring only:
compose, prepare data (cached), print the mixture plan, build the parts (`pipeline.config`,
`pipeline.training.assemble`), fit, and write ``results.json`` in the run directory."""

from __future__ import annotations

import logging
import time

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from pipeline.config import CONFIG_DIR, check_targets
from pipeline.config.data import datamodule_from_config
from pipeline.config.loader import loader_unit
from pipeline.config.models import build_model
from pipeline.mixing.report import build_report, format_report
from pipeline.prepare import prepare_once
from pipeline.sampling.batch_geometry import geometry_from_config
from pipeline.training import assemble, results
from pipeline.training.identity import config_digest, run_identity
from pipeline.training.run_lock import claim_output_dir

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Run one training job; returns the results record (also written to results.json)."""
    started = time.time()
    geometry = geometry_from_config(cfg)  # batch sizes checked before any data or process
    loader_unit(cfg)  # loader.unit and its combination with loader.pack, likewise
    check_targets(cfg)  # mixture stage and data recipe keys against their _target_
    assemble.check_max_steps(cfg)  # no steps past a plan whose mixture caps epochs (UniMax)
    output_dir = assemble.output_dir_of(cfg)
    # One job per output_dir; no fresh run over an old one (overwrite=true, ckpt_path resume).
    with claim_output_dir(output_dir, overwrite=bool(cfg.get("overwrite")), resuming=bool(cfg.get("ckpt_path"))):
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        corpus, tokenizer = prepare_once(cfg)  # every process: one builds, the others load
        datamodule = datamodule_from_config(cfg, corpus, tokenizer)
        report = build_report(datamodule.sampler, size_unit=cfg.mixture.size_unit, max_epochs=cfg.report.max_epochs,
                              draw_unit="windows" if getattr(datamodule, "windows", None) else "documents")
        rank_zero_info("\n" + format_report(report))
        identity = run_identity(cfg, datamodule, tokenizer)
        ckpt_path, datamodule.restart_stream_on_load = assemble.resume_checkpoint(cfg, output_dir, identity)
        model = build_model(cfg, datamodule, corpus, tokenizer)
        logger = assemble.build_logger(cfg, output_dir)
        trainer = assemble.build_trainer(cfg, output_dir, identity, geometry, logger)
        assemble.log_run_start(logger, cfg, report)
        status = "completed"
        try:
            assemble.fit(trainer, model, datamodule, ckpt_path)  # (validates if a resume trained nothing)
            status = results.end_status(trainer.global_step, cfg.run.total_steps)  # or "stopped: max_steps N of M"
        except BaseException as error:  # preempted / diverged / failed: exit status 1, said in results.json
            status = results.failure_status(error)
            raise
        finally:
            record = results.results_record(cfg, trainer, model, datamodule, status, time.time() - started)
            if trainer.is_global_zero:
                results.write_results(output_dir / "results.json", record)
    rank_zero_info("\n" + results.format_results_table(record))
    return record


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def _train_app(cfg: DictConfig) -> None:
    log.info("config digest %s", config_digest(cfg))
    train(cfg)


def main() -> None:
    """`python -m pipeline.train [overrides]` / `mixpipe-train [overrides]` (Hydra's CLI)."""
    _train_app()


if __name__ == "__main__":
    main()
