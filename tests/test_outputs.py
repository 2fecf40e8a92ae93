"""The output-directory contract: what an --output may be, checked before any work; the lock;
what users publish (file modes, no local paths); what the logs show.

Every refusal must come before the model or the data loads: the stage's loaders are replaced by
ones that fail the test if they are reached.
"""

from __future__ import annotations

import json
import re
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROGRESS_LINE = re.compile(r"^\S.* \d+/\d+ .*ETA ")  # stcompress.progress's status line in a log

from stcompress import cli, lock
from stcompress.artifacts import MANIFEST, read_manifest, staged_output
from stcompress.errors import StcompressError
from stcompress.outputs import STAGES, claim, foreign_entries

FAST = ["--data.limit", "2", "--generation.max-new-tokens", "4", "--model.device", "cpu", "-q"]


def _translate(tiny_model_dir, output, *extra) -> list[str]:
    return ["translate", "--model.path", str(tiny_model_dir), *FAST, "--output", str(output), *extra]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the translate stage starts loading its data or its model."""

    def reached(*args, **kwargs):
        raise AssertionError("the stage loaded data or a model before refusing its output")

    from stcompress.stages import translate

    monkeypatch.setattr(translate, "load_examples", reached)
    monkeypatch.setattr(translate, "load_model", reached)


def _one_error_line(capsys) -> str:
    full = capsys.readouterr().err.strip()
    assert "Traceback" not in full, full
    # -q keeps one progress line per stage (issue 13 item 15); everything else is the one error line
    lines = [line for line in full.splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, full
    err = lines[0]
    assert err.startswith("stcompress translate: error: output: "), full
    return err


def _hidden_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def test_cli_knows_every_stage_the_contract_knows():
    assert set(STAGES) == set(cli.COMMANDS)


# ---------------------------------------------------------------------------------------------
# What an output may be (issue 9 items 1-3)


def test_a_directory_of_user_files_is_refused_and_kept(tmp_path, tiny_model_dir, no_work, capsys):
    userdir = tmp_path / "userdir"
    userdir.mkdir()
    (userdir / "precious.txt").write_text("x")
    assert cli.main(_translate(tiny_model_dir, userdir)) == 2
    err = _one_error_line(capsys)
    assert "precious.txt" in err and "--overwrite" in err
    assert (userdir / "precious.txt").read_text() == "x" and sorted(os.listdir(userdir)) == ["precious.txt"]


def test_the_data_folder_is_refused(tmp_path, tiny_model_dir, make_wav, no_work, capsys, monkeypatch):
    data = tmp_path / "mydata"
    wav = make_wav("mydata/a.wav")
    (data / "manifest.jsonl").write_text(json.dumps({"id": "a", "audio": wav.name, "text_de": "Hallo"}) + "\n")
    before = sorted(os.listdir(data))
    argv = _translate(tiny_model_dir, data, "--data.dataset", str(data / "manifest.jsonl"))
    assert cli.main(argv) == 2
    assert "holds the input data.dataset" in _one_error_line(capsys)
    assert cli.main([*argv, "--overwrite"]) == 2  # never, not even with --overwrite
    assert "holds the input data.dataset" in _one_error_line(capsys)
    assert sorted(os.listdir(data)) == before


@pytest.mark.parametrize("given", [".", "..", "CWD", "FILE", "FILE/sub"])
def test_dot_parents_and_files_are_clean_errors(tmp_path, tiny_model_dir, no_work, capsys, monkeypatch, given):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    output = {"CWD": str(work), "FILE": "notes.txt", "FILE/sub": "notes.txt/sub"}.get(given, given)
    assert cli.main(_translate(tiny_model_dir, output)) == 2
    err = _one_error_line(capsys)
    assert ("current directory" in err) if given in (".", "..", "CWD") else ("is a file" in err), err
    assert _hidden_leftovers(tmp_path) == [] and (work / "notes.txt").read_text() == "mine"


def _make_unwritable(directory: Path) -> None:
    """Read-only for this user: chmod, or for root (whom modes do not stop) the immutable flag."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return
    subprocess.run(["chattr", "+i", str(directory)], check=True)


