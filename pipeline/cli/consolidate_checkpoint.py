"""Turn a sharded DeepSpeed (ZeRO-1/2/3) checkpoint into one plain Lightning checkpoint file.

    mixpipe-consolidate runs/lm1/checkpoints/step000200.ckpt
    mixpipe-consolidate runs/lm1/checkpoints/step000200.ckpt -o lm1.ckpt --weights-only
    mixpipe-consolidate runs/lm1/checkpoints/step000200.ckpt --zero-world-size 4

The output loads with no DeepSpeed (``LanguageModel.load_from_checkpoint(path)``, or
``torch.load(path)["state_dict"]``) and, unless ``--weights-only``, resumes training at
any world size with the single-device or DDP strategy: it holds the fp32 weights, the Adam
moments in `torch.optim` layout, the scheduler, the loops and the data stream position
(``ckpt_path=<file>``). Runs on CPU. Written atomically (temp file + rename).

``--zero-world-size N`` instead writes a ZeRO-1/2 checkpoint *directory* re-sharded for N
ranks (`pipeline.training.zero_checkpoint.reshard_zero12_checkpoint`), so training resumes with the same
DeepSpeed strategy at N ranks (``ckpt_path=<dir>``); DeepSpeed itself refuses to load shards
written at another world size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.training.checkpointing import AtomicCheckpointIO
from pipeline.training.zero_checkpoint import (
    CONSOLIDATED_KEY,
    consolidate_zero_checkpoint,
    reshard_zero12_checkpoint,
)

WEIGHTS_ONLY_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "pytorch-lightning_version",
                     "global_step", "epoch", "mixpipe_identity", CONSOLIDATED_KEY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a DeepSpeed checkpoint directory (<run>/checkpoints/stepNNNNNN.ckpt)")
    parser.add_argument("-o", "--output", type=Path,
                        help="output file (default: <checkpoint stem>.consolidated.ckpt beside it)")
    parser.add_argument("--weights-only", action="store_true",
                        help="model weights and hyperparameters only (no optimizer, loops or data state)")
    parser.add_argument("--zero-world-size", type=int, metavar="N",
                        help="write a ZeRO-1/2 checkpoint directory re-sharded for N ranks instead")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.zero_world_size is not None:
        output = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}.w{args.zero_world_size}.ckpt")
        try:
            reshard_zero12_checkpoint(args.checkpoint, output, args.zero_world_size)
        except ValueError as error:
            print(f"consolidate_checkpoint: {error}", file=sys.stderr)
            return 2
        print(f"{args.checkpoint} -> {output}: ZeRO-1/2 shards for {args.zero_world_size} rank(s), "
              f"{time.perf_counter() - started:.1f} s")
        return 0
    output = args.output or args.checkpoint.with_name(f"{args.checkpoint.stem}.consolidated.ckpt")
    try:
        checkpoint = consolidate_zero_checkpoint(args.checkpoint)
    except ValueError as error:
        print(f"consolidate_checkpoint: {error}", file=sys.stderr)
        return 2
    if args.weights_only:
        checkpoint = {k: checkpoint[k] for k in WEIGHTS_ONLY_KEYS if k in checkpoint}
    AtomicCheckpointIO().save_checkpoint(checkpoint, output)
    origin = checkpoint[CONSOLIDATED_KEY]
    numel = sum(t.numel() for t in checkpoint["state_dict"].values())
    print(f"{args.checkpoint} (ZeRO-{origin['zero_stage']}, world size {origin['world_size']}, "
          f"step {checkpoint.get('global_step')}) -> {output}: {len(checkpoint['state_dict'])} tensors, "
          f"{numel:,} values, {output.stat().st_size / 2**20:.1f} MiB, "
          f"{'weights only' if args.weights_only else 'resumable'}, {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
