"""``shardtune chat PATH``: an interactive conversation with any model a run left.

Each line typed is a user turn; the whole history goes through the chat template, so the model
sees the conversation so far. ``/reset`` clears the history, ``/exit`` (or end of input, Ctrl-D)
ends the session. When the conversation no longer fits the model's context with room for an
answer, the oldest turns are dropped (a ``--system`` prompt is kept) and the session says so.
Replies are streamed as they are generated.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .generate import add_model_options, check_device_option, image_for, sampling_of


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="shardtune chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(ap)
    ap.add_argument("--system", help="a system prompt, kept for the whole session")
    args = ap.parse_args(argv)
    sampling = sampling_of(args)
    check_device_option(args)
    image = image_for(args)
    from ..infer.chat import HELP, ChatSession, run_session  # torch and transformers: once the options are checked
    from ..infer.generate import inference_dtype
    from ..infer.loading import load_for_inference

    model, inputs = load_for_inference(args.model, args.base, args.device, inference_dtype(args.dtype, args.device))
    session = ChatSession(model, inputs, sampling, system=args.system, image=image)
    stdin = sys.stdin  # None when the process was started with stdin closed (`<&-`): no input at all
    interactive = stdin is not None and stdin.isatty()
    if interactive:
        print(HELP)

    def read() -> str:
        if interactive:
            return input("you> ")
        line = stdin.readline() if stdin is not None else ""
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def write(text: str) -> None:
        print(text, flush=True)

    try:
        run_session(session, read, write, stream=interactive)
    except KeyboardInterrupt:
        print()
    if interactive:
        print("bye")
