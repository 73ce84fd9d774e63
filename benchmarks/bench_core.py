"""RAG-core benchmark: our losses and decoders against transformers' RAG classes on the same modules.

    python benchmarks/bench_core.py                      # tiny + bart-base sized, writes results/core_<device>.json
    python benchmarks/bench_core.py --sizes tiny --repeats 5

Models are random-init (no downloads): a tiny BART and a bart-base-sized one (d_model 768, 6+6 layers, vocab
50265), wrapped by ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` for the reference timings. Each
case reports the median wall time of at least ``--repeats`` runs after one warm-up (the two implementations
alternate, so both see the same machine load) and whether they produced the same output (losses within 1e-4,
token ids equal). ``speed-up`` is transformers' time over ours. The bart-base case stays small (batch 2, K=5,
24-token contexts, 8-token answers) to finish within a few minutes on two CPU cores; on a shared machine
``--threads 1`` gives steadier numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from rag_lightning.models.decoding import rag_sequence_generate, rag_token_generate
from rag_lightning.models.marginalize import rag_sequence_nll, rag_token_nll, shift_targets

RESULTS = Path(__file__).parent / "results"
BOS, PAD, EOS = 0, 1, 2
SIZES = {
    "tiny": {
        "model": {"vocab_size": 64, "d_model": 32, "layers": 2, "heads": 4, "ffn": 64},
        "batch": 4, "n_docs": 5, "context": 16, "answer": 8, "new_tokens": 8, "beams": 4, "seq_beams": 4,
    },
    "bart-base": {
        "model": {"vocab_size": 50265, "d_model": 768, "layers": 6, "heads": 12, "ffn": 3072},
        "batch": 2, "n_docs": 5, "context": 24, "answer": 8, "new_tokens": 8, "beams": 4, "seq_beams": 2,
    },
}  # fmt: skip
EPS = 0.1


def build(size: dict, device: torch.device) -> tuple[BartForConditionalGeneration, DPRQuestionEncoder]:
    m = size["model"]
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=m["vocab_size"],
        d_model=m["d_model"],
        encoder_layers=m["layers"],
        decoder_layers=m["layers"],
        encoder_attention_heads=m["heads"],
        decoder_attention_heads=m["heads"],
        encoder_ffn_dim=m["ffn"],
        decoder_ffn_dim=m["ffn"],
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=0.3 if m["d_model"] < 100 else 0.02,
        bos_token_id=BOS,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=EOS,
        forced_eos_token_id=EOS,
    )
    generator = BartForConditionalGeneration(config).to(device).eval()
    question_encoder = DPRQuestionEncoder(
        DPRConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).to(device)
    return generator, question_encoder


def inputs(size: dict, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Unpadded contexts (transformers' RAG-Sequence generate ignores the context mask) and padded answers."""
    gen = torch.Generator().manual_seed(0)
    batch, n_docs = size["batch"], size["n_docs"]
    ctx = torch.randint(3, vocab, (batch * n_docs, size["context"]), generator=gen)
    dec_in = torch.randint(3, vocab, (batch, size["answer"]), generator=gen)
    dec_in[:, 0] = EOS
    dec_in[:, -1] = EOS
    dec_in[0, -3] = EOS
    dec_in[0, -2:] = PAD
    return {
        "ctx": ctx.to(device),
        "mask": torch.ones_like(ctx).to(device),
        "scores": torch.randn(batch, n_docs, generator=gen).to(device),
        "dec_in": dec_in.to(device),
    }


def paired_median_ms(
    ours: Callable[[], object], ref: Callable[[], object], repeats: int, device: torch.device
) -> tuple[float, float]:
    """Median times of the two implementations, run alternately so both see the same machine load.

    Fast cases get more repeats (about a second of runs each, at most 50).
    """

    def timed(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000

    first = timed(ours) + timed(ref)  # warm-up
    repeats = max(repeats, min(50, int(2000 / max(first, 1e-3))))
    ours_ms, ref_ms = [], []
    for _ in range(repeats):
        ours_ms.append(timed(ours))
        ref_ms.append(timed(ref))
    return statistics.median(ours_ms), statistics.median(ref_ms)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4))
    return a.shape == b.shape and bool(torch.equal(a, b))


