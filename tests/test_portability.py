"""A model saved under one transformers family decodes identically under the other (4.57 <-> 5.x).

scripts/test.sh runs the suite under both venvs and exports STCOMPRESS_OTHER_PYTHON, the other
venv's interpreter, so each direction is tested once. Without the variable the test looks for the
project's two venvs (.venv, .venv-tf4) beside the checkout and the running interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers

import stcompress
from stcompress.config import DataConfig, GenerationConfig, ModelConfig, PruneConfig
from stcompress.data.example import Example
from stcompress.model.load import load_model
from stcompress.model.tiny import tiny_model_cache
from stcompress.stages import prune
from stcompress.translate import Translator

SRC = Path(stcompress.__file__).resolve().parents[1]
MAJOR = transformers.__version__.split(".")[0]
GEN = GenerationConfig(max_new_tokens=10, batch_size=4)

DECODE = """
import json, sys
import numpy as np
from stcompress.config import GenerationConfig, ModelConfig
from stcompress.data.example import Example
from stcompress.model.load import load_model
from stcompress.translate import Translator
job = json.loads(sys.argv[1])
examples = [Example(id=str(i), audio=np.load(p), target_lang="de") for i, p in enumerate(job["audio"])]
out = {}
for d in job["models"]:
    m = load_model(ModelConfig(path=d, device="cpu", dtype="float32"))
    gen = GenerationConfig(max_new_tokens=10, batch_size=4)
    out[d] = [[h.text, h.n_tokens] for h in Translator(m.model, m.processor, generation=gen, progress=False).translate(examples)]
print("RESULT " + json.dumps(out))
"""


def _major(python: str) -> str | None:
    try:
        out = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, timeout=120)
    except OSError:
        return None
    return out.stdout.strip().split(".")[0] if out.returncode == 0 else None


def other_python() -> str:
    """The interpreter of the other transformers family; skips only when no such venv exists."""
    given = os.environ.get("STCOMPRESS_OTHER_PYTHON")
    if given:
        major = _major(given)
        assert major is not None, f"STCOMPRESS_OTHER_PYTHON={given} does not run or has no transformers"
        assert major != MAJOR, f"STCOMPRESS_OTHER_PYTHON={given} runs transformers {major}.x, like this one"
        return given
    roots = {Path(__file__).resolve().parents[1], Path(sys.prefix).resolve().parent}
    for root in sorted(roots):
        for name in (".venv", ".venv-tf4"):
            python = root / name / "bin" / "python"
            if python.is_file() and _major(str(python)) not in (None, MAJOR):
                return str(python)
    pytest.skip(f"no venv with another transformers major than {MAJOR}.x beside {sorted(map(str, roots))} "
                "and STCOMPRESS_OTHER_PYTHON unset (scripts/test.sh sets it)")


def _decode_elsewhere(python: str, models: list[Path], audio: list[Path]) -> dict[str, list[list]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    job = json.dumps({"models": [str(m) for m in models], "audio": [str(a) for a in audio]})
    out = subprocess.run([python, "-c", DECODE, job], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_saved_models_decode_the_same_in_the_other_transformers_family(tmp_path, make_wav, speech_like):
    python = other_python()
    # Non-default rotary bases: the other family must read them (4.57 ignores 5.x's rope_parameters).
    qwen = tiny_model_cache(rope_theta=500000.0)
    gemma = tiny_model_cache(text_model_type="gemma3_text", text_layers=3, sliding_window=8, rope_theta=40000.0,
                             layer_types=("sliding_attention", "full_attention", "full_attention"))
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "audio": make_wav("a.wav", 1.0).name, "text_de": "x"}) + "\n")
    pruned = prune.run(PruneConfig(
        output=str(tmp_path / "pruned"), layers=(1,), check_segments=1, check_max_new_tokens=4,
        model=ModelConfig(path=str(qwen), device="cpu", dtype="float32"),
        data=DataConfig(dataset=str(tmp_path / "m.jsonl"), target_lang="de")), progress=False)

    audio = []
    for i, seconds in enumerate((1.2, 3.5, 2.0)):
        audio.append(tmp_path / f"clip{i}.npy")
        np.save(audio[-1], speech_like(seconds, seed=10 + i))
    examples = [Example(id=str(i), audio=np.load(p), target_lang="de") for i, p in enumerate(audio)]
    models = [qwen, gemma, pruned]
    here = {}
    for directory in models:
        m = load_model(ModelConfig(path=str(directory), device="cpu", dtype="float32"))
        here[str(directory)] = [[h.text, h.n_tokens] for h in Translator(m.model, m.processor, generation=GEN,
                                                                          progress=False).translate(examples)]
    there = _decode_elsewhere(python, models, audio)
    for directory in models:
        assert there[str(directory)] == here[str(directory)], f"{directory.name} decodes differently under {python}"


def test_config_json_keeps_both_rope_spellings(tmp_path):
    config = json.loads((tiny_model_cache(rope_theta=500000.0) / "config.json").read_text())["text_config"]
    assert config["rope_theta"] == 500000.0
    if "rope_parameters" in config:
        assert config["rope_parameters"]["rope_theta"] == 500000.0
