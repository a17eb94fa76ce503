"""g3n-run: generate text with a folder made by g3n-compile."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .errors import UserError, one_line, run_cli
from .generate import load
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
    src.add_argument("--input-ids", type=_ids,
                     help="raw prompt token ids, e.g. 2,17,301 (no template); runs even with an unreadable tokenizer "
                          "file, whose output then has no text (--json gives the ids)")
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
                   help="save the [generated_tokens, vocab] float32 logits each generated token was chosen from "
                        "(the path is checked before the model loads; the file appears once complete)")
    args = p.parse_args(argv)

    temperature = 0.0 if args.greedy or args.temperature is None else args.temperature
    sampling = SamplingParams(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.chat and args.logits_out:
        raise UserError("--logits-out goes with --prompt or --input-ids, not --chat")
    with _output_file(args.logits_out) as logits_out:  # opened first: an unwritable path fails before any work
        llm = load(args.folder, device=args.device)
        if args.chat:
            return _chat(llm, args, sampling)
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, on_token=stream,
                       keep_logits=logits_out is not None, ignore_eos=args.ignore_eos, images=args.image,
                       audios=args.audio)
        if args.input_ids is not None:
            _warn_if_no_text(llm)
            result = llm.generate(args.input_ids, **options)
        elif args.raw or not llm.require_tokenizer().chat_template:
            result = llm.generate(args.prompt, **options)
        else:
            ids = llm.chat_ids([{"role": "user", "content": _parts(args, args.prompt)}])
            result = llm.generate(ids, **options)
        if logits_out is not None:
            np.save(logits_out, np.stack(result.logits).astype(np.float32))
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


@contextmanager
def _output_file(path: str | None) -> Iterator[BinaryIO | None]:
    """A temporary file beside `path` (None without one), renamed onto it once the block has written it: made
    before the generation, so that an unwritable path fails at once, and never left half written."""
    if path is None:
        yield None
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"--logits-out {path}: is a folder; give a file path (FILE.npy)")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        f = open(tmp, "wb")
    except OSError as e:
        raise UserError(f"--logits-out {path}: cannot write there ({e.strerror}); give a path in a writable "
                        f"folder") from None
    try:
        with f:
            yield f
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _warn_if_no_text(llm) -> None:
    """A prompt of token ids runs without the tokenizer; when its file is unreadable, the output has no text."""
    try:
        llm.tokenizer
    except TokenizerError as e:
        print(f"g3n-run: warning: {one_line(e)}; the output has no text (--json gives its ids)", file=sys.stderr)


def _parts(args, text: str) -> list[dict]:
    """A user message's content: the --image and --audio files, then the text."""
    return ([{"type": "image", "image": path} for path in args.image]
            + [{"type": "audio", "audio": path} for path in args.audio] + [{"type": "text", "text": text}])


def _chat(llm, args, sampling) -> int:
    """Interactive chat on stdin; the --image/--audio files go with the first message. A line that is not
    UTF-8, or too long for the context, is skipped with a note on stderr; when the conversation outgrows the
    context, its oldest turns are dropped so that an answer of --max-new-tokens fits."""
    messages = []
    while True:
        print("you> ", end="", flush=True)
        raw = sys.stdin.buffer.readline()
        if not raw.strip():  # end of input, or an empty line
            return 0
        try:
            line = raw.decode().rstrip("\r\n")
        except UnicodeDecodeError as e:
            _note(f"that line is not valid UTF-8 (byte 0x{raw[e.start]:02x} at {e.start}); type it again in UTF-8")
            continue
        messages.append({"role": "user", "content": _parts(args, line) if not messages else line})
        if not _fit(llm, messages, args.max_new_tokens):
            messages.pop()
            continue
        print("model> ", end="", flush=True)
        result = llm.chat(messages, max_new_tokens=args.max_new_tokens, sampling=sampling,
                          on_token=lambda piece: print(piece, end="", flush=True))
        print()
        messages.append({"role": "assistant", "content": result.text})


def _fit(llm, messages: list[dict], room: int) -> bool:
    """Drop the conversation's oldest turns (a user message and its answer) until `room` tokens fit after it
    in the context; False when its last message alone leaves no room to answer. Either is said on stderr."""
    context = llm.model.max_context
    if (alone := len(llm.chat_ids(messages[-1:]))) >= context:
        _note(f"that message takes {alone} tokens, the whole context ({context}); type a shorter one")
        return False
    dropped = 0
    while len(messages) > 1 and len(llm.chat_ids(messages)) + room > context:
        del messages[:2]
        dropped += 1
    if dropped:
        _note(f"the conversation outgrew the context ({context} tokens): dropped its {dropped} oldest turn(s)")
    return True


def _note(message: str) -> None:
    print(f"g3n-run: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
