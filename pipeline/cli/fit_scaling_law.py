"""Fit a scaling law to a results table: parameters with bootstrap intervals, JSON, plots.

    # Chinchilla L(N, D) from (params, FLOPs, loss), D = C / (6 N); 1000 bootstrap refits
    mixpipe-fit --csv runs.csv --law chinchilla \\
        --n-col num_params --c-col train_flops --loss-col val_loss --bootstrap 1000 --out fits/

    # multilingual joint law from a long table (one row per run and source)
    mixpipe-fit --csv runs_by_source.csv --law multilingual \\
        --n-col num_params --w-col sample_prob --source-col source --loss-col val_loss --out fits/

    # a sweep table (scripts/collect_sweep.py): one source's loss against its own tokens
    mixpipe-fit --csv sweep.csv --where source=eng \\
        --where status=completed --law power --x-col tokens_seen --loss-col source_val_loss \\
        --out fits/

    # data mixing law, one fit per target loss column; mixtures and losses in two files
    mixpipe-fit --csv mix.csv --csv loss.csv --on index \\
        --law mixing --mixture-prefix train_ --loss-col 'metric/a_loss' --loss-col 'metric/b_loss' \\
        --optimise-mixture --out fits/

Prints one table per fit (parameter, estimate, CI; "not determined" marks a parameter the data
do not fix: degenerate design such as identical x, a zero-width or unbounded bootstrap
interval, with a note saying why, also under ``not_determined`` in the JSON); writes ``OUT/fit.json`` and PNG plots
(``fit*.png``, ``residuals*.png``, and ``frontier.png`` for the Chinchilla law). Bad input
exits with status 2 and a message naming the column and value.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np

from pipeline.scaling import (
    LAWS,
    bootstrap,
    chinchilla_optimal,
    fit_law,
    mixing_loss_fn,
    optimise_mixture,
    read_tables,
    table_from_frame,
    undetermined_parameters,
)
from pipeline.storage.atomic import atomic_write_json

log = logging.getLogger("fit_scaling_law")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--csv", action="append", required=True, help="input CSV (repeat to join on --on)"
    )
    p.add_argument("--on", help="join column when several --csv are given")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="COL=VALUE",
        help="keep only rows whose COL equals VALUE (repeatable, all must hold; numeric "
        "columns compare as numbers), e.g. --where source=eng --where status=completed",
    )
    p.add_argument("--law", choices=LAWS, required=True)
    p.add_argument(
        "--loss-col",
        action="append",
        help="loss column (repeatable for --law mixing); default: loss",
    )
    p.add_argument("--n-col", help="parameters column (chinchilla, multilingual)")
    p.add_argument("--d-col", help="tokens column (chinchilla)")
    p.add_argument("--c-col", help="FLOPs column (chinchilla; D = C / (k N))")
    p.add_argument(
        "--flops-per-param-token", type=float, default=6.0, help="k in C = k N D (default 6)"
    )
    p.add_argument("--x-col", help="x column (power)")
    p.add_argument("--w-col", help="mixture weight of the row's source (multilingual)")
    p.add_argument("--source-col", help="source name column (multilingual)")
    p.add_argument("--mixture-cols", help="comma-separated mixture proportion columns (mixing)")
    p.add_argument("--mixture-prefix", help="mixture columns are those starting with this (mixing)")
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log residuals")
    p.add_argument("--grid-size", type=int, default=4, help="values per init-grid axis")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits (0: none)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=0, help="processes (0: all cores)")
    p.add_argument(
        "--budget",
        type=float,
        action="append",
        help="compute budget C (FLOPs) for N_opt, D_opt (chinchilla)",
    )
    p.add_argument(
        "--optimise-mixture", action="store_true", help="mixing: minimise the sum of target losses"
    )
    p.add_argument(
        "--caps",
        choices=("observed", "none"),
        default="observed",
        help="mixing: cap each proportion at its largest value in the data (default; the law is "
        "not trusted outside the mixtures it was fitted on) or leave it free",
    )
    p.add_argument("--target-weights", help="mixing: comma-separated weights of the target losses")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--out", required=True, help="output directory")
    return p.parse_args(argv)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def print_table(title: str, fit, boot, level: float, undetermined: dict[str, str] | None = None) -> None:
    print(
        f"\n{title}: {fit.law.name} law, {fit.num_points} points, Huber objective {fit.objective:.6g} "
        f"(delta {fit.delta:g}), {fit.num_converged}/{fit.num_starts} starts converged"
    )
    w = max(12, *(len(k) for k in fit.params))
    head = f"{'parameter':<{w}} {'estimate':>12}"
    if boot is not None:
        head += f" {f'{100 * level:g}% CI':>27}"
    print(head)
    print("-" * len(head))
    for name, v in fit.params.items():
        row = f"{name:<{w}} {_fmt(v):>12}"
        if boot is not None:
            lo, hi = boot.ci[name]
            row += f" [{_fmt(lo):>11}, {_fmt(hi):>11}]"
        if undetermined and name in undetermined:
            row += "  not determined"
        print(row)
    for name, reason in (undetermined or {}).items():
        print(f"note: {name} is {reason}")
    for name, side in fit.at_bounds().items():
        print(
            f"note: internal parameter {name!r} ended on its {side} bound "
            f"({dict(zip(fit.law.theta_names, fit.law.bounds(), strict=True))[name]}): "
            "the data do not determine it"
        )


def select_rows(df, conditions: list[str]):
    """Rows where every ``COL=VALUE`` holds; ``ValueError`` naming a bad column or condition."""
    import pandas as pd

    for cond in conditions:
        col, sep, value = cond.partition("=")
        if not sep or not col:
            raise ValueError(f"--where {cond!r}: expected COL=VALUE")
        if col not in df.columns:
            raise ValueError(
                f"--where {cond!r}: column {col!r} not found; available columns: {list(df.columns)}"
            )
        column = df[col]
        number = pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0]
        if pd.api.types.is_numeric_dtype(column) and not pd.isna(number):
            keep = column == number
        else:
            keep = column.astype(str) == value
        if not keep.any():
            seen = sorted(map(str, column.dropna().unique()))[:10]
            raise ValueError(f"--where {cond!r}: no row matches; values of {col!r} include {seen}")
        df = df[keep]
    return df.reset_index(drop=True)


def _atomic_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=2, default=float)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    out = Path(args.out)
    try:
        df = select_rows(read_tables(args.csv, on=args.on), args.where)
        loss_cols = args.loss_col or ["loss"]
        if len(loss_cols) > 1 and args.law != "mixing":
            raise ValueError("several --loss-col are only for --law mixing (one law per target)")
        mixture_cols = None
        if args.law == "mixing":
            if args.mixture_cols:
                mixture_cols = [c.strip() for c in args.mixture_cols.split(",") if c.strip()]
            elif args.mixture_prefix:
                mixture_cols = [c for c in df.columns if str(c).startswith(args.mixture_prefix)]
                if not mixture_cols:
                    raise ValueError(
                        f"no column starts with --mixture-prefix {args.mixture_prefix!r}"
                    )
        tables = [
            table_from_frame(
                df,
                law=args.law,
                loss_col=lc,
                n_col=args.n_col,
                d_col=args.d_col,
                c_col=args.c_col,
                x_col=args.x_col,
                w_col=args.w_col,
                source_col=args.source_col,
                mixture_cols=mixture_cols,
                flops_per_param_token=args.flops_per_param_token,
                name=",".join(args.csv),
            )
            for lc in loss_cols
        ]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    jobs = args.jobs if args.jobs > 0 else None
    report: dict = {"law": args.law, "csv": args.csv, "where": args.where, "fits": []}
    fits = []
    for i, t in enumerate(tables):
        fit = fit_law(t.law, t.X, t.y, delta=args.delta, grid_size=args.grid_size, n_jobs=jobs)
        boot = None
        if args.bootstrap > 0:
            boot = bootstrap(
                fit,
                t.X,
                t.y,
                num_boot=args.bootstrap,
                seed=args.seed,
                level=args.level,
                n_jobs=jobs,
            )
        fits.append(fit)
        title = t.columns["loss"]
        undetermined = undetermined_parameters(fit, t.X, t.y, boot)
        print_table(str(title), fit, boot, args.level, undetermined)
        entry = {"columns": t.columns, **fit.to_dict(), "not_determined": undetermined}
        if boot is not None:
            entry["bootstrap"] = boot.to_dict()
        if args.law == "chinchilla" and args.budget:
            entry["compute_optimal"] = []
            print(
                f"\n{'budget C (FLOPs)':<18} {'N_opt':>11} {'D_opt':>11}  (C = {args.flops_per_param_token:g} N D)"
            )
            for C in args.budget:
                n, d = chinchilla_optimal(fit.params, C, args.flops_per_param_token)
                row = {"C": C, "N_opt": float(n), "D_opt": float(d)}
                line = f"{C:<18.4g} {float(n):>11.4g} {float(d):>11.4g}"
                if boot is not None:
                    ns = np.array(
                        [
                            chinchilla_optimal(
                                dict(zip(boot.param_names, s, strict=True)),
                                C,
                                args.flops_per_param_token,
                            )[0]
                            for s in boot.samples
                        ]
                    )
                    q = 100 * (1 - args.level) / 2
                    lo, hi = np.percentile(ns, [q, 100 - q])
                    row["N_opt_ci"] = [float(lo), float(hi)]
                    line += f"  N_opt CI [{lo:.4g}, {hi:.4g}]"
                entry["compute_optimal"].append(row)
                print(line)
        report["fits"].append(entry)
        if not args.no_plots:
            from pipeline.scaling import plots

            suffix = (
                ""
                if len(tables) == 1
                else f"_{i}_{re.sub(r'[^A-Za-z0-9]+', '_', str(title)).strip('_')}"
            )
            plots.plot_fit(fit, t.X, t.y, out / f"fit{suffix}.png", boot)
            plots.plot_residuals(fit, t.X, t.y, out / f"residuals{suffix}.png")
            if args.law == "chinchilla":
                plots.plot_frontier(
                    fit, out / "frontier.png", boot, X=t.X, k=args.flops_per_param_token
                )

    if args.optimise_mixture:
        if args.law != "mixing":
            print("error: --optimise-mixture needs --law mixing", file=sys.stderr)
            return 2
        v = None
        if args.target_weights:
            v = [float(x) for x in args.target_weights.split(",")]
        caps = tables[0].X.max(axis=0) if args.caps == "observed" else None
        if caps is not None and caps.sum() < 1:
            caps = None  # the observed maxima cannot make a mixture; fall back to no caps
        res = optimise_mixture(
            mixing_loss_fn(fits),
            len(fits[0].law.domains),
            target_weights=v,
            caps=caps,
            seed=args.seed,
        )
        report["mixture"] = {
            "r": dict(zip(fits[0].law.domains, map(float, res.r), strict=True)),
            "objective": res.objective,
            "predicted_losses": dict(zip(loss_cols, map(float, res.losses), strict=True)),
            "violation": res.violation,
            "caps": args.caps,
        }
        print(
            f"\noptimised mixture (objective {res.objective:.5g}, feasibility error {res.violation:.1e}):"
        )
        for d, r in sorted(report["mixture"]["r"].items(), key=lambda kv: -kv[1]):
            print(f"  {d:<40} {r:.4f}")
    _atomic_json(out / "fit.json", report)
    log.info("wrote %s", out / "fit.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
