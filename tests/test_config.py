import pytest
from omegaconf import OmegaConf

from rag_lightning.config import (
    ConfigError,
    ContextConfig,
    IndexConfig,
    LoaderConfig,
    Mode,
    ModelConfig,
    check_corpus_size,
    section,
)


def _model(**model):
    base = {
        "mode": "rag_token",
        "n_docs": 5,
        "optim": {"lr": 1e-3},
        "decoding": {"num_beams": 1},
        "question_encoder": {"kind": "tiny"},
        "generator": {"kind": "random", "tokenizer": "${data.tok}"},
    }
    base.update(model)
    return OmegaConf.create({"data": {"tok": "x"}, "model": base}).model


def test_valid_config_is_typed():
    model = section(ModelConfig, _model(), "model")
    assert model.mode == Mode.rag_token
    assert model.generator.tokenizer == "x"  # interpolations resolved
    assert model.question_encoder.tiny.hidden_size == 32  # the dataclass default fills what is not set


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"n_docs": 0}, "model.n_docs"),
        ({"mode": "rag_tokn"}, "model.mode"),
        ({"n_doc": 3}, "model.n_doc"),
        ({"label_smoothing": 1.5}, "model.label_smoothing"),
        ({"optim": {"scheduler": "exp"}}, "model.optim.scheduler"),
        ({"optim": {"lr": "fast"}}, "model.optim.lr"),
        ({"decoding": {"num_beams": 0}}, "model.decoding.num_beams"),
        ({"gold_passage_steps": -1}, "model.gold_passage_steps"),
        ({"question_word_dropout": 1.0}, "model.question_word_dropout"),
        ({"question_word_dropout": -0.1}, "model.question_word_dropout"),
        ({"answer_swap_donors": "type"}, "model.answer_swap_donors"),
        ({"question_encoder": {"kind": "bert"}}, "model.question_encoder.kind"),
        ({"generator": {"kind": "random", "tokenizer": "x", "question_match": True}}, "model.generator.question_match"),
        ({"generator": {"kind": "pretrained"}}, "model.generator.name_or_path"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section(ModelConfig, _model(**override), "model")


def test_unset_value_names_the_key_and_the_fix():
    node = OmegaConf.create({"type": "flat", "store_dir": "???", "vectors_dir": "v", "dir": "d"})
    with pytest.raises(ConfigError, match=r"index\.store_dir is not set\. Fix: pass index\.store_dir="):
        section(IndexConfig, node, "index")


def test_n_docs_larger_than_corpus():
    model = section(ModelConfig, _model(), "model")
    with pytest.raises(ConfigError, match=r"model\.n_docs=5 is larger than the corpus \(3 passages\)"):
        check_corpus_size(model, 3)
    check_corpus_size(model, 5)


def test_global_batch_must_be_positive():
    with pytest.raises(ConfigError, match=r"loader\.global_batch_size"):
        section(LoaderConfig, {"global_batch_size": 0}, "loader")


@pytest.mark.parametrize(("node", "key"), [({"max_length": 1}, "context.max_length"), ({"layout": "foo"}, "context.layout")])
def test_context_checks_name_the_key(node, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section(ContextConfig, node, "context")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"bank": {"layers": 0}}, "dpr.bank.layers"),
        ({"bank": {"refresh_steps": 0}}, "dpr.bank.refresh_steps"),
        ({"bank": {"fresh_negatives": -1}}, "dpr.bank.fresh_negatives"),
        ({"bank": {"context_lr": 0.0}}, "dpr.bank.context_lr"),
        ({"bank": {"refresh": 5}}, "dpr.bank.refresh"),
    ],
)
def test_bad_bank_values_name_the_key(override, key):
    from rag_lightning.config import RetrieverTrainingConfig

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        section(RetrieverTrainingConfig, {"corpus_negatives": True, **override}, "dpr")
