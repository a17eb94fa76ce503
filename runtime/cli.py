"""g3n-run: generate text with a folder made by g3n-compile."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .errors import run_cli
from .generate import load
from .module import ModelError
from .sampling import SamplingParams
from .tokenizer import TokenizerError


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    return run_cli("g3n-run", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="g3n-run", description="Generate text with a compiled g3n folder.")
    p.add_argument("folder", help="output folder of g3n-compile")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="user message, wrapped in the model's chat template (see --raw)")
    src.add_argument("--chat", action="store_true", help="interactive chat on stdin (empty line or EOF quits)")
    src.add_argument("--input-ids", type=_ids, help="raw prompt token ids, e.g. 2,17,301 (no template)")
    p.add_argument("--raw", action="store_true", help="with --prompt: continue the text as is, no chat template")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image for the prompt (repeatable): with --prompt/--chat it goes before the text, as the "
                        "chat template places image parts; with --raw or --input-ids the prompt holds its "
                        "placeholder (<image_soft_token>, or the expanded run of ids)")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="a WAV clip of up to 30 s for the prompt (repeatable), placed like --image "
                        "(<audio_soft_token>)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at stop tokens: generate --max-new-tokens")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (the default unless --temperature is given)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None,
                   help="cpu, vulkan or cuda, with :N for the Nth such device (vulkan:1), or an IREE driver name "
                        "(local-sync); runs the folder's module for that device (default: its first module)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object instead of streaming text (input_ids: the prompt as run, images "
                        "and audio expanded to their placeholder tokens)")
    p.add_argument("--logits-out", metavar="FILE.npy",
                   help="save the [generated_tokens, vocab] float32 logits each generated token was chosen from")
    args = p.parse_args(argv)

    try:
        temperature = 0.0 if args.greedy or args.temperature is None else args.temperature
        sampling = SamplingParams(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, seed=args.seed)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        llm = load(args.folder, device=args.device)
        if args.chat:
            return _chat(llm, args, sampling)
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, on_token=stream,
                       keep_logits=bool(args.logits_out), ignore_eos=args.ignore_eos, images=args.image,
                       audios=args.audio)
        if args.input_ids is not None:
            result = llm.generate(args.input_ids, **options)
        elif args.raw or not llm.require_tokenizer().chat_template:
            result = llm.generate(args.prompt, **options)
        else:
            ids = llm.chat_ids([{"role": "user", "content": _parts(args, args.prompt)}])
            result = llm.generate(ids, **options)
    except (ModelError, TokenizerError, ValueError) as e:  # MediaError, ImageError, AudioError are ValueErrors
        print(f"g3n-run: error: {e}", file=sys.stderr)
        return 1
    if args.logits_out:
        np.save(args.logits_out, np.stack(result.logits).astype(np.float32))
    if args.json:
        print(json.dumps({"input_ids": result.input_ids, "output_ids": result.output_ids, "text": result.text,
                          "stop_reason": result.stop_reason,
                          "timings": {k: round(v, 6) for k, v in result.timings.items()}}))
    else:
        t = result.timings
        print(f"\n[{len(result.input_ids)} prompt tokens, {len(result.output_ids)} generated ({result.stop_reason}); "
              f"prefill {t['prefill_tokens_per_s']:.1f} tok/s, decode {t['decode_tokens_per_s']:.1f} tok/s]",
              file=sys.stderr)
    return 0


def _parts(args, text: str) -> list[dict]:
    """A user message's content: the --image and --audio files, then the text."""
    return ([{"type": "image", "image": path} for path in args.image]
            + [{"type": "audio", "audio": path} for path in args.audio] + [{"type": "text", "text": text}])


def _chat(llm, args, sampling) -> int:
    """Interactive chat; the --image/--audio files go with the first message."""
    messages = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": _parts(args, line) if not messages else line})
        print("model> ", end="", flush=True)
        result = llm.chat(messages, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          on_token=lambda piece: print(piece, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": result.text})


if __name__ == "__main__":
    sys.exit(main())