def _make_writable(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], check=False)
    directory.chmod(0o755)


def test_an_unwritable_parent_is_refused_before_loading(tmp_path, tiny_model_dir, no_work, capsys):
    parent = tmp_path / "readonly"
    parent.mkdir()
    _make_unwritable(parent)
    try:
        assert cli.main(_translate(tiny_model_dir, parent / "out")) == 2
    finally:
        _make_writable(parent)
    err = _one_error_line(capsys)
    assert f"cannot write in {parent}" in err and ("permission denied" in err or "not permitted" in err), err
    assert os.listdir(parent) == []


def test_our_finished_output_is_replaced_but_never_a_user_file_in_it(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    assert cli.main(_translate(tiny_model_dir, out)) == 0
    assert read_manifest(out)["files"] == ["hypotheses.jsonl"]  # what a later run may replace
    first = (out / MANIFEST).read_bytes()
    assert cli.main(_translate(tiny_model_dir, out)) == 0  # ours: replaced
    assert (out / MANIFEST).read_bytes() != first
    (out / "notes.txt").write_text("my notes")
    assert cli.main(_translate(tiny_model_dir, out)) == 2
    assert "notes.txt" in _one_error_line(capsys)
    assert (out / "notes.txt").read_text() == "my notes"
    assert _hidden_leftovers(tmp_path) == []


def test_overwrite_moves_a_foreign_directory_aside(tmp_path, tiny_model_dir, capsys):
    userdir = tmp_path / "userdir"
    userdir.mkdir()
    (userdir / "precious.txt").write_text("x")
    assert cli.main(_translate(tiny_model_dir, userdir, "--overwrite")) == 0
    assert read_manifest(userdir)["stage"] == "translate"
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("userdir.replaced-")]
    assert len(aside) == 1 and (aside[0] / "precious.txt").read_text() == "x"


def test_foreign_entries_counts_our_temp_and_listed_files_only(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "search.json").write_text("{}")
    (d / ".search.json.x.tmp").write_text("{")  # a kill inside an atomic write
    (d / ".heatmap.png.tmp.png").write_bytes(b"")
    (d / "hypotheses").mkdir()
    (d / "hypotheses" / "baseline.jsonl").write_text("")
    own = ("search.json", "heatmap.png", "hypotheses")
    assert foreign_entries(d, own) == []
    (d / "mine.txt").write_text("x")
    assert foreign_entries(d, own) == ["mine.txt"]
    # a finished output: its manifest lists what it wrote
    f = tmp_path / "finished"
    (f / "model").mkdir(parents=True)
    (f / "model" / "config.json").write_text("{}")
    (f / MANIFEST).write_text(json.dumps({"stage": "prune", "files": ["model/config.json"]}))
    assert foreign_entries(f) == []
    (f / "model" / "extra.bin").write_text("user")
    assert foreign_entries(f) == ["model"]
    (f / MANIFEST).write_text(json.dumps({"stage": "not-ours", "files": []}))
    assert foreign_entries(f) == ["manifest.json", "model"]


# ---------------------------------------------------------------------------------------------
# The lock (item 7)


def _lock_file(output: Path, **record) -> Path:
    path = lock.lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "earlier", "command": ["stcompress", "x"],
                                **record}))
    return path


HOLD = "import sys, time; from stcompress.outputs import claim; held = claim(sys.argv[1]); held.__enter__(); print('held', flush=True); time.sleep(600)"


def test_a_second_process_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, tiny_model_dir, capsys, caplog,
                                                                              monkeypatch):
    from stcompress.stages import translate

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with monkeypatch.context() as m:
            m.setattr(translate, "load_model", lambda *a, **k: pytest.fail("loaded a model while the output is locked"))
            assert cli.main(_translate(tiny_model_dir, out)) == 2
        err = _one_error_line(capsys)
        assert f"pid {holder.pid} on {socket.gethostname()}" in err and "being written by another" in err
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays
        holder.wait()
    assert lock.lock_path(out).is_file()
    with caplog.at_level(logging.WARNING):
        assert cli.main(_translate(tiny_model_dir, out)) == 0
    assert "taking over the stale lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert read_manifest(out)["stage"] == "translate" and _hidden_leftovers(tmp_path) == []


