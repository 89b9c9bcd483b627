"""``lightning-memopt consolidate CKPT_DIR OUT.pt``: one fp32 state dict from a sharded DeepSpeed checkpoint."""

import argparse
import contextlib
import sys

__all__ = ["add_parser", "run_consolidate"]


def add_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Register the ``consolidate`` subcommand."""
    parser = subparsers.add_parser(
        "consolidate",
        help="merge a MemOptStrategy checkpoint directory into one fp32 state-dict file",
        description="Merge the per-rank shards of a MemOptStrategy (DeepSpeed) checkpoint directory into one file "
        "whose `state_dict` holds fp32 weights; load it with `LightningModule.load_from_checkpoint(OUT)`.",
    )
    parser.add_argument("checkpoint_dir", help="the checkpoint path the run saved (a directory)")
    parser.add_argument("output_file", help="where to write the consolidated checkpoint, e.g. model.pt")
    parser.add_argument("--json", action="store_true", help="print JSON (the file, tensors and fp32 bytes)")
    parser.set_defaults(handler=run_consolidate)


def run_consolidate(args: argparse.Namespace) -> int:
    """Consolidate and report the number of tensors written."""
    from lightning_memopt.lightning.consolidate import consolidate_checkpoint

    # DeepSpeed's converter prints its progress; with --json, stdout is the JSON alone
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        checkpoint = consolidate_checkpoint(args.checkpoint_dir, args.output_file)
    state = checkpoint["state_dict"]
    if args.json:
        from lightning_memopt.cli.estimate import print_json

        num_bytes = sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "element_size"))
        print_json({"output_file": args.output_file, "tensors": len(state), "bytes": num_bytes})
        return 0
    print(f"wrote {len(state)} fp32 tensors to {args.output_file}")
    return 0
