"""Scale-out on one machine: a two-"node" torchrun run with DeepSpeed ZeRO-2 over loopback,
consolidation of its sharded checkpoint, and resuming it at another world size.

Every run here is a real `python -m pipeline.train` process (or two torchrun launchers,
node ranks 0 and 1, one process each) over the demo corpus, prepared once per session.
Per-step losses come from the CSV logger; the stream each rank trained on comes from
``record_consumed=true`` (`pipeline.training.callbacks.ConsumedExamplesLog`).

Tolerances: every run sees the same global batches; only float32 summation order differs
(gradients all-reduced over 2 ranks vs accumulated in one process; DeepSpeed's flat
partitions vs per-parameter AdamW). Measured: losses equal to the last printed digit or one
float32 ulp (8.3328390 vs 8.3328381), parameters within 1.2e-7 after 4 steps. So losses
must agree to rtol 1e-6 (about 8 ulp at 8.3) and parameters to atol 1e-6, under 0.2% of
one step's largest Adam update (lr <= 6e-4 in these steps).
"""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.training.callbacks import read_consumed
from pipeline.training.zero_checkpoint import consolidate_zero_checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 4, 2
RUN = ["experiment=demo", f"run.total_steps={STEPS}", "run.global_batch_size=8", "loader.micro_batch_size=2",
       "logger=csv", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "progress=false",
       "validation.documents_per_source=2", f"checkpoint.every_n_steps={EVERY}", "record_consumed=true"]
LOSS_RTOL = 1e-6
PARAM_ATOL = 1e-6


def _env() -> dict[str, str]:
    # One thread per process: 2 processes on 2 cores, and the same kernels in every run.
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check(processes: list[subprocess.Popen], logs: list[Path], timeout: float = 240) -> None:
    for process in processes:
        process.wait(timeout=timeout)
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, f"exit {process.returncode}:\n{log.read_text()[-4000:]}"


def train_single(out: Path, cache: str, *overrides: str) -> Path:
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as stream:
        process = subprocess.Popen([sys.executable, "-m", "pipeline.train", *RUN, f"cache_dir={cache}",
                                    f"output_dir={out}", *overrides], cwd=REPO, env=_env(),
                                   stdout=stream, stderr=subprocess.STDOUT)
        _check([process], [log])
    return out