def test_a_reused_pid_and_a_foreign_hosts_lock(tmp_path):
    out = tmp_path / "out"
    _lock_file(out, pid=os.getpid(), pid_start="1")  # our pid, but another process's start time: stale
    with claim(out):
        assert json.loads(lock.lock_path(out).read_text())["pid_start"] == lock._start_time(os.getpid())
    assert not lock.lock_path(out).exists()  # released
    _lock_file(out, pid=os.getpid(), host="another-machine")
    with pytest.raises(StcompressError, match=r"another-machine.*delete .*\.out\.lock"):
        with claim(out):
            pass


def test_ranks_of_one_launch_share_the_lock_and_other_launches_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    with claim(out):  # rank 0 takes it for the launch
        record = json.loads(lock.lock_path(out).read_text())
        assert record["launch"] == "-@127.0.0.1:29500" and record["ready"] is True
        monkeypatch.setenv("RANK", "1")
        lock._HELD.clear()  # rank 1 is another process: it does not share rank 0's memory
        with claim(out):  # rank 1 of the same launch goes ahead
            pass
        assert lock.lock_path(out).is_file()  # and does not release rank 0's lock
        monkeypatch.setenv("MASTER_PORT", "29501")  # rank 1 of another launch
        with pytest.raises(StcompressError, match="being written by another"):
            with claim(out):
                pass
        lock._HELD[lock.lock_path(out)] = 1
        monkeypatch.setenv("RANK", "0")


# ---------------------------------------------------------------------------------------------
# What users publish, what logs show (item 12)


def test_export_is_readable_by_the_team_and_names_no_local_paths(tmp_path, tiny_model_dir):
    from stcompress.config import DataConfig, ExportConfig
    from stcompress.stages import export

    old = os.umask(0o022)
    try:
        cfg = ExportConfig(output=str(tmp_path / "export"), input=str(tiny_model_dir), dtype="float32", device="cpu",
                           check_segments=1, check_max_new_tokens=4, data=DataConfig(limit=1))
        out = export.run(cfg, progress=False)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    local = [str(tiny_model_dir), str(Path(tiny_model_dir).parent), str(tmp_path), os.path.expanduser("~")]
    for f in out.iterdir():
        if f.suffix in (".md", ".json", ".jinja") and f.name not in (MANIFEST, "tokenizer.json", "vocab.json"):  # not vocabularies
            text = f.read_text(encoding="utf-8")
            assert not [p for p in local if p in text], f"{f.name} names a local path"
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"<local>/{Path(tiny_model_dir).name}" in card
    assert read_manifest(out)["base_model"] == str(Path(tiny_model_dir).resolve())  # the manifest keeps it


def test_staged_outputs_are_shared_like_any_file(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "out") as d:
            fd = os.open(d / "weights.bin", os.O_WRONLY | os.O_CREAT, 0o600)  # as transformers 5 writes weights
            os.close(fd)
            (d / "sub").mkdir(mode=0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "weights.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o755


def test_config_and_argv_are_logged_at_debug_only(tmp_path, tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="stcompress"):
        assert cli.main(_translate(tiny_model_dir, tmp_path / "a")) == 0
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in info if m.startswith(("argv:", "translate config:"))], info
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="stcompress"):
        assert cli.main([*_translate(tiny_model_dir, tmp_path / "b"), "-v"]) == 0
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(m.startswith("translate config:") for m in debug) and any(m.startswith("argv:") for m in debug)


def test_card_paths_are_redacted_hub_ids_kept():
    from stcompress.model.card import public

    assert public("/home/alice/models/qwen-pruned") == "<local>/qwen-pruned"
    assert public("~/runs/x/finetune/") == "<local>/finetune"
    assert public("../data/train.jsonl") == "<local>/train.jsonl"
    assert public("Qwen/Qwen2-Audio-7B-Instruct") == "Qwen/Qwen2-Audio-7B-Instruct"
    assert public("ymoslem/ACL-6060") == "ymoslem/ACL-6060" and public("builtin:tiny-random") == "builtin:tiny-random"


