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
    BUILTIN_MODELS,
    DemoConfig,
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    FinetuneConfig,
    ImportanceConfig,
    PruneConfig,
    ReportConfig,
    RunConfig,
    SweepConfig,
    TranslateConfig,
    config_yaml,
    field_help,
    flat_fields,
    load_config,
    read_yaml,
    to_dict,
)
from stcompress.errors import ConfigError, StcompressError, Terminated
from stcompress.failures import exit_code, explain, terminate_like_interrupt
from stcompress.outputs import overwrite
from stcompress.preflight import check_inputs

log = logging.getLogger("stcompress")


@dataclass(frozen=True)
class Command:
    """A subcommand: its config type; the stage module of the same name provides `run(cfg, progress=)`."""

    config_cls: type
    help: str
    after: Callable[[Path], None] | None = None
    positional: str | None = None  # a config field also accepted as the one positional argument

    def run(self, name: str, cfg: Any, progress: bool) -> Path:
        problems = check_inputs(cfg)  # every named input, before any model loads
        if problems:
            raise ConfigError(problems)
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
    "sweep": Command(SweepConfig, "quality-vs-bytes Pareto sweep: a grid of exports, each evaluated on dev and test -> report"),
    "demo": Command(DemoConfig, "the whole pipeline on the built-in task, offline on CPU in a few minutes -> report"),
}
RUNNERS = ("run", "sweep", "demo")  # commands that drive other stages (never a recipe stage themselves)
OVERWRITE_HELP = ("an output directory holding files stcompress did not write is moved aside to <name>.replaced-<time> "
                  "(never deleted) instead of refused; our own finished outputs are replaced without it")


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type inside an Optional, whether None is allowed)."""
    if get_origin(tp) is Literal:
        return tp, False
    args = [a for a in get_args(tp) if a is not type(None)]
    nullable = type(None) in get_args(tp)
    return (args[0] if nullable and len(args) == 1 else tp), nullable


def _metavar(tp: Any) -> str:
    inner, _ = _unwrap(tp)
    if get_origin(inner) is Literal:
        return "{" + ",".join(map(str, get_args(inner))) + "}"
    if inner is bool:
        return "true|false"
    if get_origin(inner) in (tuple, list):
        return "LIST"
    return {int: "N", float: "X"}.get(inner, "VALUE")


def _allowed(tp: Any) -> str:
    """What a value of `tp` may be, in words (choices are in the metavar already)."""
    inner, nullable = _unwrap(tp)
    if get_origin(inner) in (tuple, list):
        item = get_args(inner)[0] if get_args(inner) else str
        word = "comma-separated list" + {int: " of whole numbers", float: " of numbers"}.get(item, "")
    else:
        word = {int: "whole number", float: "number"}.get(inner, "")
    return ", ".join(w for w in (word, "null for none" if nullable else "") if w)


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "empty"
    if default == "":
        return "required"
    return "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)


# Extra spellings of an option (one option, several names).
ALIASES = {"run": {"from_stage": ["--from"]}}


def _add_config_options(parser: argparse.ArgumentParser, command: str, cls: type) -> None:
    for dotted, tp, default in flat_fields(cls):
        names = list(dict.fromkeys([f"--{dotted.replace('_', '-')}", f"--{dotted}", *ALIASES.get(command, {}).get(dotted, [])]))
        meaning = field_help(cls, dotted).rstrip(".")
        allowed = _allowed(tp)
        text = "; ".join(p for p in (meaning, allowed) if p) + f" (default: {_shown(default)})"
        parser.add_argument(
            *names,
            dest=f"cfg:{dotted}",
            default=argparse.SUPPRESS,
            nargs="?" if tp is bool else None,
            const="true" if tp is bool else None,
            metavar=_metavar(tp),
            help=text.replace("%", "%%"),
        )


def _epilog() -> str:
    from stcompress.data.sources import BUILTIN_DATASETS

    return (f"Built-in models (--model.path, built offline): {', '.join(BUILTIN_MODELS)}. Built-in datasets "
            f"(--data.dataset): {', '.join(BUILTIN_DATASETS)}. Options also come from --config FILE.yaml; "
            "--print-config shows them all.")


def build_parser() -> argparse.ArgumentParser:
    epilog = _epilog()
    parser = argparse.ArgumentParser(
        prog="stcompress", description="Compress audio-language models for speech translation.", epilog=epilog
    )
    parser.add_argument("--version", action="version", version=f"stcompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=epilog)
        p.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config; command-line options override it")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML (required fields still missing are marked) and exit")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging (the resolved config included)")
        p.add_argument("-q", "--quiet", action="store_true", help="warnings only; one progress line per stage instead of bars")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        _add_config_options(p, name, cmd.config_cls)
        if cmd.positional:
            p.add_argument("positional", nargs="?", metavar=cmd.positional.upper(), help=f"same as --{cmd.positional.replace('_', '-')}")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    from stcompress.progress import STATUS

    STATUS.enabled = quiet  # -q: one status line instead of progress bars
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        import warnings

        import transformers

        warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices

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
        cfg = load_config(cmd.config_cls, read_yaml(args.config) if args.config else None, overrides,
                          check=not args.print_config)
        if args.print_config:
            print(config_yaml(cfg), end="")
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