def train_torchrun(out: Path, cache: str, nodes: int, per_node: int, *overrides: str) -> Path:
    """`nodes` torchrun launchers on this machine (node ranks 0..nodes-1) over loopback."""
    port = _free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                "--nproc-per-node", str(per_node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
    args = ["-m", "pipeline.train", *RUN, f"cache_dir={cache}", f"output_dir={out}",
            f"trainer.num_nodes={nodes}", f"trainer.devices={per_node}", *overrides]
    processes, logs, streams = [], [], []
    try:
        for node in range(nodes):
            logs.append(out.parent / f"{out.name}.node{node}.log")
            streams.append(open(logs[-1], "w"))  # noqa: SIM115  (closed below)
            processes.append(subprocess.Popen([*torchrun, "--node-rank", str(node), *args], cwd=REPO,
                                              env=_env(), stdout=streams[-1], stderr=subprocess.STDOUT))
        _check(processes, logs)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        for stream in streams:
            stream.close()
    return out


def step_losses(run: Path) -> dict[int, float]:
    rows = list(csv.DictReader(next((run / "csv").glob("version_*/metrics.csv")).read_text().splitlines()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def assert_same_state(expected: dict, actual: dict) -> None:
    assert expected["global_step"] == actual["global_step"]
    assert set(expected["state_dict"]) == set(actual["state_dict"])
    for name, value in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][name], value, rtol=0, atol=PARAM_ATOL, msg=name)


@pytest.fixture(scope="module")
def two_node_zero2(demo_data, tmp_path_factory):
    """Two torchrun "nodes" x 1 process, ZeRO-2, 4 steps, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("two_node")
    cache = demo_data[0].cache_dir
    return cache, tmp, train_torchrun(tmp / "zero2_w2", cache, 2, 1, "strategy=deepspeed_zero2")


@pytest.mark.distributed
def test_two_node_zero2_losses_equal_a_single_process_run(two_node_zero2):
    cache, tmp, run = two_node_zero2
    single = train_single(tmp / "single", cache, "strategy=single")
    distributed, reference = step_losses(run), step_losses(single)
    assert sorted(distributed) == list(range(STEPS)) == sorted(reference)
    for step in range(STEPS):
        assert distributed[step] == pytest.approx(reference[step], rel=LOSS_RTOL), step
    assert len(set(reference.values())) == STEPS  # it trained: every step's loss differs
    # Both "nodes" trained: each rank logged its half of every global batch.
    assert sorted(p.name for p in (run / "consumed").iterdir()) == ["rank0-from00000000.jsonl", "rank1-from00000000.jsonl"]
    assert read_consumed(run / "consumed") == read_consumed(single / "consumed")
    # The sharded checkpoint holds one optimizer shard per rank.
    shards = sorted(p.name for p in (run / "checkpoints" / "step000004.ckpt" / "checkpoint").glob("*optim*"))
    assert len(shards) == 2


@pytest.mark.distributed
def test_zero2_world2_resumes_at_world1_from_the_consolidated_checkpoint(two_node_zero2):
    """W=2 ZeRO-2 -> consolidate step 2 -> W=1 (no DeepSpeed) to step 4 == uninterrupted W=2."""
    cache, tmp, run = two_node_zero2
    consolidated = tmp / "step2.ckpt"
    out = subprocess.run([sys.executable, "scripts/consolidate_checkpoint.py",
                          str(run / "checkpoints" / "step000002.ckpt"), "-o", str(consolidated)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ZeRO-2, world size 2, step 2" in out.stdout
    resumed = train_single(tmp / "resumed_w1", cache, "strategy=single", f"ckpt_path={consolidated}")

    uninterrupted = consolidate_zero_checkpoint(run / "checkpoints" / "step000004.ckpt")
    final = torch.load(resumed / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)
    assert_same_state(uninterrupted, final)
    for before, after in zip(uninterrupted["optimizer_states"][0]["state"].values(),
                             final["optimizer_states"][0]["state"].values(), strict=True):
        assert float(before["step"]) == float(after["step"]) == STEPS
        torch.testing.assert_close(after["exp_avg"], before["exp_avg"], rtol=0, atol=PARAM_ATOL)
    losses, reference = step_losses(resumed), step_losses(run)
    assert sorted(losses) == [2, 3]
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=LOSS_RTOL)
    # The data stream: the first run's steps 0-1, then the resumed run's 2-3, is exactly the
    # uninterrupted stream.
    first = [c for c in read_consumed(run / "consumed") if c[0] < 2]
    assert first + read_consumed(resumed / "consumed") == read_consumed(run / "consumed")


@pytest.mark.distributed
def test_zero2_world2_resumes_with_zero2_at_world1_from_resharded_shards(two_node_zero2):
    """W=2 ZeRO-2 -> shards re-written for 1 rank -> ZeRO-2 at W=1 to step 4 == uninterrupted."""
    cache, tmp, run = two_node_zero2
    resharded = tmp / "step2.w1.ckpt"
    out = subprocess.run([sys.executable, "scripts/consolidate_checkpoint.py", str(run / "checkpoints" / "step000002.ckpt"),
                          "--zero-world-size", "1", "-o", str(resharded)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(list((resharded / "checkpoint").glob("*optim_states.pt"))) == 1
    resumed = train_single(tmp / "resumed_zero2_w1", cache, "strategy=deepspeed_zero2", f"ckpt_path={resharded}")
    assert_same_state(consolidate_zero_checkpoint(run / "checkpoints" / "step000004.ckpt"),
                      consolidate_zero_checkpoint(resumed / "checkpoints" / "step000004.ckpt"))
    losses, reference = step_losses(resumed), step_losses(run)
    assert sorted(losses) == [2, 3]
    for step in losses:
        assert losses[step] == pytest.approx(reference[step], rel=LOSS_RTOL)
    first = [c for c in read_consumed(run / "consumed") if c[0] < 2]
    assert first + read_consumed(resumed / "consumed") == read_consumed(run / "consumed")


@pytest.mark.distributed
def test_consolidated_checkpoint_loads_without_deepspeed(two_node_zero2):
    """The consolidated weights are the ZeRO run's: same logits as the sharded engine's weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.models.lm import LanguageModel

    _, tmp, run = two_node_zero2
    checkpoint = run / "checkpoints" / "step000004.ckpt"
    path = tmp / "weights.ckpt"
    out = subprocess.run([sys.executable, "scripts/consolidate_checkpoint.py", str(checkpoint), "-o", str(path),
                          "--weights-only"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model = LanguageModel.load_from_checkpoint(path, map_location="cpu")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    for name, value in model.state_dict().items():
        if name in reference:
            assert torch.equal(value, reference[name]), name
    assert set(reference) <= set(model.state_dict())
    assert "optimizer_states" not in torch.load(path, map_location="cpu", weights_only=False)
    tokens = torch.randint(0, model.model.config.vocab_size, (2, 12))
    assert torch.isfinite(model.model(tokens)).all()


def test_consolidation_refuses_what_is_not_a_sharded_checkpoint(tmp_path):
    (tmp_path / "plain.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a sharded DeepSpeed checkpoint"):
        consolidate_zero_checkpoint(tmp_path / "plain.ckpt")
    incomplete = tmp_path / "step000002.ckpt"
    (incomplete / "checkpoint").mkdir(parents=True)
    (incomplete / "latest").write_text("checkpoint")
    with pytest.raises(ValueError, match="step000002.ckpt"):
        consolidate_zero_checkpoint(incomplete)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_world1_resumes_at_world2_with_ddp(demo_data, tmp_path):
    """1 -> 2: a single-process ZeRO-2 checkpoint, consolidated, resumed by 2 DDP processes."""
    cache = demo_data[0].cache_dir
    run = train_single(tmp_path / "zero2_w1", cache, "strategy=deepspeed_zero2")
    consolidated = tmp_path / "step2.ckpt"
    from pipeline.training.checkpointing import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(consolidate_zero_checkpoint(run / "checkpoints" / "step000002.ckpt"),
                                         consolidated)
    resumed = train_torchrun(tmp_path / "resumed_w2", cache, 1, 2, "strategy=ddp", f"ckpt_path={consolidated}")
    final = torch.load(resumed / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)
    assert_same_state(consolidate_zero_checkpoint(run / "checkpoints" / "step000004.ckpt"), final)
    first = [c for c in read_consumed(run / "consumed") if c[0] < 2]
    assert first + read_consumed(resumed / "consumed") == read_consumed(run / "consumed")
    losses, reference = step_losses(resumed), step_losses(run)
    for step in (2, 3):
        assert losses[step] == pytest.approx(reference[step], rel=LOSS_RTOL)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_world1_resumes_with_zero2_at_world2_from_resharded_shards(demo_data, tmp_path):
    from pipeline.training.zero_checkpoint import reshard_zero12_checkpoint

    cache = demo_data[0].cache_dir
    run = train_single(tmp_path / "zero2_w1", cache, "strategy=deepspeed_zero2")
    resharded = reshard_zero12_checkpoint(run / "checkpoints" / "step000002.ckpt", tmp_path / "step2.w2.ckpt", 2)
    resumed = train_torchrun(tmp_path / "resumed_w2", cache, 1, 2, "strategy=deepspeed_zero2", f"ckpt_path={resharded}")
    assert_same_state(consolidate_zero_checkpoint(run / "checkpoints" / "step000004.ckpt"),
                      consolidate_zero_checkpoint(resumed / "checkpoints" / "step000004.ckpt"))
    first = [c for c in read_consumed(run / "consumed") if c[0] < 2]
    assert first + read_consumed(resumed / "consumed") == read_consumed(run / "consumed")


def test_resharding_refuses_a_world_size_below_one(tmp_path):
    from pipeline.training.zero_checkpoint import reshard_zero12_checkpoint

    with pytest.raises(ValueError, match="world_size must be >= 1"):
        reshard_zero12_checkpoint(tmp_path / "a.ckpt", tmp_path / "b.ckpt", 0)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_world2_consolidates_and_resumes_at_world1(demo_data, tmp_path):
    cache = demo_data[0].cache_dir
    run = train_torchrun(tmp_path / "zero3_w2", cache, 1, 2, "strategy=deepspeed_zero3")
    consolidated = consolidate_zero_checkpoint(run / "checkpoints" / "step000002.ckpt")
    assert consolidated["mixpipe_consolidated_from"]["zero_stage"] == 3
    from pipeline.training.zero_checkpoint import reshard_zero12_checkpoint

    with pytest.raises(ValueError, match="ZeRO-3 checkpoint"):
        reshard_zero12_checkpoint(run / "checkpoints" / "step000002.ckpt", tmp_path / "no.ckpt", 1)
    from pipeline.training.checkpointing import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint(consolidated, tmp_path / "step2.ckpt")
    resumed = train_single(tmp_path / "resumed_w1", cache, "strategy=single", f"ckpt_path={tmp_path / 'step2.ckpt'}")
    final = torch.load(resumed / "checkpoints" / "step000004.ckpt", map_location="cpu", weights_only=False)
    assert_same_state(consolidate_zero_checkpoint(run / "checkpoints" / "step000004.ckpt"), final)
    first = [c for c in read_consumed(run / "consumed") if c[0] < 2]
    assert first + read_consumed(resumed / "consumed") == read_consumed(run / "consumed")


@pytest.mark.distributed
def test_ranks_launched_with_different_configs_stop_with_a_clear_message(demo_data, tmp_path):
    """Node 1 was started with another mixture: both ranks refuse before the first step."""
    cache = demo_data[0].cache_dir
    port = _free_port()
    processes, logs = [], []
    for node, extra in ((0, []), (1, ["mixture.stages.0.tau_start=3.0"])):
        log = tmp_path / f"node{node}.log"
        logs.append(log)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   "-m", "pipeline.train", *RUN, f"cache_dir={cache}", f"output_dir={tmp_path / 'run'}",
                   "trainer.num_nodes=2", "trainer.devices=1", "strategy=ddp", *extra]
        with open(log, "w") as stream:
            processes.append(subprocess.Popen(command, cwd=REPO, env=_env(), stdout=stream, stderr=subprocess.STDOUT))
    for process in processes:
        process.wait(timeout=240)
    for process, log in zip(processes, logs, strict=True):
        text = log.read_text()
        assert process.returncode != 0, text[-3000:]
        assert "ranks disagree about the run (rank 1 differs from rank 0 in config_digest, mixture, sampler_stream)" in text
    assert not (tmp_path / "run" / "consumed").exists()  # no step was trained


@pytest.mark.slow
@pytest.mark.distributed
def test_a_rank_killed_mid_run_is_relaunched_from_the_last_complete_checkpoint(demo_data, compose_config, tmp_path):
    """SIGKILL rank 1 of a 2-process ZeRO-2 run after its first checkpoint; torchrun tears the
    job down; the same command with ckpt_path=last continues and finishes on the same stream."""
    import json
    import time

    import psutil

    from pipeline.config.data import datamodule_from_config

    cache = demo_data[0].cache_dir
    steps, every = 40, 4
    overrides = [o for o in RUN if not o.startswith(("run.total_steps", "checkpoint.every_n_steps",
                                                     "run.global_batch_size"))]
    overrides += [f"run.total_steps={steps}", f"checkpoint.every_n_steps={every}", "run.global_batch_size=16",
                  f"cache_dir={cache}", f"output_dir={tmp_path / 'run'}", "strategy=deepspeed_zero2",
                  "trainer.devices=2"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "pipeline.train", *overrides]
    pointer = tmp_path / "run" / "checkpoints" / "last.json"
    with open(tmp_path / "first.log", "w") as stream:
        launcher = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not pointer.is_file() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                   if p.environ().get("RANK") == "1"]
        assert workers, "rank 1 not found (did the run finish before the kill?)"
        workers[0].kill()  # SIGKILL: no handler, no cleanup
        launcher.wait(timeout=120)
    assert launcher.returncode != 0
    killed_at = json.loads(pointer.read_text())["global_step"]
    assert 0 < killed_at < steps

    command[command.index("--master-port") + 1] = str(_free_port())
    with open(tmp_path / "second.log", "w") as stream:
        relaunch = subprocess.Popen([*command, "ckpt_path=last"], cwd=REPO, env=_env(), stdout=stream,
                                    stderr=subprocess.STDOUT)
        _check([relaunch], [tmp_path / "second.log"], timeout=600)
    log = (tmp_path / "second.log").read_text()
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / f'step{killed_at:06d}.ckpt'}" in log
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["global_steps"] == steps
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no staging left behind

    # Stream: steps before the resume point from the killed launch, the rest from the
    # relaunch (steps the killed launch did past its last checkpoint are redone, not
    # skipped): together exactly the sampler's global stream.
    starts = sorted(p.name for p in (tmp_path / "run" / "consumed").iterdir())
    assert starts == ["rank0-from00000000.jsonl", f"rank0-from{killed_at:08d}.jsonl",
                      "rank1-from00000000.jsonl", f"rank1-from{killed_at:08d}.jsonl"]
    datamodule = datamodule_from_config(compose_config(overrides), *demo_data[1:])
    expected = [(step, datamodule.sources[s], i) for step in range(steps)
                for s, i in zip(datamodule.sampler.global_batch(step).source.tolist(),
                                datamodule.sampler.global_batch(step).index.tolist(), strict=True)]
    assert read_consumed(tmp_path / "run" / "consumed") == expected
