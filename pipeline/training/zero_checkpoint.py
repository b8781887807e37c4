"""Resuming at another world size: consolidate sharded ZeRO checkpoints, or reshard ZeRO-1/2.

DeepSpeed refuses to load a ZeRO-1/2/3 checkpoint at another data-parallel size ("Automatic
adjustment of ZeRO's optimizer state partitioning with a new world size is not currently
supported"), and its universal checkpoint needs ``universal_checkpoint_info`` that only
Megatron-DeepSpeed writes. So a sharded checkpoint is *consolidated*: every rank's flat
partition of the fp32 master weights and of the Adam moments is gathered back into full
per-parameter tensors (DeepSpeed's own `zero_to_fp32` merge routines, applied to the
moments as well as the weights) and written as a plain Lightning checkpoint: model
``state_dict``, ``optimizer_states`` in `torch.optim.AdamW` layout, the scheduler, loops,
callbacks and the datamodule's sampler state. That file loads with no DeepSpeed
(`LanguageModel.load_from_checkpoint`) and resumes training exactly at any world size with
the single-device or DDP strategy. The data stream needs nothing: the sampler's state is the
step, and rank r of W' takes slice r of each global batch.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

# Keys of DeepSpeed's model-states file that are DeepSpeed's, not Lightning's client state.
_DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
    "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "checkpoint_parallel_dimensions", "ds_config", "ds_version", "csr_tensor_module_names",
})
_MOMENTS = ("exp_avg", "exp_avg_sq")
CONSOLIDATED_KEY = "mixpipe_consolidated_from"


# -- consolidation -------------------------------------------------------------------------
def _tag_dir(checkpoint: Path) -> Path:
    """The shard directory of a Lightning DeepSpeed checkpoint (``<ckpt>/<tag from 'latest'>``)."""
    latest = checkpoint / "latest"
    if not checkpoint.is_dir() or not latest.is_file():
        raise ValueError(f"{checkpoint} is not a sharded DeepSpeed checkpoint (no directory with a "
                         "'latest' file); single-file checkpoints need no consolidation")
    tag_dir = checkpoint / latest.read_text().strip()
    if not tag_dir.is_dir():
        raise ValueError(f"{latest} names tag {tag_dir.name!r}, which is not a directory")
    return tag_dir


def _base_optimizer_state(optim: dict[str, Any]) -> dict[str, Any]:
    inner = optim["optimizer_state_dict"]
    state = inner.get("base_optimizer_state", inner.get("optimizer_state_dict"))  # stage <=2 / 3
    if not isinstance(state, dict) or "state" not in state:
        raise ValueError("ZeRO optimizer shard holds no base optimizer state (optimizer offloaded "
                         "to NVMe, or a DeepSpeed version this code does not know)")
    return state


def _merge(zero_stage: int, flat_groups: list, world_size: int, model_states: list,
           paddings) -> dict[str, torch.Tensor]:
    """Full tensors per parameter name from per-rank flat partitions (weights or a moment)."""
    from deepspeed.utils import zero_to_fp32 as z

    merged: dict[str, Any] = {}
    # The merge routines print progress (stdout) and draw tqdm bars (stderr).
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if zero_stage <= 2:
            z._zero2_merge_trainable_params(merged, world_size, flat_groups, model_states, paddings)
        else:
            z._zero3_merge_trainable_params(merged, world_size, flat_groups, model_states)
    return {name: value.contiguous().clone() for name, value in merged.items()}


def consolidate_zero_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """A plain Lightning checkpoint (one dict) from a sharded DeepSpeed checkpoint directory.

    Returns the client state Lightning saved (loops, callbacks, schedulers, datamodule, run
    identity) plus ``state_dict`` (fp32, every parameter and buffer) and ``optimizer_states``
    (`torch.optim` layout: parameters numbered across the optimizer's groups in order).

    Raises:
        ValueError: not a DeepSpeed checkpoint directory, or missing / inconsistent shards.
    """
    from deepspeed.utils import zero_to_fp32 as z

    checkpoint = Path(checkpoint)
    tag_dir = _tag_dir(checkpoint)
    try:
        model_files = z.get_model_state_files(str(tag_dir))
        optim_files = z.get_optim_files(str(tag_dir))
    except FileNotFoundError as error:
        raise ValueError(f"{checkpoint}: {error}") from error
    shards = [torch.load(f, map_location="cpu", weights_only=False) for f in optim_files]
    first = shards[0]["optimizer_state_dict"]
    zero_stage = int(first["zero_stage"])
    world_size = first["partition_count"]
    world_size = max(world_size) if isinstance(world_size, list) else int(world_size)
    if world_size != len(shards):
        raise ValueError(f"{tag_dir}: {len(shards)} optimizer shard(s) for a ZeRO world size of "
                         f"{world_size}; the checkpoint is incomplete")
    with contextlib.redirect_stdout(io.StringIO()):
        model_states = z.parse_model_states(model_files)
    paddings = first.get("param_alignment_paddings")
    flat_key = "single_partition_of_fp32_groups" if zero_stage <= 2 else "fp32_flat_groups"

    weights = _merge(zero_stage, [s["optimizer_state_dict"][flat_key] for s in shards],
                     world_size, model_states, paddings)
    bases = [_base_optimizer_state(s) for s in shards]
    groups = len(bases[0]["param_groups"])
    moments = {key: _merge(zero_stage, [[b["state"][g][key] for g in range(groups)] for b in bases],
                           world_size, model_states, paddings) for key in _MOMENTS}

    client = torch.load(z.get_model_state_file(str(tag_dir), zero_stage), map_location="cpu",
                        weights_only=False)
    state_dict = {**model_states[0].buffers, **weights}
    for alias, source in model_states[0].shared_params:  # tied parameters saved once
        state_dict[alias] = state_dict[source]
    state_dict = {name.removeprefix("_forward_module."): value for name, value in state_dict.items()}

    # torch.optim numbers parameters across groups in order; DeepSpeed recorded each group's
    # parameter names in that order (`param_shapes`), so the numbering is reproducible here.
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    param_groups = []
    number = 0
    for g, shapes in enumerate(model_states[0].param_shapes):
        step = bases[0]["state"][g]["step"]
        ids = []
        for name in shapes:
            optimizer_state[number] = {"step": step.clone(), **{k: moments[k][name] for k in _MOMENTS}}
            ids.append(number)
            number += 1
        param_groups.append({**bases[0]["param_groups"][g], "params": ids})

    result = {key: value for key, value in client.items() if key not in _DEEPSPEED_KEYS}
    result["state_dict"] = state_dict
    result["optimizer_states"] = [{"state": optimizer_state, "param_groups": param_groups}]
    result[CONSOLIDATED_KEY] = {"checkpoint": str(checkpoint), "zero_stage": zero_stage,
                                "world_size": world_size}
    return result


# -- re-sharding for ZeRO-1/2 at another world size ------------------------------------------
def reshard_zero12_checkpoint(source: str | Path, target: str | Path, world_size: int) -> Path:
    """Write `source` (a ZeRO-1/2 checkpoint directory, any world size) as a ZeRO-1/2
    checkpoint for `world_size` ranks at `target`, which DeepSpeed then loads natively.

    The consolidated weights and Adam moments of every parameter group are laid out as
    DeepSpeed's ZeRO-1/2 optimizer lays them out at `world_size`: the group's parameters
    flattened in order, zero-padded to a multiple of 2 x world_size, cut into world_size
    equal partitions (padding in the last). Written atomically (staged, then renamed).

    Raises:
        ValueError: ZeRO-3 (parameters are partitioned per tensor; consolidate instead), or
            per-parameter alignment padding (a layout this function does not reproduce).
    """
    import math
    import os
    import shutil

    source, target = Path(source), Path(target)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    tag_dir = _tag_dir(source)
    from deepspeed.utils import zero_to_fp32 as z

    shard = torch.load(z.get_optim_files(str(tag_dir))[0], map_location="cpu", weights_only=False)
    meta = shard["optimizer_state_dict"]
    if int(meta["zero_stage"]) > 2:
        raise ValueError(f"{source} is a ZeRO-3 checkpoint: re-sharding supports ZeRO-1/2; consolidate "
                         "it (scripts/consolidate_checkpoint.py) and resume with strategy=single or ddp")
    if any(any(p) for p in meta.get("param_alignment_paddings") or []):
        raise ValueError(f"{source} uses per-parameter alignment padding, which re-sharding does not reproduce")
    full = consolidate_zero_checkpoint(source)
    client = torch.load(z.get_model_state_file(str(tag_dir), int(meta["zero_stage"])), map_location="cpu",
                        weights_only=False)
    base = _base_optimizer_state(shard)
    weights, moments = full["state_dict"], full["optimizer_states"][0]["state"]

    names = [list(shapes) for shapes in client["param_shapes"]]
    numbers = iter(range(sum(len(n) for n in names)))
    flat: dict[str, list[torch.Tensor]] = {"fp32": [], "exp_avg": [], "exp_avg_sq": []}
    steps = []
    for group in names:
        ids = [next(numbers) for _ in group]
        flat["fp32"].append(torch.cat([weights[n].flatten().float() for n in group]))
        for key in _MOMENTS:
            flat[key].append(torch.cat([moments[i][key].flatten() for i in ids]))
        steps.append(moments[ids[0]]["step"])

    staging = target.with_name(f".{target.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    out_tag = staging / tag_dir.name
    out_tag.mkdir(parents=True)
    alignment = 2 * world_size  # DeepSpeed's nccl_start_alignment_factor x world size
    for rank in range(world_size):
        fp32, paddings, state = [], [], {}
        for g, vector in enumerate(flat["fp32"]):
            numel = vector.numel()
            part = math.ceil(numel / alignment) * alignment // world_size
            lo = rank * part
            padded = {k: torch.nn.functional.pad(flat[k][g], (0, part * world_size - numel)) for k in flat}
            fp32.append(vector[lo:min(lo + part, numel)].clone())  # saved without the padding
            paddings.append(part if numel <= lo else max(0, lo + part - numel))
            state[g] = {"step": steps[g].clone(),
                        **{k: padded[k][lo:lo + part].clone() for k in _MOMENTS}}
        optimizer = {**{k: meta[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad",
                                             "zero_stage", "param_alignment_paddings", "ds_version")
                        if k in meta},
                     "base_optimizer_state": {"state": state, "param_groups": base["param_groups"]},
                     "single_partition_of_fp32_groups": fp32, "group_paddings": paddings,
                     "partition_count": [world_size] * len(names)}
        torch.save({**{k: v for k, v in shard.items() if k != "optimizer_state_dict"},
                    "optimizer_state_dict": optimizer},
                   out_tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    module = {name: weights[name.removeprefix("_forward_module.")].clone() for name in client["module"]}
    torch.save({**client, "module": module, "dp_world_size": world_size},
               out_tag / "mp_rank_00_model_states.pt")
    (staging / "latest").write_text(tag_dir.name)
    for extra in source.iterdir():  # sidecars (run identity), not the shards
        if extra.is_file() and extra.name != "latest":
            shutil.copy2(extra, staging / extra.name)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


