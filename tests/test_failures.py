"""Failures end clean: a full disk, a corrupt file and SIGTERM are one line and an exit code, with
nothing left that looks complete and no temp file left behind; a bug keeps its traceback.

A full disk is injected into the writers (our atomic writer's os.write loop, a library writer's
error text, the heatmap), which is what a small tmpfs would do, at a chosen moment.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

PROGRESS_LINE = re.compile(r"^\S.* \d+/\d+ .*ETA ")  # stcompress.progress's status line in a log

from stcompress import artifacts, cli
from stcompress.artifacts import read_manifest

CPU = ["--model.device", "cpu", "-q"]
FAST = ["--data.limit", "2", "--generation.max-new-tokens", "4", *CPU]


def _hidden(root: Path) -> list[str]:
    """Every hidden file or directory under root: temp files, staging dirs, locks."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def _error_line(capsys, command: str) -> str:
    full = capsys.readouterr().err.strip()
    assert "Traceback" not in full, full
    # -q keeps one progress line per stage (issue 13 item 15); everything else is the one error line
    lines = [line for line in full.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, full
    err = lines[0]
    assert err.startswith(f"stcompress {command}: error: "), full
    return err


def _disk_full(fd: int, data: bytes) -> None:
    os.write(fd, data[: len(data) // 2])  # part of it lands, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_in_our_writer_is_one_line_and_nothing_is_left(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(artifacts, "_write_all", _disk_full)
    out = tmp_path / "out"
    assert cli.main(["translate", "--model.path", str(tiny_model_dir), *FAST, "--output", str(out)]) == 2
    err = _error_line(capsys, "translate")
    assert f"{out / 'hypotheses.jsonl'}: no space left on device; free space" in err and "nothing was marked complete" in err
    assert not out.exists() and _hidden(tmp_path) == []


def test_disk_full_inside_a_library_writer_is_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """safetensors (Rust) and torch.save (C++) report a full disk as text in their own exceptions."""
    from stcompress.stages import prune

    def save(model, processor, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"\0" * 64)  # half written
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })')

    monkeypatch.setattr(prune, "save_model", save)
    out = tmp_path / "pruned"
    args = ["prune", "--model.path", str(tiny_model_dir), "--layers", "1", "--data.limit", "1", "--output", str(out), *CPU]
    assert cli.main(args) == 2
    err = _error_line(capsys, "prune")
    assert f"{out}: no space left on device" in err
    assert not out.exists() and _hidden(tmp_path) == []


def test_disk_full_in_importance_results_then_a_clean_resume(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The search fills its output in place: a full disk while writing the results removes the
    result files (only the resumable state stays), and the rerun's output has no temp file left."""
    from stcompress.importance import plots

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    out = tmp_path / "imp"
    args = ["importance", "--model.path", str(tiny_model_dir), "--rounds", "1", "--output", str(out), *FAST]
    with monkeypatch.context() as m:
        m.setattr(plots, "atomic_write_bytes", full)
        assert cli.main(args) == 2
    assert "heatmap.png: no space left on device" in _error_line(capsys, "importance")
    left = sorted(os.listdir(out))
    assert not {"removal_order.json", "baseline.json", "candidates.jsonl", "manifest.json"} & set(left), left
    assert {"search.json", "candidates.rank0.jsonl", "hypotheses"} <= set(left)
    # what a kill inside atomic writes leaves, in the output and in hypotheses/
    (out / ".search.json.k1ll3d00.tmp").write_text("{")
    (out / "hypotheses" / ".baseline.jsonl.k1ll3d00.tmp").write_text("")
    assert cli.main(args) == 0
    assert read_manifest(out)["resumed"] is True and (out / "heatmap.png").stat().st_size > 1000
    assert _hidden(tmp_path) == []


def test_an_unexpected_error_keeps_its_traceback_and_says_it_is_a_bug(tmp_path, capsys, monkeypatch):
    from stcompress.stages import translate

    monkeypatch.setattr(translate, "translate_dataset", lambda *a, **k: 1 / 0)
    assert cli.main(["translate", "--model.path", "builtin:tiny-random", "--output", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and any("ZeroDivisionError" in line for line in err)
    assert err[-1] == "stcompress translate: this is a bug in stcompress; please report it with the traceback above"
    assert _hidden(tmp_path) == []


def test_corrupt_state_files_are_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys):
    ckpt = tmp_path / "ft.checkpoints" / "last"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"step": 3, "epo')  # cut off by a full disk
    # a listing that matches the damaged file (both restored from a damaged copy): the checksums pass,
    # so the JSON reader must name the file
    (ckpt / "checksums.json").write_text(json.dumps(
        {"trainer_state.json": hashlib.sha256((ckpt / "trainer_state.json").read_bytes()).hexdigest()}))
    args = ["finetune", "--model.path", str(tiny_model_dir), "--output", str(tmp_path / "ft"), "--dev.dataset", "none", *CPU]
    assert cli.main(args) == 2
    err = _error_line(capsys, "finetune")
    assert f"{ckpt / 'trainer_state.json'}: corrupt or truncated" in err and "train.resume: never" in err

    imp = tmp_path / "imp"
    imp.mkdir()
    (imp / "manifest.json").write_text('{"stage": "importance", "removal_or')
    assert cli.main(["prune", "--importance", str(imp), "--output", str(tmp_path / "p"), *CPU]) == 2
    assert f"{imp / 'manifest.json'}: corrupt or truncated" in _error_line(capsys, "prune")


def test_a_damaged_checkpoint_is_one_line(tmp_path, tiny_model_dir, make_wav, capsys):
    """optimizer.bin and the checkpoint's model.safetensors cut short: refused, not a traceback."""
    from stcompress.config import load_config, FinetuneConfig
    from stcompress.stages import finetune

    rows = [{"id": f"u{i}", "audio": make_wav(f"c{i}.wav", seconds=1.0, seed=i).name, "text_de": "Hallo Welt."}
            for i in range(2)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {"mode": "lora", "output": str(tmp_path / "ft"), "data.dataset": str(data), "model.path": str(tiny_model_dir),
            "model.device": "cpu", "train.batch_size": "1", "train.epochs": "2", "train.save_every": "1",
            "dev.dataset": "none"}

    class Killed(Exception):
        pass

    def kill_at_2(state):
        if state.step == 2:
            raise Killed

    with pytest.raises(Killed):
        finetune.run(load_config(FinetuneConfig, None, over), progress=False, on_step=kill_at_2)
    last = tmp_path / "ft.checkpoints" / "last"
    args = ["finetune", *[f"--{k}={v}" for k, v in over.items()], "-q"]
    for name in ("optimizer.bin", "model.safetensors"):
        whole = (last / name).read_bytes()
        (last / name).write_bytes(whole[: len(whole) // 2])
        assert cli.main(args) == 2
        err = _error_line(capsys, "finetune")
        assert str(last) in err and "train.resume: never" in err, err
        (last / name).write_bytes(whole)
    assert not (tmp_path / "ft").exists()


# ---------------------------------------------------------------------------------------------
# SIGTERM, and what killed runs leave behind (item 9)


def _recipe(tmp_path: Path, tiny_model_dir) -> Path:
    path = tmp_path / "recipe.yaml"
    stage = {"model": {"path": str(tiny_model_dir), "device": "cpu"}, "data": {"limit": 2},
             "generation": {"max_new_tokens": 4}}
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                    "stages": [{"name": "tr", "stage": "translate", "config": stage}]}))
    return path


# The stage's files are staged, then the job is stopped the way schedulers and torchrun stop one.
TERMINATED_MID_WRITE = """
import os, signal, sys, time
from stcompress import cli
from stcompress.stages import translate
real = translate.write_translation
def stopped(out, *args, **kwargs):
    real(out, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
translate.write_translation = stopped
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_is_handled_like_ctrl_c(tmp_path, tiny_model_dir):
    recipe = _recipe(tmp_path, tiny_model_dir)
    done = subprocess.run([sys.executable, "-c", TERMINATED_MID_WRITE, "run", str(recipe), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == "stcompress run: terminated (SIGTERM); no output was marked complete"
    run_dir = tmp_path / "run"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["stages"]["tr"]["status"] == "interrupted"
    assert not (run_dir / "tr").exists() and _hidden(tmp_path) == []


def test_a_killed_runs_leftovers_are_cleaned_and_user_files_kept(tmp_path, tiny_model_dir):
    """What SIGKILL leaves (no handler runs): temp files, a staging dir, stale locks. The rerun
    removes each of them and nothing else."""
    recipe = _recipe(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "earlier", "command": ["stcompress"]})
    (run_dir / "plan.json").write_text(json.dumps({"stages": {"tr": {"stage": "translate", "status": "running"}}}))
    (run_dir / ".plan.json.k1ll3d00.tmp").write_text('{"stag')
    (run_dir / ".tr.partial-k1ll3d00").mkdir()
    (run_dir / ".tr.partial-k1ll3d00" / "hypotheses.jsonl").write_text("")
    (run_dir / ".tr.lock").write_text(stale)
    (tmp_path / ".run.lock").write_text(stale)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / ".my-settings").write_text("mine too")
    assert cli.main(["run", str(recipe), "-q"]) == 0
    assert json.loads((run_dir / "plan.json").read_text())["stages"]["tr"]["status"] == "done"
    assert _hidden(tmp_path) == ["run/.my-settings"]
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert read_manifest(run_dir)["files"] == ["plan.json", "tr/hypotheses.jsonl", "tr/manifest.json"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_terminate_signals_raise_where_ctrl_c_would(signum):
    from stcompress.errors import Terminated
    from stcompress.failures import exit_code, terminate_like_interrupt

    before = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt) as caught, terminate_like_interrupt():
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises at once; this only bounds a broken one
    assert isinstance(caught.value, Terminated) and exit_code(caught.value) == 128 + signum
    assert signal.getsignal(signum) is before  # restored


def test_torch_writers_silent_disk_full_is_recognised(tmp_path, monkeypatch):
    """torch.save on a full disk raises only "unexpected pos ..."; a 1 MiB probe beside the output
    tells a full disk from a bug."""
    from stcompress import failures

    def torch_save_failure() -> RuntimeError:
        exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        exc.__context__ = RuntimeError("basic_ios::clear: iostream error")
        exc.stcompress_output = str(tmp_path / "ft")
        return exc

    assert failures.explain(torch_save_failure()) is None  # space left: not a full disk, so a bug
    real_write = os.write

    def full(fd, data):
        if len(data) == 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    with monkeypatch.context() as m:
        m.setattr(failures.os, "write", full)
        line = failures.explain(torch_save_failure())
    assert line == f"{tmp_path / 'ft'}: no space left on device; free space (or choose a path on a larger disk) and rerun; " \
                   "nothing was marked complete"
    assert _hidden(tmp_path) == []  # the probe is gone
