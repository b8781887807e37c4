"""Every shell command in README.md and docs/*.md runs, scaled down, and does what the docs say.

Commands are the logical lines (backslash continuations joined, comments dropped) of the
fenced blocks tagged `bash`; every other fenced block must say what it is (`text`, `python`,
...), so a command cannot hide in an untagged block. `COVERAGE` below holds, for each command
exactly as documented, how it is scaled down: arguments appended (Hydra lets a later override
win, so `run.total_steps=2` after the documented value shrinks the run without editing it),
text replaced (process counts, ports, paths), and what the run must leave behind. A documented
command without an entry fails `test_every_documented_command_is_covered`, as does an entry
whose command is no longer documented.

Commands run through bash, as a user with the activated environment types them: the
interpreter's bin folder first on PATH (`python`, `torchrun`, `mixpipe-*`), in a workspace
folder that links `scripts/` and `.venv` so relative paths behave as in a checkout, with
`MIXPIPE_SHARED` pointing at `../shared` (absent: commands that need it skip).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHARED = Path(os.environ.get("MIXPIPE_SHARED", REPO.parent / "shared"))
HAS_SHARED = (SHARED / "data").is_dir()
BIN = Path(sys.executable).parent

# -- extraction ----------------------------------------------------------------------------

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")


def fenced_blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(first line number, language tag, lines) of every fenced block of a markdown file."""
    blocks, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = _FENCE.match(line)
        if match and current is None:
            current = (number, match.group(2), len(match.group(1)), [])
        elif match and current is not None:
            blocks.append((current[0], current[1], current[3]))
            current = None
        elif current is not None:
            current[3].append(line[current[2]:])
    assert current is None, f"{path.name}: unclosed code block from line {current[0]}"
    return blocks


def _without_comment(line: str) -> str:
    """The line up to a `#` that starts a shell comment (after a blank, outside quotes)."""
    quote = None
    for position, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1].isspace()):
            return line[:position].rstrip()
    return line.rstrip()


def shell_commands(lines: list[str]) -> list[str]:
    """Logical command lines: continuations joined, whole-line and trailing comments dropped."""
    commands, pending = [], ""
    for raw in lines:
        line = _without_comment(raw.strip())
        if not pending and not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    assert not pending, f"dangling continuation: {pending}"
    return commands


def documented_commands() -> dict[str, str]:
    """{command: 'file:line'} for every bash block of README.md and docs/*.md."""
    found = {}
    for path in DOCS:
        for line, language, lines in fenced_blocks(path):
            where = f"{path.relative_to(REPO)}:{line}"
            assert language, f"{where}: untagged code block; tag it bash (commands) or text/python"
            if language in ("bash", "sh", "shell", "console"):
                for command in shell_commands(lines):
                    found.setdefault(command, where)
    return found


# -- how each command is scaled down ----------------------------------------------------------

SMALL_TOKENIZER = ("tokenizer.vocab_size=1000", "tokenizer.sample_sentences=5000")
OWN_DATA_TOKENIZER = ("tokenizer.vocab_size=300",)  # my_corpus/ is 600 made-up lines
TINY_RUN = ("run.total_steps=2", "run.global_batch_size=4", "validation.documents_per_source=1",
            "checkpoint.every_n_steps=2", "evaluation.every_n_steps=null",
            "trainer.enable_progress_bar=false", "progress=false")


@dataclass(frozen=True)
class Scaled:
    """How one documented command runs here.

    append: arguments added at the end; `{ws}`, `{cache}` and `{out}` are the workspace, the
        shared cache folder and this command's own output folder.
    replace: (documented text, text run instead) pairs for what overrides cannot change
        (launcher process counts, ports, absolute paths).
    runner: "bash" (once), "nodes" (twice at once with NODE_RANK=0/1 and a free port: two
        torchrun launchers on loopback), "srun" (through a stand-in srun that starts each task
        with SLURM's environment), "make" (dry run: the recipe must be the documented command).
    check: assertions on the finished command (see `Run`).
    after: documented commands this one reads the outputs of (run first, once).
    """

    append: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    runner: str = "bash"
    check: Callable | None = None
    after: tuple[str, ...] = ()
    needs_shared: bool = False
    slow: bool = False
    timeout: float = 600


def train(*extra: str, **options) -> Scaled:
    """A training command: tiny run, its own output_dir, results.json checked."""
    options.setdefault("check", completed_run)
    return Scaled(append=(*TINY_RUN, *extra, "cache_dir={cache}", "output_dir={out}"), **options)


def multirun(*extra: str, jobs: int, **options) -> Scaled:
    def check(run):
        assert run.output.count("Run completed") == jobs, run.tail()
    return Scaled(append=(*TINY_RUN, *extra, "cache_dir={cache}"), check=check, **options)


# -- checks ------------------------------------------------------------------------------------


@dataclass
class Run:
    command: str
    workspace: Path
    out: Path
    returncode: int
    output: str

    def tail(self, n: int = 4000) -> str:
        return f"$ {self.command}\nexit {self.returncode}\n{self.output[-n:]}"

    def results(self, directory: Path | None = None) -> dict:
        path = (directory or self.out) / "results.json"
        assert path.is_file(), f"no {path}\n{self.tail()}"
        return json.loads(path.read_text())