def cases(size: dict, generator, question_encoder, data: dict, device: torch.device):
    """(name, ours, transformers) triples; each callable returns the output compared for equality."""
    n_docs, new_tokens = size["n_docs"], size["new_tokens"]
    ctx, mask, scores, dec_in = data["ctx"], data["mask"], data["scores"], data["dec_in"]
    labels = shift_targets(dec_in, PAD)

    def rag(cls, eps=EPS):
        config = RagConfig.from_question_encoder_generator_configs(
            question_encoder.config, generator.config, n_docs=n_docs, label_smoothing=eps
        )
        return cls(config=config, question_encoder=question_encoder, generator=generator).eval()

    rag_seq, rag_tok = rag(RagSequenceForGeneration), rag(RagTokenForGeneration)
    with torch.no_grad():
        logits = generator(
            input_ids=ctx, attention_mask=mask, decoder_input_ids=dec_in.repeat_interleave(n_docs, 0)
        ).logits

    def loss_only(ours_fn, ref_model, eps):
        def ours():
            leaf, s = logits.detach().requires_grad_(), scores.clone().requires_grad_()
            loss = ours_fn(leaf, s, labels, pad_token_id=PAD, label_smoothing=eps)
            loss.sum().backward()
            return loss.detach()

        def ref():
            leaf, s = logits.detach().requires_grad_(), scores.clone().requires_grad_()
            loss = ref_model.get_nll(leaf, s, dec_in, epsilon=eps, n_docs=n_docs)
            loss.sum().backward()
            return loss.detach()

        return ours, ref

    def full(ours_fn, ref_model):
        def ours():
            generator.zero_grad(set_to_none=True)
            s = scores.clone().requires_grad_()
            out = generator(
                input_ids=ctx, attention_mask=mask, decoder_input_ids=dec_in.repeat_interleave(n_docs, 0)
            )
            loss = ours_fn(out.logits, s, labels, pad_token_id=PAD, label_smoothing=EPS)
            loss.sum().backward()
            return loss.detach()

        def ref():
            generator.zero_grad(set_to_none=True)
            s = scores.clone().requires_grad_()
            loss = ref_model(
                context_input_ids=ctx, context_attention_mask=mask, doc_scores=s, labels=dec_in, n_docs=n_docs
            ).loss
            loss.sum().backward()
            return loss.detach()

        return ours, ref

    def token_decode(beams):
        def ours():
            return rag_token_generate(
                generator, ctx, mask, scores, n_docs=n_docs, num_beams=beams, max_new_tokens=new_tokens
            )

        def ref():
            return rag_tok.generate(
                context_input_ids=ctx,
                context_attention_mask=mask,
                doc_scores=scores,
                n_docs=n_docs,
                num_beams=beams,
                max_length=new_tokens + 1,
            )

        return ours, ref

    def sequence_decode(mode):
        beams = size["seq_beams"]

        def ours():
            return rag_sequence_generate(
                generator,
                ctx,
                mask,
                scores,
                n_docs=n_docs,
                num_beams=beams,
                max_new_tokens=new_tokens,
                mode=mode,
            )

        def ref():
            return rag_seq.generate(
                context_input_ids=ctx,
                context_attention_mask=mask,
                doc_scores=scores,
                n_docs=n_docs,
                num_beams=beams,
                max_length=new_tokens + 1,
            )

        return ours, ref

    yield "rag_sequence_nll, logits given, fwd+bwd", *loss_only(rag_sequence_nll, rag_seq, 0.0)
    yield f"rag_sequence_nll eps={EPS}, logits given, fwd+bwd", *loss_only(rag_sequence_nll, rag_seq, EPS)
    yield "rag_token_nll, logits given, fwd+bwd", *loss_only(rag_token_nll, rag_tok, 0.0)
    yield f"rag_token_nll eps={EPS}, logits given, fwd+bwd", *loss_only(rag_token_nll, rag_tok, EPS)
    yield f"RAG-Sequence loss eps={EPS}, generator fwd+bwd", *full(rag_sequence_nll, rag_seq)
    yield f"RAG-Token loss eps={EPS}, generator fwd+bwd", *full(rag_token_nll, rag_tok)
    yield "RAG-Token greedy", *token_decode(1)
    yield f"RAG-Token beam {size['beams']}", *token_decode(size["beams"])
    yield f"RAG-Sequence thorough, beam {size['seq_beams']}", *sequence_decode("thorough")
    yield (
        f"RAG-Sequence fast (ours) vs thorough (transformers), beam {size['seq_beams']}",
        *sequence_decode("fast"),
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 for tiny, 2 for bart-base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    header = (
        f"| {'size':<9} | {'case':<66} | {'ours ms':>9} | {'transformers ms':>15} | {'speed-up':>8} | same |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for size_name in args.sizes:
        size = SIZES[size_name]
        repeats = args.repeats or (5 if size_name == "tiny" else 2)
        generator, question_encoder = build(size, device)
        data = inputs(size, size["model"]["vocab_size"], device)
        for name, ours, ref in cases(size, generator, question_encoder, data, device):
            ours_ms, ref_ms = paired_median_ms(ours, ref, repeats, device)
            equal = same(ours(), ref()) if "fast" not in name else None
            row = {
                "size": size_name,
                "case": name,
                "ours_ms": round(ours_ms, 2),
                "transformers_ms": round(ref_ms, 2),
                "speedup": round(ref_ms / ours_ms, 2),
                "same_output": equal,
            }
            rows.append(row)
            mark = {True: "yes", False: "NO", None: "n/a"}[equal]
            print(
                f"| {size_name:<9} | {name:<66} | {ours_ms:>9.1f} | {ref_ms:>15.1f} | {ref_ms / ours_ms:>7.2f}x | {mark:<4} |",
                flush=True,
            )
        del generator, question_encoder

    out = args.out or RESULTS / f"core_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python benchmarks/bench_core.py --sizes "
        + " ".join(args.sizes)
        + (f" --threads {args.threads}" if args.threads else ""),
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
