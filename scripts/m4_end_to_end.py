"""M4 end to end: the same contrastive training with and without M4 on the embedded default.

For each seed, trains `experiment=demo_multimodal` twice with identical settings except
`balance` (none vs m4), then prints one table: the training data's representation and
association statistics (before/after M4), the model's representation and association bias
on the balanced reference source, retrieval recall@1/5/10 on held-out rows and zero-shot
accuracy; medians over seeds and the M4 - baseline difference.

    python scripts/m4_end_to_end.py --steps 300 --seeds 0 1 --eta 0.6 --solver exact

Runs go to `--output` (default outputs/m4_end_to_end/<arm>-seed<seed>/), one results.json each;
a summary JSON is written to <output>/summary.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_harness import DEFAULT_CACHE, REPO, dumps, summarize, table, timed, write_json

METRICS = ("val/bias/representation/ring", "val/bias/representation_max", "val/bias/association/ring",
           "val/bias/association_max", "val/retrieval/i2t_R@1", "val/retrieval/i2t_R@5",
           "val/retrieval/i2t_R@10", "val/retrieval/t2i_R@1", "val/retrieval/t2i_R@5",
           "val/retrieval/t2i_R@10", "val/zero_shot/accuracy", "val/loss")


def compose(overrides):
    from pipeline.config.compose import compose_config

    return compose_config(overrides)


def data_statistics(cfg) -> dict:
    """Training-data statistics (max |representation|, max |association|, kept fraction)."""
    import numpy as np

    from pipeline.balance.m4.statistics import m4_statistics
    from pipeline.balance.multimodal import balance_split, training_examples
    from pipeline.config.data import build_split, selected_sources
    from pipeline.data.image_text import image_text_info
    from pipeline.prepare import prepare

    corpus, _ = prepare(cfg, progress=False)
    names = selected_sources(cfg, corpus)
    split = build_split(cfg, corpus, names)
    info = image_text_info(corpus, names)
    if cfg.get("balance") and cfg.balance.get("method") == "m4":
        _, _, report = balance_split(cfg.balance, corpus, names, split, info, seed=cfg.seed)
        after = report["after"]
        return {"max_abs_representation": after["max_abs_representation"],
                "max_abs_association": after["max_abs_association"],
                "kept_fraction": after["kept_fraction"], "feasible": report["feasible"],
                "kept_rows": report.get("kept_rows")}
    examples = training_examples(corpus, names, split)
    s = np.concatenate([examples[n][0] for n in names])
    y = np.concatenate([examples[n][1] for n in names])
    stats = m4_statistics(s, y, None, 0.5, attribute_names=info["attribute_names"], label_names=info["label_names"])
    return {"max_abs_representation": stats.max_abs_representation,
            "max_abs_association": stats.max_abs_association, "kept_fraction": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eta", type=float, default=0.6)
    parser.add_argument("--solver", default="exact", choices=["exact", "streaming"])
    parser.add_argument("--mode", default="subsample", choices=["subsample", "weights"])
    parser.add_argument("--output", type=Path, default=REPO / "outputs" / "m4_end_to_end")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both arms")
    args = parser.parse_args()

    from pipeline.train import train

    arms = {"none": [], "m4": ["balance=m4", f"balance.eta={args.eta}", f"balance.solver={args.solver}",
                               f"balance.mode={args.mode}"]}
    rows: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in args.seeds:
        for arm, extra in arms.items():
            out = args.output / f"{arm}-seed{seed}"
            cfg = compose(["experiment=demo_multimodal", f"seed={seed}", f"run.total_steps={args.steps}",
                           f"evaluation.every_n_steps={args.steps}", f"checkpoint.every_n_steps={args.steps}",
                           "logger=csv", "progress=false", "trainer.enable_progress_bar=false",
                           f"output_dir={out}", f"cache_dir={args.cache_dir}", *extra, *args.overrides])
            stats = data_statistics(cfg)
            record, wall = timed(train, cfg)
            row = {"seed": seed, "wall_s": wall, "data": stats,
                   **{m: record["metrics"].get(m, float("nan")) for m in METRICS}}
            rows[arm].append(row)
            print(dumps({"arm": arm, **row}), flush=True)
    summary = {"command": " ".join(sys.argv), "steps": args.steps, "seeds": args.seeds, "eta": args.eta,
               "solver": args.solver, "mode": args.mode, "runs": rows}
    write_json(args.output / "summary.json", summary)

    def median(arm, key, data=False):
        return summarize(r["data"][key] if data else r[key] for r in rows[arm]).median

    table_rows = []
    for key in ("max_abs_representation", "max_abs_association", "kept_fraction"):
        a, b = median("none", key, True), median("m4", key, True)
        table_rows.append([f"data: {key}", a, b, b - a])
    for key in METRICS:
        a, b = median("none", key), median("m4", key)
        table_rows.append([f"model: {key}", a, b, b - a])
    m4_column = f"M4 (eta {args.eta}, {args.mode})"
    print()
    print(table([f"quantity (median over seeds {args.seeds})", "no M4", m4_column, "M4 - none"], table_rows,
                formats={"no M4": ".4f", m4_column: ".4f", "M4 - none": "+.4f"}, markdown=True))


if __name__ == "__main__":
    main()