def completed_run(run: Run, directory: Path | None = None) -> dict:
    """results.json says completed, every source has a finite validation loss, the table printed."""
    record = run.results(directory)
    assert record["status"] == "completed", record["status"]
    bad = {name: s["val_loss"] for name, s in record["sources"].items() if not math.isfinite(s["val_loss"])}
    assert not bad, f"validation loss not finite for {bad}"
    assert "Run completed" in run.output, run.tail()
    assert (directory or run.out).joinpath("checkpoints", "last.json").is_file()
    return record


def translation_run(run: Run) -> None:
    record = completed_run(run)
    parallel = {n: s for n, s in record["sources"].items() if s["kind"] == "parallel"}
    assert parallel, "no parallel source trained"
    bad = {n: s["val_chrf"] for n, s in parallel.items() if not math.isfinite(s["val_chrf"])}
    assert not bad, f"chrF not finite for {bad}"
    assert "chrF" in run.output  # the final table's column


def world_size(size: int) -> Callable:
    def check(run: Run) -> None:
        assert completed_run(run)["world_size"] == size
    return check


def wandb_run(run: Run) -> None:
    completed_run(run)
    assert list(run.out.glob("wandb/offline-run-*")), "no offline wandb run"


def output_contains(*texts: str) -> Callable:
    def check(run: Run) -> None:
        for text in texts:
            assert text in run.output, f"{text!r} not printed\n{run.tail()}"
    return check


def files_exist(*names: str) -> Callable:
    def check(run: Run) -> None:
        for name in names:
            assert (run.workspace / name).exists(), f"{name} not written\n{run.tail()}"
    return check


def sbatch_script(run: Run) -> None:
    script = (run.workspace / "job.sbatch").read_text()
    for directive in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal="):
        assert directive in script, f"{directive} missing from job.sbatch"
    assert "ckpt_path=last" in script and 'RUN_DIR="/shared/runs/lm1"' in script


def resumed_run(run: Run) -> None:
    assert "resuming from" in run.output, run.tail()
    record = completed_run(run)
    assert record["global_steps"] == 4


def own_text_corpus(workspace: Path) -> None:
    """my_corpus/: three languages of made-up text (seeded words from per-language syllables),
    a parallel pair, and a jsonl with a source column, as a user's own data would be laid out."""
    import random

    rng = random.Random(0)
    syllables = {"eng": "th e a st ing er on re an", "deu": "sch ei en ch ung au er ge ie",
                 "swh": "ka ma na wa ji ku mb ngu ya"}

    def sentence(lang: str) -> str:
        parts = syllables[lang].split()
        return " ".join("".join(rng.choices(parts, k=rng.randint(1, 4))) for _ in range(rng.randint(4, 12)))

    lines = {lang: [sentence(lang) for _ in range(200)] for lang in syllables}
    mono, parallel = workspace / "my_corpus" / "mono", workspace / "my_corpus" / "parallel"
    mono.mkdir(parents=True, exist_ok=True)
    parallel.mkdir(parents=True, exist_ok=True)
    for lang, texts in lines.items():
        (mono / f"{lang}.txt").write_text("".join(text + "\n" for text in texts))
    (parallel / "deu-eng.tsv").write_text("".join(f"{d}\t{e}\n" for d, e in zip(lines["deu"], lines["eng"], strict=True)))
    with open(workspace / "my_corpus" / "corpus.jsonl", "w") as stream:
        for lang, texts in lines.items():
            for text in texts:
                stream.write(json.dumps({"lang": lang, "text": text}) + "\n")


def make_recipe(target: str) -> Callable:
    """`make -n <target>` prints exactly the documented `.venv/bin/python ...` command."""
    def check(run: Run) -> None:
        assert target in run.output.splitlines(), run.tail()
    return check


# -- the registry: every documented command -> how it runs here ---------------------------------

DEMO = ".venv/bin/python -m pipeline.train experiment=demo"
GPU_TO_CPU = ("trainer=cpu", "trainer.devices=1", "experiment=demo")  # same command, demo data, CPU
SWEEP_2X2 = (".venv/bin/python -m pipeline.train -m experiment=demo mixture=proportional,cooldown "
             "run.total_steps=8,32 run.global_batch_size=8 logger=none hydra.sweep.dir=multirun/demo_2x2")
TEMPERATURE_SWEEP = (".venv/bin/python -m pipeline.train -m experiment=demo +sweep=temperature "
                     "hydra.sweep.dir=multirun/temperature")
TATOEBA_SWEEP = (
    "OMP_NUM_THREADS=1 .venv/bin/python -m pipeline.train -m experiment=tatoeba_lm model=lm_tiny "
    "+sweep=upsample_or_upweight 'data.languages=[eng,afr,ara,aze,bel,ben,ber,bre,bul,cat,cbk,ces,tzl,swg,"
    "gsw,ast,ang,cha,xho,amh,fry,tuk,jav,awa]' run.total_steps=400 run.global_batch_size=64 logger=csv "
    "trainer.enable_progress_bar=false progress=false evaluation.every_n_steps=100 "
    "checkpoint.every_n_steps=100000 hydra.sweep.dir=sweeps/tatoeba_upweight")
TATOEBA_LANGS = "eng,afr,ara,aze,bel,ben,ber,bre,bul,cat,cbk,ces,tzl,swg,gsw,ast,ang,cha,xho,amh,fry,tuk,jav,awa"
TATOEBA_GROUPS = ("--group high=eng,afr,ara,aze,bel,ben,ber,bre,bul,cat,cbk,ces "
                  "--group low=tzl,swg,gsw,ast,ang,cha,xho,amh,fry,tuk,jav,awa")
