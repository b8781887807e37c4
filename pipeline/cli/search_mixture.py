"""Mixture search, one command: draw K mixtures, train a proxy on each, fit, optimise, write the mixture.

    python -m pipeline.cli.search_mixture --out search/demo --num-mixtures 16 \\
        --group high=eng,rus,deu --group low=san,haw,cor --objective low=2 \\
        experiment=demo run.total_steps=200 logger=none

Steps (RegMix, Liu et al. 2024; Data Mixing Laws, Ye et al. 2024):

1. the training overrides are composed and the data prepared; the domains are the selected
   sources, or the `--group`s (plus `rest`, the sources no group names), a group's mass split
   over its sources in proportion to their training documents;
2. K mixtures are drawn (`pipeline/mixing/search.py`: seeded Dirichlet around temperature
   sampling at `--tau`, epoch caps `--max-epochs` over `--budget` documents), each written as
   `OUT/conf/mixture/search_NNN.yaml` (a `Manual` stage);
3. every proxy without a completed `results.json` in `OUT/proxies/search_NNN/` is trained in
   one Hydra multirun (`python -m pipeline.train -m ... mixture=search_000,...`, any launcher:
   add `hydra/launcher=local_submitit` or `slurm` to the overrides; `ckpt_path=last`, so a
   proxy interrupted mid-run resumes from its checkpoint). Rerunning the command after an
   interruption trains only what is missing;
4. per-domain validation loss (mean over the domain's sources) of every completed proxy;
5. the data mixing law and RegMix-style linear / log-linear regressions are fitted on all but
   `--held-out` proxies and scored on those; the best (pooled log RMSE) is refitted on all;
6. the objective sum_d v_d L_d(r) (`--objective DOMAIN=WEIGHT`, default 1 each) is minimised
   over the simplex under the epoch caps (`pipeline.scaling.mixture.optimise_mixture`);
7. written: `OUT/conf/mixture/<--name>.yaml`, `OUT/report.json`, `OUT/report.md`, `OUT/proxies.csv`.

Train with the result (the printed command):

    python -m pipeline.train experiment=demo hydra.searchpath=[file://$PWD/search/demo/conf] mixture=searched

In a checkout, `python scripts/search_mixture.py` runs the same. Exit status 2: bad input
(with the reason); 1: proxies failed or too few completed to fit (the log is named).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config.compose import compose_config
from pipeline.config.data import build_split, selected_sources
from pipeline.evaluation.sweeps import collect
from pipeline.mixing.search import (
    check_num_mixtures,
    draw_mixtures,
    epoch_caps,
    expand_to_sources,
    group_domains,
    min_mixtures,
)
from pipeline.mixing.temperature import temperature_probs
from pipeline.mixing.unimax import unimax_allocation
from pipeline.prepare import prepare
from pipeline.scaling.mixture import optimise_mixture
from pipeline.scaling.regmix import (
    MODELS,
    compare_models,
    cross_validate,
    fit_model,
    held_out_split,
    with_max_increase,
)
from pipeline.storage.atomic import atomic_write, atomic_write_json
from pipeline.training.results import strict_json

PREFIX = "search_"
# Overrides the search sets itself for every proxy.
RESERVED = ("mixture", "output_dir", "ckpt_path", "hydra.sweep.dir", "hydra.searchpath")


def parse_pairs(texts: list[str], flag: str) -> dict[str, str]:
    out = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} {text!r}: expected NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def proxy_name(k: int) -> str:
    return f"{PREFIX}{k:03d}"


def mixture_yaml(source_probs: dict[str, float], comment: str) -> str:
    """A `conf/mixture/<name>.yaml` with one `Manual` stage: the probabilities as draw masses;
    a source not named gets 0 (it is not drawn)."""
    body = {"size_unit": "documents",
            "stages": [{"_target_": "pipeline.mixing.Manual",
                        "weights": {s: round(float(p), 10) for s, p in source_probs.items()},
                        "default": 0.0, "mode": "set"}]}
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(body, sort_keys=False)


def write_if_changed(path: Path, text: str) -> None:
    """Atomic write, skipped when the file already holds `text` (its mtime says when it was drawn)."""
    if path.is_file() and path.read_text() == text:
        return
    atomic_write(path, lambda stream: stream.write(text))


def proxy_status(proxies: Path, name: str) -> str:
    """"missing", "unreadable", "usable" (completed with a finite validation loss for every
    source), or the run's own status ("completed" then means: without those losses)."""
    path = proxies / name / "results.json"
    if not path.is_file():
        return "missing"
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "unreadable"
    status = str(record.get("status", "unknown"))
    sources = record.get("sources") or {}
    if status == "completed" and sources and all(s.get("val_loss") is not None for s in sources.values()):
        return "usable"
    return status


