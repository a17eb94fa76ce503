"""g3n-compile: a Gemma 3n checkpoint -> an output folder of IREE modules + parameter archive."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from passes import PASSES
from passes.pipeline import ordered
from runtime.errors import run_cli
from targets import TARGETS, list_targets

from .compile import compile_model


def main(argv: list[str] | None = None) -> int:
    return run_cli("g3n-compile", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="g3n-compile",
        description="Compile a Gemma 3n checkpoint (Hugging Face folder) into an output folder: model.irpa "
                    "(weights), <target>.vmfb (code, one per target; <target>-audio.vmfb and <target>-vision.vmfb too "
                    "when the checkpoint has those towers), tokenizer files and g3n.json (the module ABI). Compiling another target into a folder of the same checkpoint and settings adds its "
                    "module and keeps the folder's model.irpa. Run it with g3n-run.")
    p.add_argument("--model", default="tiny-random",
                   help="checkpoint folder, or 'tiny-random' (the built-in random test model; default)")
    p.add_argument("--target", default="cpu",
                   help=f"one target or a comma-separated list: {', '.join(TARGETS)} (default: cpu; see --list-targets)")
    for name, target in TARGETS.items():
        p.add_argument(target.ARCH_OPTION, dest=f"arch_{name}", metavar="NAME",
                       help=f"{name} architecture: {', '.join(target.ARCHS)} (default: {target.DEFAULT_ARCH})")
    p.add_argument("--list-targets", action="store_true", help="print the targets and their architectures, then exit")
    p.add_argument("-o", "--output", type=Path, help="output folder (default: out/<model name>)")
    p.add_argument("--max-context", type=int, default=2048, help="tokens the KV cache holds (default: 2048)")
    p.add_argument("--chunk", type=int, default=128, help="prefill chunk: tokens per prefill call (default: 128)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weight dtype in model.irpa (default: auto = as stored in the checkpoint)")
    p.add_argument("--quant", choices=("auto", "none", "int4"), default="auto",
                   help="linear-weight quantization (default: auto = int4 for checkpoints, none for tiny-random)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size along the input dimension (default: 32)")
    p.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help="skip a compiler pass (repeatable; see --list-passes)")
    p.add_argument("--dump-ir-after", nargs=2, metavar=("NAME|all", "DIR"),
                   help="write the module's IR after pass NAME (or after every pass) into DIR "
                        "(DIR/<target> when compiling for several targets)")
    p.add_argument("--list-passes", action="store_true", help="list the compiler passes in order and exit")
    p.add_argument("--skip-encoder", action="append", default=[], choices=("audio", "vision"), metavar="KIND",
                   help="build no audio or vision encoder module (repeatable); without it, a checkpoint tower that "
                        "does not compile for a target stops the compile (see --list-targets for what each takes)")
    args = p.parse_args(argv)
    if args.list_targets:
        print(list_targets())
        return 0
    if args.list_passes:
        for cls in ordered(PASSES):
            deps = f" (after {', '.join(cls.after)})" if cls.after else ""
            print(f"{cls.name:16s} {cls.summary()}{deps}")
        return 0

    out = args.output or Path("out") / Path(args.model).name
    archs = {name: getattr(args, f"arch_{name}") for name in TARGETS if getattr(args, f"arch_{name}") is not None}
    compile_model(args.model, args.target, out, max_context=args.max_context, chunk=args.chunk, archs=archs,
                  dtype=args.dtype, group_size=args.group_size, disabled_passes=args.disable_pass,
                  quant=("none" if args.model == "tiny-random" else "int4") if args.quant == "auto" else args.quant,
                  dump_ir_after=[args.dump_ir_after[0]] if args.dump_ir_after else [],
                  dump_dir=Path(args.dump_ir_after[1]) if args.dump_ir_after else None,
                  skip_encoders=args.skip_encoder, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