TATOEBA_SEARCH = (
    "OMP_NUM_THREADS=1 .venv/bin/python scripts/search_mixture.py --out sweeps/compare/search --num-mixtures 10 "
    f"--seed 0 {TATOEBA_GROUPS} --tau 5 --max-epochs 8 --budget 6400 experiment=tatoeba_lm model=lm_tiny "
    f"'data.languages=[{TATOEBA_LANGS}]' run.total_steps=50 run.global_batch_size=64 logger=none "
    "trainer.enable_progress_bar=false progress=false evaluation.every_n_steps=100 "
    "checkpoint.every_n_steps=100000 seed=1234")
TATOEBA_ARMS = (
    "OMP_NUM_THREADS=1 .venv/bin/python -m pipeline.train -m experiment=tatoeba_lm model=lm_tiny "
    "mixture=proportional,temperature_tau5,cooldown,unimax,searched,online_bandit seed=1234,1235 "
    f"'hydra.searchpath=[file://sweeps/compare/search/conf]' 'data.languages=[{TATOEBA_LANGS}]' "
    "run.total_steps=100 run.global_batch_size=64 logger=csv trainer.enable_progress_bar=false progress=false "
    "evaluation.every_n_steps=100 checkpoint.every_n_steps=100000 hydra.sweep.dir=sweeps/compare/arms")
TATOEBA_COMPARE_COLLECT = (".venv/bin/python scripts/collect_sweep.py sweeps/compare/arms "
                           f"--out sweeps/compare/arms.csv {TATOEBA_GROUPS} --group eng=eng")
CCE_VENV = ".venv/bin/python -m venv /tmp/venv-cce"
CCE_PTH = 'echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/venv-cce/lib/python3.11/site-packages/zz_project_venv.pth'
CCE_INSTALL = "/tmp/venv-cce/bin/pip install --no-deps cut-cross-entropy"
CCE_BENCHES = ("/tmp/venv-cce/bin/python scripts/bench_kernels.py --threads 1 --json .cache/bench_kernels_t1.json",
               "/tmp/venv-cce/bin/python scripts/bench_kernels.py --json .cache/bench_kernels_t2.json",
               "/tmp/venv-cce/bin/python scripts/bench_kernels.py --cases V=65536 --repeats 5",
               "/tmp/venv-cce/bin/python scripts/bench_kernels.py --cases softmax",
               "/tmp/venv-cce/bin/python scripts/bench_kernels.py --cases flce --repeats 3",
               "/tmp/venv-cce/bin/python scripts/bench_kernels.py --cases flce --repeats 3 --threads 1",
               "/tmp/venv-cce/bin/python scripts/bench_kernels.py --interleaved --cases flce --repeats 5 "
               "--chunk-sizes 262,512 --threads 1",
               "/tmp/venv-cce/bin/python scripts/bench_kernels.py --interleaved --cases flce --repeats 5 "
               "--chunk-sizes 262,512")
SEARCH_MIXTURE = (".venv/bin/python scripts/search_mixture.py --out search/demo --num-mixtures 16 "
                  "--group high=eng,rus,deu --group low=san,haw,cor --objective low=2 --max-epochs 4 "
                  "experiment=demo run.total_steps=200 run.global_batch_size=16 logger=none")
BENCH_LONG_DOCS = ("mkdir -p .cache/long_docs && for f in ../shared/data/tatoeba/mono/*.txt; do for i in $(seq 32); "
                   "do paste -d' ' - - - - - - - - - - - - - - - - < $f; done > .cache/long_docs/$(basename $f); done")
BENCH_PREPARE = (".venv/bin/python -m pipeline.prepare data=tatoeba_mono data.path=.cache/long_docs "
                 "cache_dir=.cache/bench_prepare progress=false")
BENCH_SMALL = ("data.languages=[eng,afr]", *SMALL_TOKENIZER)
ARRAY_SMALL = ("progress=false", "data.locales=[de,sw,gv]", *SMALL_TOKENIZER)  # the same for every step
MIXTURES = ",".join(sorted(p.stem for p in (REPO / "conf" / "mixture").glob("*.yaml")))