def train_proxies(names: list[str], out: Path, overrides: list[str], quiet: bool) -> tuple[int, Path]:
    """One Hydra multirun over `names`; returns (exit status, log file). Prints each proxy as it completes."""
    runs = out / "multirun"
    runs.mkdir(parents=True, exist_ok=True)
    attempt = sum(1 for p in runs.iterdir() if p.is_dir())
    log_path = out / "logs" / f"train_{attempt:02d}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    proxies = out / "proxies"
    command = [sys.executable, "-m", "pipeline.train", "-m", *overrides,
               f"hydra.searchpath=[file://{(out / 'conf').resolve()}]",
               f"hydra.sweep.dir={(runs / f'{attempt:02d}').resolve()}",
               "mixture=" + ",".join(names),
               f"output_dir={proxies.resolve()}/${{hydra:runtime.choices.mixture}}",
               "ckpt_path=last"]
    print(f"training {len(names)} proxies (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        reported = set()
        while True:
            finished = process.poll() is not None
            for name in names:
                if name not in reported and proxy_status(proxies, name) != "missing":
                    reported.add(name)
                    if not quiet:
                        status = proxy_status(proxies, name).replace("usable", "completed")
                        print(f"  {name}: {status} ({len(reported)}/{len(names)})", flush=True)
            if finished:
                return process.returncode, log_path
            time.sleep(1.0)


def domain_losses(frame, names: list[str], domains: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """{proxy: {domain: mean source_val_loss of its sources}} for completed proxies with finite losses."""
    out = {}
    done = frame[frame["status"] == "completed"]
    for name in names:
        rows = done[done["run"] == name].set_index("source")["source_val_loss"]
        if rows.empty:
            continue
        losses = {d: float(rows.reindex(members).astype(float).mean()) for d, members in domains.items()}
        if all(math.isfinite(v) for v in losses.values()):
            out[name] = losses
    return out


def baselines(sizes: dict[str, float], domains: dict[str, list[str]], budget: float,
              max_epochs: float | None) -> dict[str, dict[str, float]]:
    """Per-domain probabilities of tau = 1, tau = 5 and UniMax over the sources (then summed per domain)."""
    names = list(sizes)
    array = np.array([float(sizes[n]) for n in names])
    by_source = {"tau=1": temperature_probs(array, 1.0), "tau=5": temperature_probs(array, 5.0)}
    try:
        allocation = unimax_allocation(array, budget, max_epochs or 1.0)
        by_source[f"unimax(max_epochs={max_epochs or 1.0:g})"] = allocation / allocation.sum()
    except ValueError:
        pass  # the budget exceeds what the cap allows: no UniMax column
    out = {}
    for label, probs in by_source.items():
        per_source = dict(zip(names, probs, strict=True))
        out[label] = {d: float(sum(per_source[s] for s in members)) for d, members in domains.items()}
    return out


def markdown_report(report: dict[str, Any]) -> str:
    domains = list(report["domains"])
    lines = [f"# Mixture search: {report['name']}", "",
             f"{report['num_completed']} of {report['num_mixtures']} proxies completed; fit on "
             f"{report['num_completed'] - report['num_held_out']}, scored on {report['num_held_out']} held out. "
             f"Objective: sum of {', '.join(f'{v:g} x L[{d}]' for d, v in report['objective'].items())}.", "",
             "## Fits", "",
             f"Held out: {report['num_held_out']} proxies (fitted on the others). Leave-one-out: each of the "
             f"{report['num_completed']} proxies predicted by a fit on the others; the model is chosen there.", "",
             "| model | held-out rmse (log) | held-out Spearman | LOO rmse (log) | LOO MAPE | LOO Spearman "
             "(objective) | LOO Spearman per domain |",
             "|---|---|---|---|---|---|---|"]
    for model, info in report["fits"].items():
        cv = report["leave_one_out"].get(model, {})
        mark = " (chosen)" if model == report["model"] else ""
        held = (f"{info['errors']['rmse_log']:.4f} | {_num(info['errors']['spearman'])}" if "errors" in info
                else f"not fitted: {info.get('error')} | -")
        if "errors" in cv:
            per_domain = ", ".join(f"{d} {_num(r)}" for d, r in zip(domains, cv["spearman"], strict=True))
            loo = (f"{cv['errors']['rmse_log']:.4f} | {cv['errors']['mape']:.4f} | "
                   f"{_num(cv['objective_errors']['spearman'])} | {per_domain}")
        else:
            loo = f"not fitted: {cv.get('error')} | - | - | -"
        lines.append(f"| {model}{mark} | {held} | {loo} |")
    lines += ["", f"## Predicted vs observed, held-out proxies ({report['model']}, "
              f"{report['held_out_predictions']} predictions)", "",
              "| proxy | " + " | ".join(f"{d} pred | {d} obs" for d in domains) + " |",
              "|---|" + "---|---|" * len(domains)]
    for row in report["held_out"]:
        cells = " | ".join(f"{row['predicted'][d]:.4f} | {row['observed'][d]:.4f}" for d in domains)
        lines.append(f"| {row['proxy']} | {cells} |")
    columns = ["chosen", *report["baselines"]]
    lines += ["", "## Chosen mixture (per domain) beside the usual ones", "",
              "| domain | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for d in domains:
        values = [report["chosen"]["domain_probs"][d]] + [report["baselines"][c][d] for c in report["baselines"]]
        lines.append(f"| {d} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    predicted = report["predicted_objective"]
    lines.append("| predicted objective | " + " | ".join(_num(predicted.get(c)) for c in columns) + " |")
    increase = report["chosen"]["increase_over_tau1"]
    lines += ["", "Predicted loss of the chosen mixture minus that at tau = 1, per domain: "
              + ", ".join(f"{d} {v:+.4f}" for d, v in increase.items())
              + ("" if report["max_increase"] is None else f" (asked: at most +{report['max_increase']:g})") + "."]
    lines += ["", "Train with it:", "", "```bash", report["train_command"], "```", ""]
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def search(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    overrides = list(args.overrides)
    for text in overrides:
        key = text.lstrip("+~").partition("=")[0]
        if "=" not in text:
            raise ValueError(f"{text!r} is not a Hydra override (KEY=VALUE)")
        if key in RESERVED:
            raise ValueError(f"override {key!r} is set by the search for every proxy; remove it")
    groups = {name: [s for s in value.split(",") if s] for name, value in parse_pairs(args.group, "--group").items()}
    weights = {name: float(value) for name, value in parse_pairs(args.objective, "--objective").items()}

    # 1. data: the sources the proxies train on, their training documents
    cfg = compose_config([o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))])
    corpus, _ = prepare(cfg, progress=False)
    names = selected_sources(cfg, corpus)
    sizes = {n: float(c) for n, c in build_split(cfg, corpus, names).train.items() if n in names}
    domains = group_domains(names, groups)
    domain_sizes = {d: sum(sizes[s] for s in members) for d, members in domains.items()}
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise ValueError(f"--objective names unknown domain {unknown[0]!r}; domains are {list(domains)}")
    v = np.array([weights.get(d, 1.0) for d in domains])
    if np.any(v < 0) or not np.all(np.isfinite(v)) or v.sum() <= 0:
        raise ValueError(f"--objective weights must be finite, >= 0 and not all 0, got {weights}")
    budget = float(args.budget or cfg.run.total_steps * cfg.run.global_batch_size)
    check_num_mixtures(args.num_mixtures, len(domains), args.held_out)

    # 2. draws, checked against a previous start in the same folder
    draws = draw_mixtures(domain_sizes, args.num_mixtures, seed=args.seed, tau=args.tau,
                          concentration=args.concentration,
                          budget=budget if args.max_epochs else None, max_epochs=args.max_epochs,
                          num_held_out=args.held_out)
    settings = {"num_mixtures": args.num_mixtures, "seed": args.seed, "tau": args.tau,
                "concentration": args.concentration, "max_epochs": args.max_epochs, "budget": budget,
                "domains": domains, "overrides": overrides}
    state_path = out / "search.json"
    if state_path.is_file():
        previous = json.loads(state_path.read_text()).get("settings", {})
        changed = [k for k in settings if previous.get(k) != json.loads(json.dumps(settings[k]))]
        if changed:
            raise ValueError(f"{out} holds a search started with other settings ({', '.join(changed)}: "
                             f"{previous.get(changed[0])!r} there, {settings[changed[0]]!r} now); "
                             "use another --out or the same settings")
    mixtures = {proxy_name(k): dict(zip(domains, row.tolist(), strict=True)) for k, row in enumerate(draws)}
    atomic_write_json(state_path, strict_json({"settings": settings, "sizes": sizes, "mixtures": mixtures}), indent=2)
    for name, probs in mixtures.items():
        comment = (f"mixture search proxy {name} (pipeline/cli/search_mixture.py), seed {args.seed}\n"
                   "per domain: " + ", ".join(f"{d}={p:.4f}" for d, p in probs.items()))
        write_if_changed(out / "conf" / "mixture" / f"{name}.yaml",
                         mixture_yaml(expand_to_sources(probs, domains, sizes), comment))
    print(f"{len(mixtures)} mixtures over {len(domains)} domains ({', '.join(domains)}); {len(names)} sources")

    # 3. train what is not finished
    proxies = out / "proxies"
    pending = [n for n in mixtures if proxy_status(proxies, n) != "usable"]
    if len(pending) < len(mixtures):
        print(f"{len(mixtures) - len(pending)} proxies already completed: not retrained")
    for name in pending:
        # Completed without validation losses (e.g. resumed from its final checkpoint, which
        # trains and validates nothing): kept aside under OUT/stale/, trained again from scratch.
        if proxy_status(proxies, name) == "completed" and not args.no_train:
            stale = out / "stale" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
            stale.parent.mkdir(parents=True, exist_ok=True)
            (proxies / name).rename(stale)
            print(f"{name}: completed without validation losses; moved to {stale}, training it again")
    if pending and not args.no_train:
        code, log_path = train_proxies(pending, out, overrides, args.quiet)
        if code != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            print(f"proxy training exited with status {code} (log: {log_path}):\n  " + "\n  ".join(tail),
                  file=sys.stderr)

    # 4. collect
    frame = collect(proxies) if proxies.is_dir() else None
    if frame is not None:
        atomic_write(out / "proxies.csv", lambda stream: frame.to_csv(stream, index=False))
    losses = domain_losses(frame, list(mixtures), domains) if frame is not None else {}
    missing = [n for n in mixtures if n not in losses]
    if missing:
        print(f"{len(missing)} proxies without a completed run and finite losses: {', '.join(missing)}",
              file=sys.stderr)
    need = min_mixtures(len(domains), args.held_out)
    if len(losses) < need:
        print(f"error: {len(losses)} completed proxies, the fit needs {need}; rerun to finish the others",
              file=sys.stderr)
        return 1
    done = list(losses)
    R = np.array([[mixtures[n][d] for d in domains] for n in done])
    Y = np.array([[losses[n][d] for d in domains] for n in done])

    # 5. fits compared on held-out proxies, the best refitted on all
    held_out = held_out_split(len(done), args.held_out, args.seed)
    fits = compare_models(R, Y, list(domains), held_out, target_weights=v, models=args.models)
    # Leave-one-out over every proxy: K out-of-sample predictions per model instead of
    # `--held-out`; the model with the lowest pooled log RMSE there is chosen.
    loo = {m: cross_validate(R, Y, list(domains), m, target_weights=v) for m in args.models}
    scored = {m: f for m, f in loo.items() if "errors" in f} or {m: f for m, f in fits.items() if "errors" in f}
    if not scored:
        print("error: no model could be fitted: " + "; ".join(f"{m}: {f['error']}" for m, f in fits.items()),
              file=sys.stderr)
        return 1
    model = min(scored, key=lambda m: scored[m]["errors"]["rmse_log"])
    loss_fn = fit_model(model, R, Y, list(domains))

    # 6. optimise under the epoch caps (and, with --max-increase, near proportional sampling)
    caps = np.ones(len(domains))
    if args.max_epochs:
        caps = np.minimum(caps, epoch_caps(np.array(list(domain_sizes.values())), budget, args.max_epochs))
    if args.caps == "observed":  # stay where the proxies were: the fits do not extrapolate
        observed = np.minimum(caps, R.max(axis=0))
        caps = observed if observed.sum() >= 1.0 else caps
    base = baselines(sizes, domains, budget, args.max_epochs)
    reference = np.asarray(loss_fn(np.array([base["tau=1"][d] for d in domains])), dtype=float)
    if args.max_increase is None:
        result = optimise_mixture(loss_fn, len(domains), target_weights=v, caps=caps, seed=args.seed)
    else:
        constrained = with_max_increase(loss_fn, reference, args.max_increase)
        result = optimise_mixture(constrained, len(domains), target_weights=np.append(v, 1.0), caps=caps,
                                  seed=args.seed)
    predicted_losses = np.asarray(loss_fn(result.r), dtype=float)
    chosen = dict(zip(domains, result.r.tolist(), strict=True))

    # 7. outputs
    comment = (f"mixture searched by pipeline/cli/search_mixture.py over {len(done)} proxies ({model} fit), "
               f"seed {args.seed}\nper domain: " + ", ".join(f"{d}={p:.4f}" for d, p in chosen.items()) +
               "\ntrain with the same data overrides as the search: " + " ".join(overrides))
    mixture_path = out / "conf" / "mixture" / f"{args.name}.yaml"
    write_if_changed(mixture_path, mixture_yaml(expand_to_sources(chosen, domains, sizes), comment))
    predicted = {"chosen": float(v @ np.asarray(loss_fn(result.r)))}
    for label, probs in base.items():
        predicted[label] = float(v @ np.asarray(loss_fn(np.array([probs[d] for d in domains]))))
    train_command = " ".join([sys.executable, "-m", "pipeline.train", *overrides,
                              f"'hydra.searchpath=[file://{out / 'conf'}]'", f"mixture={args.name}"])
    held = [n for n, h in zip(done, held_out, strict=True) if h]
    held_pred = fits[model]["pred"] if "errors" in fits[model] else loo[model]["pred"][held_out]
    report = {
        "name": args.name, "mixture_file": str(mixture_path), "train_command": train_command,
        "num_mixtures": len(mixtures), "num_completed": len(done), "num_held_out": int(held_out.sum()),
        "domains": domains, "objective": dict(zip(domains, v.tolist(), strict=True)), "model": model,
        "fits": {m: {k: f[k] for k in ("errors", "objective_errors", "error") if k in f} for m, f in fits.items()},
        "leave_one_out": {m: {k: f[k] for k in ("errors", "objective_errors", "spearman", "error") if k in f}
                          for m, f in loo.items()},
        # the held-out fit's predictions; its leave-one-out ones where it could not be fitted there
        "held_out_predictions": "held-out fit" if "errors" in fits[model] else "leave-one-out",
        "held_out": [{"proxy": n, "mixture": mixtures[n],
                      "predicted": dict(zip(domains, held_pred[i].tolist(), strict=True)),
                      "observed": losses[n]} for i, n in enumerate(held)],
        "chosen": {"domain_probs": chosen, "source_probs": expand_to_sources(chosen, domains, sizes),
                   "predicted_losses": dict(zip(domains, predicted_losses.tolist(), strict=True)),
                   "increase_over_tau1": dict(zip(domains, (predicted_losses - reference).tolist(), strict=True)),
                   "at_cap": [list(domains)[j] for j in result.at_cap], "violation": result.violation},
        "baselines": base, "predicted_objective": predicted, "budget": budget, "max_epochs": args.max_epochs,
        "caps": dict(zip(domains, caps.tolist(), strict=True)), "max_increase": args.max_increase,
        "proxies": {n: {"mixture": mixtures[n], "losses": losses.get(n)} for n in mixtures},
    }
    atomic_write_json(out / "report.json", strict_json(report), indent=2)
    text = markdown_report(report)
    atomic_write(out / "report.md", lambda stream: stream.write(text))
    print(text)
    print(f"wrote {mixture_path}, {out / 'report.json'}, {out / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of every proxy run (experiment=..., run.*)")
    parser.add_argument("--out", type=Path, required=True, help="search folder (mixtures, proxies, report)")
    parser.add_argument("--num-mixtures", "-k", type=int, default=16, help="K proxies (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draws and the held-out choice")
    parser.add_argument("--group", action="append", default=[], metavar="NAME=SRC,SRC,...",
                        help="a domain made of these sources (repeatable; the others form 'rest')")
    parser.add_argument("--tau", type=float, default=1.0, help="temperature of the prior (default 1)")
    parser.add_argument("--concentration", type=float, default=None,
                        help="Dirichlet concentration around the prior (default: number of domains)")
    parser.add_argument("--max-epochs", type=float, default=None,
                        help="cap every domain at this many passes over --budget documents")
    parser.add_argument("--budget", type=float, default=None,
                        help="documents of the run the mixture is for (default: run.total_steps x "
                             "run.global_batch_size of the overrides)")
    parser.add_argument("--held-out", type=int, default=3, help="proxies held out to score the fits (default 3)")
    parser.add_argument("--objective", action="append", default=[], metavar="DOMAIN=WEIGHT",
                        help="weight of a domain's validation loss in the objective (default 1 each)")
    parser.add_argument("--max-increase", type=float, default=None, metavar="NATS",
                        help="no domain's predicted loss above its prediction at tau = 1 by more than this")
    parser.add_argument("--models", default=",".join(MODELS), help=f"fits to compare (default {','.join(MODELS)})")
    parser.add_argument("--caps", choices=("observed", "none"), default="observed",
                        help="observed (default): no domain above its largest share in a proxy; "
                             "none: only the epoch caps")
    parser.add_argument("--name", default="searched", help="name of the chosen mixture (mixture=<name>)")
    parser.add_argument("--no-train", action="store_true", help="do not train; fit what is completed")
    parser.add_argument("--quiet", action="store_true", help="no line per finished proxy")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        unknown = [m for m in args.models if m not in MODELS]
        if unknown:
            raise ValueError(f"--models: unknown model {unknown[0]!r}; choose from {MODELS}")
        return search(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