def test_lock_is_released_after_a_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with claim(out):
            1 / 0
    assert not lock.lock_path(out).exists()
    with claim(out):  # and the next writer gets it at once
        pass


@pytest.mark.parametrize("command", ["translate", "evaluate", "importance", "prune", "distill", "finetune", "export",
                                     "report"])
def test_every_stage_refuses_a_foreign_output_before_any_work(tmp_path, tiny_model_dir, command, capsys, monkeypatch):
    """One mechanism for every stage: the check runs first, whatever else the command lacks."""
    import importlib

    stage = importlib.import_module(f"stcompress.stages.{command}")
    for name in ("load_model", "load_examples"):
        if hasattr(stage, name):
            monkeypatch.setattr(stage, name, lambda *a, **k: pytest.fail("the stage started working"))
    userdir = tmp_path / "userdir"
    userdir.mkdir()
    (userdir / "precious.txt").write_text("x")
    model = ["--model.path", "builtin:tiny-random"]  # every other option valid: the output is the one problem
    extra = {"report": ["--run-dir", str(tmp_path)], "export": ["--input", str(tiny_model_dir)],
             "prune": [*model, "--layers", "1"]}.get(command, model)
    assert cli.main([command, "--output", str(userdir), *extra, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"stcompress {command}: error: output: {userdir} holds files stcompress did not write (precious.txt); "
                   "choose another output, or pass --overwrite to move that directory aside "
                   "(to userdir.replaced-<time>; nothing is deleted)"), err
    assert os.listdir(userdir) == ["precious.txt"]


def test_a_killed_nf4_exports_full_precision_copy_is_inside_its_staging_dir(tmp_path, tiny_model_dir, monkeypatch):
    """SIGKILL runs no clean-up (simulated: rmtree does nothing, as after a kill); what stays is
    inside the staging directory, which the next command on that output removes."""
    import shutil

    from stcompress.config import DataConfig, ExportConfig
    from stcompress.model import load
    from stcompress.stages import export

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    cfg = ExportConfig(output=str(tmp_path / "export"), input=str(tiny_model_dir), dtype="float32", device="cpu",
                       quantize="nf4", check_segments=1, check_max_new_tokens=4, data=DataConfig(limit=1))
    with monkeypatch.context() as m:
        m.setattr(export, "load_model", lambda mc, **k: killed() if mc.load_in_4bit or k.get("quantization") is not None
                  else load.load_model(mc, **k))  # the quantized load
        m.setattr(shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(Killed):
            export.run(cfg, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export-full-precision-")] == []
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".export.partial-")]
    assert len(staging) == 1 and list(staging[0].glob(".full-precision-*/model.safetensors"))
    with claim(tmp_path / "export"):  # the next command on that output
        pass
    assert _hidden_leftovers(tmp_path) == []


def test_evaluate_without_a_reference_column_fails_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Issue 9 item 3: a manifest without text_zh is refused before anything is translated."""
    from stcompress.data.sources import builtin_manifest_path
    from stcompress.stages import translate

    def reached(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing reference column was noticed")

    monkeypatch.setattr(translate, "load_model", reached)
    manifest = builtin_manifest_path("builtin")
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    local = tmp_path / "data.jsonl"  # the built-in rows without any text_zh, audio paths made absolute
    local.write_text("".join(json.dumps({**{k: v for k, v in r.items() if k != "text_zh"},
                                         "audio": str(manifest.parent / r["audio"])}) + "\n" for r in rows[:2]))
    code = cli.main(["evaluate", "--model.path", str(tiny_model_dir), "--data.dataset", str(local),
                     "--data.target-lang", "zh", "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "text_zh" in err and "data.reference_column" in err, err
    assert not (tmp_path / "eval").exists()