COVERAGE: dict[str, Scaled] = {
    # README: the two commands
    "make demo": Scaled(runner="make", check=make_recipe(DEMO)),
    "make test": Scaled(runner="make", check=make_recipe(".venv/bin/python -m pytest -q --durations=25")),
    # README: training
    DEMO: train("logger=wandb", check=wandb_run),
    ".venv/bin/python -m pipeline.train experiment=tatoeba_lm model=lm_tiny run.total_steps=500":
        train("data.languages=[eng,afr,tzl]", *SMALL_TOKENIZER, needs_shared=True),
    ".venv/bin/python -m pipeline.train experiment=tatoeba_translation":
        train("data.languages=[deu,swh]", *SMALL_TOKENIZER, check=translation_run, needs_shared=True),
    ".venv/bin/python -m pipeline.train experiment=demo mixture=unimax":
        # every preset of conf/mixture, as one multirun, in place of the documented one
        multirun("logger=none", jobs=MIXTURES.count(",") + 1,
                 replace=(("-m pipeline.train experiment=demo mixture=unimax",
                           f"-m pipeline.train -m experiment=demo mixture={MIXTURES} "
                           "hydra.sweep.dir={ws}/multirun/mixtures"),)),
    ".venv/bin/python -m pipeline.train experiment=demo output_dir=runs/demo ckpt_path=last":
        # first: stopped after 2 of 4 steps; then the documented command continues it
        Scaled(append=("run.total_steps=4", "run.global_batch_size=4", "validation.documents_per_source=1",
                       "checkpoint.every_n_steps=2", "evaluation.every_n_steps=null", "logger=none",
                       "trainer.enable_progress_bar=false", "progress=false", "cache_dir={cache}"),
               runner="resume", check=resumed_run),
    # README: GPUs, DeepSpeed, nodes (on CPU over gloo: same command, the demo data)
    "python -m pipeline.train experiment=tatoeba_lm trainer=gpu strategy=deepspeed_zero2":
        train(*GPU_TO_CPU, "trainer.devices=2", "logger=none", check=world_size(2)),
    "python -m pipeline.train experiment=demo trainer.devices=2 strategy=ddp":
        train("logger=none", check=world_size(2)),
    "torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 "
    "-m pipeline.train experiment=tatoeba_lm trainer=gpu trainer.num_nodes=2 trainer.devices=8 "
    "strategy=deepspeed_zero3 output_dir=/shared/runs/lm1":
        train(*GPU_TO_CPU, "logger=none", runner="nodes", check=world_size(2),
              replace=(("--nproc_per_node 8", "--nproc_per_node 1"), ("--master_port 29500", "--master_port $PORT"),
                       ("output_dir=/shared/runs/lm1", ""))),
    "srun --nodes 2 --ntasks-per-node 8 --gpus-per-node 8 python -m pipeline.train experiment=tatoeba_lm "
    "trainer=gpu trainer.num_nodes=2 trainer.devices=8 strategy=deepspeed_zero3 output_dir=/shared/runs/lm1":
        train(*GPU_TO_CPU, "logger=none", runner="srun", check=world_size(2), slow=True,
              replace=(("--ntasks-per-node 8 --gpus-per-node 8", "--ntasks-per-node 1"),
                       ("output_dir=/shared/runs/lm1", ""))),
    "python scripts/make_sbatch.py experiment=tatoeba_lm trainer=gpu strategy=deepspeed_zero3 "
    "trainer.num_nodes=2 trainer.devices=8 launch.partition=gpu launch.time=12:00:00 "
    "'launch.setup=[source .venv/bin/activate]' output_dir=/shared/runs/lm1 ckpt_path=last --output job.sbatch":
        Scaled(check=sbatch_script),
    # README: data and the pre-flight report
    ".venv/bin/python -m pipeline.prepare":
        Scaled(append=("cache_dir={cache}", "progress=false"), check=output_contains("prepared sources")),
    ".venv/bin/python -m pipeline.prepare data=tatoeba_mono":
        Scaled(append=("cache_dir={cache}", "progress=false", "data.languages=[eng,afr,tzl]", *SMALL_TOKENIZER),
               check=output_contains("prepared sources"), needs_shared=True),
    # README: token stores, inputs by URL, a job array of shards (local_submitit: local processes)
    ".venv/bin/python -m pipeline.prepare prepare.pretokenize=true prepare.workers=2":
        Scaled(append=("cache_dir={cache}", "progress=false"),
               check=output_contains("pre-tokenized", "in 2 process(es)", "prepared sources")),
    ".venv/bin/python -m pipeline.prepare data=tatoeba_mono data.path=s3://my-bucket/corpus/mono":
        Scaled(replace=(("s3://my-bucket/corpus/mono", "file://{ws}/my_corpus/mono"),),
               append=("cache_dir={cache}", "progress=false", *OWN_DATA_TOKENIZER),
               check=output_contains("prepared sources", "swh")),
    ".venv/bin/python -m pipeline.prepare cache_dir=/shared/mixpipe":
        Scaled(replace=(("cache_dir=/shared/mixpipe", "cache_dir={ws}/array_cache"),),
               append=ARRAY_SMALL, check=output_contains("prepared sources")),
    ".venv/bin/python -m pipeline.prepare -m hydra/launcher=slurm prepare.pretokenize=true prepare.num_shards=64 "
    "'prepare.shard=range(0,64)' cache_dir=/shared/mixpipe":
        Scaled(replace=(("hydra/launcher=slurm", "hydra/launcher=local_submitit"),
                        ("prepare.num_shards=64 'prepare.shard=range(0,64)'",
                         "prepare.num_shards=2 'prepare.shard=range(0,2)'"),
                        ("cache_dir=/shared/mixpipe", "cache_dir={ws}/array_cache")),
               append=(*ARRAY_SMALL, "hydra.sweep.dir={ws}/multirun/prepare_array"),
               after=(".venv/bin/python -m pipeline.prepare cache_dir=/shared/mixpipe",),
               check=output_contains("prepare.shard=0", "prepare.shard=1")),
    ".venv/bin/python -m pipeline.prepare prepare.pretokenize=true cache_dir=/shared/mixpipe":
        Scaled(replace=(("cache_dir=/shared/mixpipe", "cache_dir={ws}/array_cache"),),
               append=ARRAY_SMALL,
               after=(".venv/bin/python -m pipeline.prepare -m hydra/launcher=slurm prepare.pretokenize=true "
                      "prepare.num_shards=64 'prepare.shard=range(0,64)' cache_dir=/shared/mixpipe",),
               check=output_contains("encoded earlier", "prepared sources")),
    # README: window mode (the demo's documents in windows; training and the report)
    ".venv/bin/python -m pipeline.train experiment=demo loader.unit=window loader.max_length=128":
        train("loader.max_length=16"),
    ".venv/bin/python -m pipeline.report experiment=demo loader.unit=window mixture=unimax":
        Scaled(append=("cache_dir={cache}", "progress=false", "loader.max_length=16"),
               check=output_contains("epochs count windows", "UniMax")),
    # docs/BENCHMARKS.md: the sampler's peer baselines (make -n: the target runs the benchmark with them)
    'make bench-baselines BENCH_ARGS="--json .cache/bench_sampler_baselines.json"':
        Scaled(runner="make", check=output_contains("scripts/bench_sampler.py --baselines all")),
    # docs/BENCHMARKS.md: the sampler at 10..10,000 sources (its smoke size; slow: the same --quick
    # run is tests/scripts/test_bench_sampler_scale.py's, with its JSON checked)
    ".venv/bin/python scripts/bench_sampler_scale.py --json .cache/bench_sampler_scale.json":
        Scaled(append=("--quick",), check=output_contains("restart in a fresh process", "goals"), slow=True),
    # docs/BENCHMARKS.md: window vs document mode (its smoke size; slow: the same --quick run is
    # tests/scripts/test_bench_windows.py's, which also checks the trained share)
    ".venv/bin/python scripts/bench_windows.py --read-baseline 208fbc3 --json .cache/bench_windows.json":
        Scaled(append=("--quick",), check=output_contains("window mode"), slow=True),
    # docs/BENCHMARKS.md: preparation with token stores (two languages, a few repetitions)
    BENCH_LONG_DOCS: Scaled(replace=(("../shared/data/tatoeba/mono/*.txt", "$MIXPIPE_SHARED/data/tatoeba/mono/[ae]*.txt"),
                                     ("$(seq 32)", "$(seq 2)")),
                            needs_shared=True, check=files_exist(".cache/long_docs/eng.txt", ".cache/long_docs/afr.txt")),
    BENCH_PREPARE: Scaled(append=BENCH_SMALL, after=(BENCH_LONG_DOCS,), needs_shared=True,
                          check=output_contains("prepared sources")),
    f"{BENCH_PREPARE} prepare.pretokenize=true prepare.workers=1":
        Scaled(append=BENCH_SMALL, after=(BENCH_PREPARE,), needs_shared=True,
               check=output_contains("in 1 process(es)")),
    "rm -rf .cache/bench_prepare/prepared/*/token_stores-*":
        Scaled(after=(f"{BENCH_PREPARE} prepare.pretokenize=true prepare.workers=1",), needs_shared=True),
    f"{BENCH_PREPARE} prepare.pretokenize=true prepare.workers=2":
        Scaled(append=BENCH_SMALL, after=("rm -rf .cache/bench_prepare/prepared/*/token_stores-*",),
               needs_shared=True, check=output_contains("in 2 process(es)")),
    ".venv/bin/python -m pipeline.report experiment=demo mixture=unimax run.total_steps=5000":
        Scaled(append=("cache_dir={cache}", "progress=false"), check=output_contains("UniMax")),
    ".venv/bin/python -m pipeline.train experiment=demo data=tatoeba_mono data.path=my_corpus/mono":
        train("logger=none", *OWN_DATA_TOKENIZER),
    ".venv/bin/python -m pipeline.prepare data=tatoeba_parallel data.path=my_corpus/parallel":
        Scaled(append=("cache_dir={cache}", "progress=false", *OWN_DATA_TOKENIZER),
               check=output_contains("deu-eng")),
    ".venv/bin/python -m pipeline.train experiment=demo data=hf_generic data.path=my_corpus/corpus.jsonl "
    "data.source_column=lang data.text_column=text": train("logger=none", *OWN_DATA_TOKENIZER),
    # README: multimodal
    # README, Mixtures: online mixing; 4 steps with a window of 1 so a decision is applied
    "python -m pipeline.train experiment=demo mixture=online_bandit mixture.stages.0.update_every=10":
        train("logger=none", "run.total_steps=4", "mixture.stages.0.update_every=1",
              check=lambda run: (completed_run(run), output_contains("ADAPTIVE")(run))),
    "python -m pipeline.train experiment=demo_multimodal": train("logger=none"),
    "python -m pipeline.train experiment=demo_multimodal balance=m4 balance.eta=0.6": train("logger=none"),
    "python -m pipeline.train experiment=demo_multimodal model.objective=sigmoid": train("logger=none", slow=True),
    "python -m pipeline.train experiment=demo_multimodal data=coco_mini sources.exclude=[]":
        train("logger=none", needs_shared=True, slow=True),
    "torchrun --nproc_per_node 2 -m pipeline.train experiment=demo_multimodal strategy=deepspeed_zero2 "
    "trainer.devices=2": train("logger=none", check=world_size(2), slow=True,
                               replace=(("torchrun", "torchrun --master_port $PORT"),)),
    # docs/SWEEPS.md
    # 4 steps of 32: every source, English included, is drawn at every tau (the fit below needs x > 0)
    TEMPERATURE_SWEEP: multirun("logger=none", "run.total_steps=4", "run.global_batch_size=32", jobs=5,
                                replace=(("hydra.sweep.dir=multirun/temperature", "hydra.sweep.dir={ws}/multirun/temperature"),)),
    ".venv/bin/python scripts/collect_sweep.py multirun/temperature --out sweep.csv "
    "--group high=eng,rus,deu --group low=san,haw,cor":
        Scaled(after=(TEMPERATURE_SWEEP,), check=files_exist("sweep.csv", "sweep_groups.csv")),
    ".venv/bin/python scripts/fit_scaling_law.py --csv sweep.csv --law power --x-col tokens_seen "
    "--loss-col source_val_loss --where source=eng --where status=completed --out fit/":
        Scaled(after=(".venv/bin/python scripts/collect_sweep.py multirun/temperature --out sweep.csv "
                      "--group high=eng,rus,deu --group low=san,haw,cor",),
               check=files_exist("fit/fit.json")),
    SWEEP_2X2: Scaled(append=("validation.documents_per_source=1", "checkpoint.every_n_steps=100",
                              "trainer.enable_progress_bar=false", "progress=false", "cache_dir={cache}"),
                      check=output_contains("Run completed")),
    ".venv/bin/python scripts/collect_sweep.py multirun/demo_2x2 --out demo_2x2.csv":
        Scaled(after=(SWEEP_2X2,), check=files_exist("demo_2x2.csv")),
    ".venv/bin/python scripts/fit_scaling_law.py --csv demo_2x2.csv --where source=eng --where status=completed "
    "--law power --x-col tokens_seen --loss-col source_val_loss --bootstrap 20 --out fit/":
        Scaled(after=(".venv/bin/python scripts/collect_sweep.py multirun/demo_2x2 --out demo_2x2.csv",),
               check=output_contains("power law, 4 points")),
    # docs/SWEEPS.md: the mixture search (8 proxies of 4 steps; later flags and overrides win), then its mixture trains
    SEARCH_MIXTURE: Scaled(append=("--num-mixtures", "8", "run.total_steps=4", "run.global_batch_size=8",
                                   "validation.documents_per_source=1", "checkpoint.every_n_steps=100",
                                   "trainer.enable_progress_bar=false", "progress=false", "cache_dir={cache}"),
                           check=files_exist("search/demo/conf/mixture/searched.yaml", "search/demo/report.json",
                                             "search/demo/report.md", "search/demo/proxies/search_007/results.json")),
    ".venv/bin/python -m pipeline.train experiment=demo 'hydra.searchpath=[file://search/demo/conf]' mixture=searched":
        train("logger=none", after=(SEARCH_MIXTURE,)),
    TATOEBA_SWEEP: Scaled(append=("run.total_steps=2", "run.global_batch_size=8", "evaluation.every_n_steps=null",
                                  "validation.documents_per_source=2", "cache_dir={cache}"),
                          needs_shared=True, slow=True, check=output_contains("Run completed")),
    ".venv/bin/python scripts/collect_sweep.py sweeps/tatoeba_upweight --group high=eng,afr,ara,aze,bel,ben,ber,"
    "bre,bul,cat,cbk,ces --group low=tzl,swg,gsw,ast,ang,cha,xho,amh,fry,tuk,jav,awa --group eng=eng":
        Scaled(after=(TATOEBA_SWEEP,), needs_shared=True, slow=True, check=output_contains("per group")),
    # docs/SWEEPS.md section 6: the search on Tatoeba (8 proxies of 2 steps), the 12 arms (2 steps each), collected
    TATOEBA_SEARCH: Scaled(append=("--num-mixtures", "8", "run.total_steps=2", "run.global_batch_size=8",
                                   "validation.documents_per_source=2", "evaluation.every_n_steps=null",
                                   "cache_dir={cache}"),
                           needs_shared=True, slow=True, timeout=1800,  # prepares Tatoeba in a fresh cache
                           check=files_exist("sweeps/compare/search/conf/mixture/searched.yaml",
                                             "sweeps/compare/search/report.json")),
    TATOEBA_ARMS: multirun("logger=none", "run.total_steps=2", "run.global_batch_size=8",
                           "validation.documents_per_source=2", jobs=12, after=(TATOEBA_SEARCH,),
                           needs_shared=True, slow=True, timeout=1800),
    TATOEBA_COMPARE_COLLECT: Scaled(after=(TATOEBA_ARMS,), needs_shared=True, slow=True,
                                    check=output_contains("per group")),
    # docs/BENCHMARKS.md: the CCE baseline's throwaway venv, then the kernels benchmark with it
    CCE_VENV: Scaled(replace=(("/tmp/venv-cce", "{ws}/venv-cce"),), slow=True),
    CCE_PTH: Scaled(replace=(("/tmp/venv-cce", "{ws}/venv-cce"),), after=(CCE_VENV,), slow=True),
    CCE_INSTALL: Scaled(replace=(("/tmp/venv-cce", "{ws}/venv-cce"),), after=(CCE_PTH,), slow=True,
                        check=output_contains("Successfully installed cut-cross-entropy")),
    **{command: Scaled(replace=(("/tmp/venv-cce", "{ws}/venv-cce"),),
                       # the V=65536 case has no --quick twin: it runs at full size, once
                       append=("--repeats", "1") if "V=65536" in command else ("--quick", "--repeats", "1"),
                       after=(CCE_INSTALL,), slow=True, check=output_contains("CCE"))
       for command in CCE_BENCHES},
    # docs/BENCHMARKS.md: benchmarks, at their smallest
    ".venv/bin/python scripts/bench_install.py --repeats 1": Scaled(append=("--skip-pip",), slow=True),
    ".venv/bin/python scripts/bench_sampler.py --profile --json .cache/bench_sampler.json":
        Scaled(append=("--quick",), slow=True, check=files_exist(".cache/bench_sampler.json")),
    ".venv/bin/python scripts/bench_sampler.py --num-sources 50": Scaled(append=("--quick",), slow=True),
    ".venv/bin/python scripts/bench_sampler.py --global-batch 64 --micro-batch 32 --modes exact --repeats 3":
        Scaled(append=("--quick",), slow=True),
    ".venv/bin/python scripts/bench_m4.py --json .cache/bench_m4.json":
        Scaled(append=("--sizes", "20000", "--exact-sizes", "2000"), slow=True),
    ".venv/bin/python scripts/bench_m4.py --sizes 1000000 --passes 4 --exact-sizes":
        Scaled(replace=(("--sizes 1000000", "--sizes 20000"),), slow=True),
    ".venv/bin/python scripts/bench_checkpoint.py --models lm_tiny,lm_small --repeats 5":
        Scaled(replace=(("lm_tiny,lm_small --repeats 5", "lm_tiny --repeats 1"),), slow=True),
    ".venv/bin/python scripts/bench_checkpoint.py --models lm_base --repeats 3":
        Scaled(replace=(("lm_base --repeats 3", "lm_tiny --repeats 1"),), slow=True),
    ".venv/bin/python scripts/bench_kernels.py --threads 1 --json .cache/bench_kernels_t1.json":
        Scaled(append=("--quick", "--repeats", "1"), slow=True),
    ".venv/bin/python scripts/bench_kernels.py --json .cache/bench_kernels_t2.json":
        Scaled(append=("--quick", "--repeats", "1"), slow=True),
    ".venv/bin/python scripts/bench_kernels.py --cases flce --repeats 1 --threads 1":
        Scaled(append=("--quick",), slow=True),
    ".venv/bin/python scripts/bench_train.py --demo --json .cache/bench_train.json":
        Scaled(append=("--repeats", "1", "--steps", "3", "--warmup", "1"), slow=True),
    ".venv/bin/python scripts/bench_train.py --repeats 3 --steps 40 --warmup 5 --logger none":
        Scaled(append=("--repeats", "1", "--steps", "3", "--warmup", "1"), slow=True),
    ".venv/bin/python scripts/bench_train.py --repeats 3 --steps 15 --warmup 3 --set model=lm_small":
        Scaled(append=("--repeats", "1", "--steps", "2", "--warmup", "1"), slow=True),
    ".venv/bin/python scripts/bench_scaling.py --json /tmp/bench_scaling.json":
        Scaled(replace=(("/tmp/bench_scaling.json", "{ws}/bench_scaling.json"),), append=("--quick",), slow=True),
    "python scripts/m4_end_to_end.py --steps 150 --seeds 0 1 2 3 4 --eta 0.6 --solver exact "
    "--output outputs/m4_e2e_5seeds":
        Scaled(replace=(("--steps 150 --seeds 0 1 2 3 4", "--steps 2 --seeds 0"),), slow=True),
}


