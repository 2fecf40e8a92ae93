"""`stcompress <stage>`: each subcommand builds its stage config and calls the stage's `run`.

Options come from the config dataclasses: `--generation.batch-size 8` (dashes or underscores),
after an optional `--config FILE.yaml`; command-line values win over the file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from stcompress import __version__
from stcompress.config import (
    DemoConfig,
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    ImportanceConfig,
    PruneConfig,
    ReportConfig,
    RunConfig,
    TranslateConfig,
    flat_fields,
    load_config,
    read_yaml,
    to_dict,
)
from stcompress.errors import StcompressError, Terminated
from stcompress.failures import exit_code, explain, terminate_like_interrupt
from stcompress.outputs import overwrite

log = logging.getLogger("stcompress")


@dataclass(frozen=True)
class Command:
    """A subcommand: its config type; the stage module of the same name provides `run(cfg, progress=)`."""

    config_cls: type
    help: str
    after: Callable[[Path], None] | None = None
    positional: str | None = None  # a config field also accepted as the one positional argument

    def run(self, name: str, cfg: Any, progress: bool) -> Path:
        return importlib.import_module(f"stcompress.stages.{name}").run(cfg, progress=progress)


def _print_removal_order(out: Path) -> None:
    result = json.loads((out / "removal_order.json").read_text(encoding="utf-8"))
    print(f"removal order ({result['metric']}): {result['removal_order']}; stopped: {result['stop_reason']}")


def _print_scores(out: Path) -> None:
    from stcompress.stages.evaluate import SCORES, format_table

    print(format_table(json.loads((out / SCORES).read_text(encoding="utf-8"))))


COMMANDS: dict[str, Command] = {  # in pipeline order
    "translate": Command(TranslateConfig, "translate speech with a model -> hypotheses.jsonl"),
    "evaluate": Command(EvaluateConfig, "score hypotheses (or a model) against references -> scores.json", _print_scores),
    "importance": Command(ImportanceConfig, "greedy layer-importance search (resumable, multi-GPU)", _print_removal_order),
    "prune": Command(PruneConfig, "remove layers and save a model that loads with from_pretrained"),
    "distill": Command(DistillConfig, "sequence-level KD data: references + teacher translations -> examples.jsonl"),
    "finetune": Command(FinetuneConfig, "full / LoRA / QLoRA fine-tuning (resumable, word-level KD) -> model/ or adapter/"),
    "export": Command(ExportConfig, "merge LoRA, save (optionally NF4 4-bit) with a model card; reload-checked"),
    "report": Command(ReportConfig, "render a run's results (tables, plots) into report.md and report.html", positional="run_dir"),
    "run": Command(RunConfig, "run a YAML recipe's stages into one run directory (skips unchanged stages)", positional="recipe"),
    "demo": Command(DemoConfig, "the whole pipeline on the built-in task, offline on CPU in a few minutes -> report"),
}
RUNNERS = ("run", "demo")
OVERWRITE_HELP = ("an output directory holding files stcompress did not write is moved aside to <name>.replaced-<time> "
                  "(never deleted) instead of refused; our own finished outputs are replaced without it")  # commands that drive other stages (never a recipe stage themselves)


def _metavar(tp: Any) -> str:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if args and get_origin(args[0]) is Literal:
        return _metavar(args[0])
    return "VALUE"


def _add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    for dotted, tp, default in flat_fields(cls):
        names = list(dict.fromkeys([f"--{dotted.replace('_', '-')}", f"--{dotted}"]))  # dashes shown first
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            *names,
            dest=f"cfg:{dotted}",
            default=argparse.SUPPRESS,
            nargs="?" if tp is bool else None,
            const="true" if tp is bool else None,
            metavar=_metavar(tp),
            help=f"(default: {shown})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stcompress", description="Compress audio-language models for speech translation."
    )
    parser.add_argument("--version", action="version", version=f"stcompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config; command-line options override it")
        p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        _add_config_options(p, cmd.config_cls)
        if cmd.positional:
            p.add_argument("positional", nargs="?", metavar=cmd.positional.upper(), help=f"same as --{cmd.positional.replace('_', '-')}")
        if name == "run":
            p.add_argument("--from", dest="cfg:from_stage", default=argparse.SUPPRESS, metavar="NAME",
                           help="rerun this stage and every later one")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # weight loading / shard writing bars


def _take_positional(cmd: Command, args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """`run --dry-run RECIPE`: a flag's optional value swallowed the positional; give it back."""
    positional = getattr(args, "positional", None)
    flags = {d for d, tp, _ in flat_fields(cmd.config_cls) if tp is bool}
    for key in [k for k in overrides if k in flags]:
        value = str(overrides[key]).lower()
        if positional is None and value not in {"true", "false", "yes", "no", "1", "0", "on", "off"}:
            positional, overrides[key] = overrides[key], "true"
    if positional:
        overrides[cmd.positional] = positional


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    with terminate_like_interrupt(), overwrite(args.overwrite):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    """Run the command; every failure ends as one line and an exit code, except bugs (traceback)."""
    cmd = COMMANDS[args.command]
    try:
        overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
        if cmd.positional:
            _take_positional(cmd, args, overrides)
        cfg = load_config(cmd.config_cls, read_yaml(args.config) if args.config else None, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
            return 0
        log.debug("argv: %s", sys.argv)  # local paths: debug only (-v), never in a shared log by default
        log.debug("%s config:\n%s", args.command, json.dumps(to_dict(cfg), indent=2, ensure_ascii=False))
        out = cmd.run(args.command, cfg, progress=not args.quiet)
        if cmd.after:
            cmd.after(out)
        if not getattr(cfg, "dry_run", False):
            print(f"{args.command}: wrote {out}")
        return 0
    except StcompressError as exc:
        print(f"stcompress {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "interrupted" if not isinstance(exc, Terminated) else f"terminated ({signal.Signals(exc.signum).name})"
        print(f"stcompress {args.command}: {how}; no output was marked complete", file=sys.stderr)
        return exit_code(exc)
    except Exception as exc:
        line = explain(exc)  # disk full, permission, read-only disk: not a bug
        if line is not None:
            print(f"stcompress {args.command}: error: {line}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(f"stcompress {args.command}: this is a bug in stcompress; please report it with the traceback above",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
