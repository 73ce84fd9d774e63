"""Top-layer training of the question encoder: the split reproduces the encoder, only the top layers learn."""

from __future__ import annotations

import pytest
import torch

from rag_lightning.config import QuestionEncoderConfig, section
from rag_lightning.models.encoder_split import encode_bottom, encode_top, freeze_bottom, n_layers
from rag_lightning.models.encoders import (
    build_context_encoder,
    build_question_encoder,
    load_encoder_tokenizer,
)

TINY = section(QuestionEncoderConfig, {"kind": "tiny", "tiny": {"hidden_size": 32, "layers": 3, "heads": 2}}, "encoder")


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tok = load_encoder_tokenizer(TINY)
    return tok(["who wrote hamlet?", "what is the capital city of the country of france?"],
               padding=True, return_tensors="pt")


@pytest.mark.parametrize("build", [build_question_encoder, build_context_encoder])
@pytest.mark.parametrize("n_top", [1, 2, 3])
@pytest.mark.parametrize("cls_only", [False, True])
def test_bottom_then_top_equals_the_encoder(build, n_top: int, cls_only: bool, batch) -> None:
    encoder = build(TINY).eval()
    with torch.no_grad():
        reference = encoder(**batch).pooler_output
        states = encode_bottom(encoder, batch["input_ids"], batch["attention_mask"], n_top)
        vectors = encode_top(encoder, states, batch["attention_mask"], n_top, cls_only=cls_only)
    assert torch.allclose(vectors, reference, atol=1e-6)


def test_bottom_runs_without_dropout_and_keeps_the_mode(batch) -> None:
    encoder = build_question_encoder(TINY).train()
    a = encode_bottom(encoder, batch["input_ids"], batch["attention_mask"], 1)
    b = encode_bottom(encoder, batch["input_ids"], batch["attention_mask"], 1)
    assert torch.equal(a, b) and not a.requires_grad
    assert encoder.training


@pytest.mark.parametrize("cls_only", [False, True])
def test_only_the_top_layers_get_gradients(batch, cls_only: bool) -> None:
    encoder = build_question_encoder(TINY).train()
    freeze_bottom(encoder, 1)
    states = encode_bottom(encoder, batch["input_ids"], batch["attention_mask"], 1)
    vectors = encode_top(encoder, states, batch["attention_mask"], 1, cls_only=cls_only)
    # a random projection, not .sum(): the sum of a LayerNorm's output with uniform weights has zero gradient
    (vectors * torch.randn(vectors.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    with_grad = {name.split(".")[4] if ".layer." in name else name.split(".")[2]
                 for name, p in encoder.named_parameters() if p.grad is not None}
    assert with_grad == {"2"}  # layer 2 of 0..2; no embeddings, no lower layer
    top = encoder.question_encoder.bert_model.encoder.layer[2]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in top.parameters())  # [CLS] uses every weight
    assert not any(p.requires_grad for p in encoder.question_encoder.bert_model.embeddings.parameters())


def test_depth_and_range() -> None:
    encoder = build_question_encoder(TINY)
    assert n_layers(encoder) == 3
    with pytest.raises(ValueError, match=r"trainable_layers=4 must be in \[1, 3\]"):
        freeze_bottom(encoder, 4)
    with pytest.raises(TypeError, match="not a DPR encoder"):
        n_layers(torch.nn.Linear(2, 2))


def test_question_encoder_benchmark_runs_and_saves(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_question_encoder.py"
    out = tmp_path / "qe.json"
    subprocess.run([sys.executable, str(script), "--batch", "2", "--repeats", "1", "--threads", "1", "--out", str(out)],
                   check=True, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    assert [r["case"] for r in rows][:2] == ["forward only (no grad)", "all weights"]
    assert all(r["ms"] > 0 for r in rows)
    trainable = {r["case"]: r["trainable_params"] for r in rows}
    assert trainable["all weights"] > trainable["embeddings frozen"] > trainable["top 2 layers (bottom cached)"]