# -- running ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FAKE_SRUN = r'''
import os, subprocess, sys
args, options = sys.argv[1:], {}
while args and args[0].startswith("--"):
    key = args.pop(0)
    options[key] = args.pop(0)
nodes, per_node = int(options.get("--nodes", 1)), int(options.get("--ntasks-per-node", 1))
base = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NAME="mixpipe", SLURM_NNODES=str(nodes),
            SLURM_NTASKS=str(nodes * per_node), SLURM_NTASKS_PER_NODE=str(per_node),
            SLURM_NODELIST="127.0.0.1")
tasks = [subprocess.Popen(args, env=dict(base, SLURM_NODEID=str(n), SLURM_LOCALID=str(l),
                                          SLURM_PROCID=str(n * per_node + l)))
         for n in range(nodes) for l in range(per_node)]
sys.exit(max(task.wait() for task in tasks))
'''


class Workspace:
    """One folder for every documented command of the session, like a user's checkout."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache, self.done = root, cache, {}
        (root / "scripts").symlink_to(REPO / "scripts")
        (root / ".venv").symlink_to(BIN.parent)
        tools = root / ".tools"
        tools.mkdir()
        (tools / "srun").write_text(f"#!{sys.executable}\n{FAKE_SRUN}")
        (tools / "srun").chmod(0o755)
        own_text_corpus(root)

    def environment(self, port: int) -> dict[str, str]:
        return {**os.environ, "PATH": f"{BIN}:{self.root / '.tools'}:{os.environ['PATH']}",
                "MIXPIPE_SHARED": str(SHARED), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
                "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PORT": str(port),
                "MASTER": "127.0.0.1"}

    def command_line(self, command: str, scaled: Scaled, out: Path) -> str:
        text = command
        for old, new in scaled.replace:
            assert old in text, f"replacement {old!r} does not match the documented command"
            text = text.replace(old, new)
        return " ".join([self._fill(text, out), *(shlex.quote(self._fill(a, out)) for a in scaled.append)])

    def _fill(self, text: str, out: Path) -> str:
        return text.replace("{ws}", str(self.root)).replace("{cache}", str(self.cache)).replace("{out}", str(out))

    def run(self, command: str) -> Run:
        if command in self.done:
            return self.done[command]
        scaled = COVERAGE[command]
        for earlier in scaled.after:
            previous = self.run(earlier)
            assert previous.returncode == 0, f"prerequisite failed:\n{previous.tail()}"
        out = self.root / "out" / f"{len(self.done):02d}"
        line = self.command_line(command, scaled, out)
        if scaled.runner == "make":
            result = self._shell(f"make -n {command.split()[1]}", REPO, _free_port(), scaled.timeout)
        elif scaled.runner == "nodes":
            port = _free_port()
            nodes = [self._start(line, port, NODE_RANK=str(rank)) for rank in (0, 1)]
            outputs = [node.communicate(timeout=scaled.timeout)[0] for node in nodes]
            result = (max(node.returncode for node in nodes), "\n".join(outputs))
        elif scaled.runner == "resume":
            first = self._shell(f"{line} +trainer.max_steps=2", self.root, _free_port(), scaled.timeout)
            assert first[0] == 0, first[1][-4000:]
            result = self._shell(line, self.root, _free_port(), scaled.timeout)
            out = self.root / "runs" / "demo"
        else:
            result = self._shell(line, self.root, _free_port(), scaled.timeout)
        run = Run(line, self.root, out, *result)
        self.done[command] = run
        return run

    def _start(self, line: str, port: int, **env: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", line], cwd=self.root, env={**self.environment(port), **env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def _shell(self, line: str, cwd: Path, port: int, timeout: float) -> tuple[int, str]:
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=self.environment(port), timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return done.returncode, done.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_data) -> Workspace:
    """The session's prepared demo corpus and tokenizer are reused through its cache folder."""
    return Workspace(tmp_path_factory.mktemp("user"), Path(demo_data[0].cache_dir))


# -- tests ------------------------------------------------------------------------------------


def test_every_documented_command_is_covered():
    documented = documented_commands()
    missing = [f"{where}: {command}" for command, where in documented.items() if command not in COVERAGE]
    stale = [command for command in COVERAGE if command not in documented]
    assert not missing, "documented commands with no scaled-down run in COVERAGE:\n" + "\n".join(missing)
    assert not stale, "COVERAGE entries no longer in the docs:\n" + "\n".join(stale)


def _cases():
    for command, scaled in COVERAGE.items():
        marks = [pytest.mark.slow] if scaled.slow else []
        if scaled.needs_shared:
            marks.append(pytest.mark.skipif(not HAS_SHARED, reason=f"needs {SHARED}/data (absent)"))
        if scaled.runner in ("nodes", "srun") or "trainer.devices=2" in command + " ".join(scaled.append):
            marks.append(pytest.mark.distributed)
        yield pytest.param(command, marks=marks, id=command[:90])


@pytest.mark.parametrize("command", list(_cases()))
def test_documented_command_runs(command, workspace):
    run = workspace.run(command)
    assert run.returncode == 0, run.tail()
    if COVERAGE[command].check:
        COVERAGE[command].check(run)


def _first_job(preset: str) -> list[str]:
    """The overrides of a sweep preset's first job (Hydra's basic sweeper: first value of each axis)."""
    import yaml

    params = yaml.safe_load((REPO / "conf" / "sweep" / f"{preset}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return [f"{key}={str(values).split(',')[0]}" for key, values in params.items()]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml")
                                          if p.stem != "temperature"))  # temperature: documented, run whole
def test_first_job_of_every_sweep_preset_trains(preset, workspace):
    """`python -m pipeline.train -m experiment=demo +sweep=NAME` (docs/SWEEPS.md), first job of each preset."""
    out = workspace.root / "sweep_first" / preset
    line = " ".join([".venv/bin/python -m pipeline.train experiment=demo", *_first_job(preset), *TINY_RUN,
                     "logger=none", f"cache_dir={workspace.cache}", f"output_dir={out}"])
    run = Run(line, workspace.root, out, *workspace._shell(line, workspace.root, _free_port(), 600))
    assert run.returncode == 0, run.tail()
    completed_run(run)


def test_a_broken_documented_command_fails(workspace):
    """The harness is not blind: a misspelt override in a documented command fails its run."""
    command = DEMO
    broken = Scaled(append=(*COVERAGE[command].append, "run.total_step=2"))
    run = Run(command, workspace.root, workspace.root, *workspace._shell(
        workspace.command_line(command, broken, workspace.root / "out" / "broken"), workspace.root,
        _free_port(), 300))
    assert run.returncode != 0 and "total_step" in run.output, run.tail()


def test_extraction_joins_continuations_and_drops_comments(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```bash\n# a comment\npython -m x a=1 \\\n    b=2   # trailing\n\nmake demo\n```\n"
                   "```text\nnot a command\n```\n")
    blocks = fenced_blocks(doc)
    assert [b[1] for b in blocks] == ["bash", "text"]
    assert shell_commands(blocks[0][2]) == ["python -m x a=1 b=2", "make demo"]
