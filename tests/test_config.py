import pytest
from omegaconf import OmegaConf

from rag_lightning.config import ConfigError, Mode, model_config, validate


def _cfg(**model):
    base = {
        "mode": "rag_token",
        "n_docs": 5,
        "optim": {"lr": 1e-3},
        "decoding": {"num_beams": 1},
        "question_encoder": {"kind": "tiny"},
        "generator": {"kind": "random", "tokenizer": "${data.tok}"},
    }
    base.update(model)
    return OmegaConf.create(
        {"data": {"tok": "x"}, "model": base, "trainer": {}, "loader": {"global_batch_size": 4}}
    )


def test_valid_config_is_typed():
    model = validate(_cfg())
    assert model.mode == Mode.rag_token
    assert model.generator["tokenizer"] == "x"  # interpolations resolved


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
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        model_config(_cfg(**override))


def test_n_docs_larger_than_corpus():
    with pytest.raises(ConfigError, match=r"model\.n_docs=5 is larger than the corpus \(3 passages\)"):
        validate(_cfg(), corpus_size=3)


def test_global_batch_must_be_positive():
    cfg = _cfg()
    cfg.loader.global_batch_size = 0
    with pytest.raises(ConfigError, match=r"loader\.global_batch_size"):
        validate(cfg)
