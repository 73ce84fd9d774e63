"""Exports that work on their own: each model with its tokenizer, and a short model card (README.md).

`rag-train` calls :func:`export_run` after the test: `checkpoints/hf/question_encoder` (DPRQuestionEncoder + the
encoder's tokenizer), `checkpoints/hf/generator` (BART, or BART with the copy head, + its tokenizer) and
`checkpoints/hf/README.md`: what the models were trained on, the run's metrics, and how to load them with
plain transformers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_lightning.config import ConfigError, DataConfig, ModelConfig, QuestionEncoderConfig
from rag_lightning.files import write_text_atomic


@dataclass(frozen=True)
class PlainRetrieval:
    """Where the run's passages are and how its contexts are cut: what the card's plain-FAISS code needs."""

    store_dir: str
    index_dir: str
    index_type: str  # flat | hnsw | ivfpq
    title_separator: str
    context_max_length: int
    layout: str  # question_first | passage_first


def check_rag_export(model: ModelConfig) -> None:
    """`export_rag=true` needs what transformers' RAG classes hold: retrieval, and a plain BART generator."""
    if not model.retrieves:
        raise ConfigError("export_rag=true: a closed-book model has no transformers RAG form; drop export_rag")
    if model.generator.copy:
        raise ConfigError(
            "export_rag=true: transformers' RAG would load the copy head's generator as plain BART and drop the "
            "head; pass model.generator.copy=false, or drop export_rag (checkpoints/hf/ holds both models)"
        )


def export_question_tokenizer(encoder: QuestionEncoderConfig, max_question_length: int) -> Any:
    """The question encoder's tokenizer as training used it: truncation at `max_question_length` becomes its
    `model_max_length`, so `tokenizer(questions, truncation=True)` gives the framework's ids."""
    from rag_lightning.models.encoders import load_encoder_tokenizer

    tokenizer = load_encoder_tokenizer(encoder, "question")
    tokenizer.model_max_length = max_question_length
    return tokenizer


def export_run(
    module: Any,
    directory: Path,
    *,
    data: DataConfig,
    model: ModelConfig,
    max_question_length: int,
    metrics: dict[str, float],
    overrides: list[str],
    run_dir: Path,
    steps: int,
    checkpoint: str | None = None,
    index_command: str | None = None,
    rag: bool = False,
    retrieval: PlainRetrieval | None = None,
) -> Path:
    """Save both models with their tokenizers and write the model card; with ``rag``, also a transformers RAG
    checkpoint in `rag/`. Returns the export directory."""
    question_tokenizer = export_question_tokenizer(model.question_encoder, max_question_length)
    directory = module.export_pretrained(directory, question_tokenizer=question_tokenizer)
    if rag:
        from rag_lightning.models.rag_checkpoint import save_rag

        save_rag(
            module.question_encoder,
            module.generator,
            question_tokenizer,
            module.tokenizer,
            directory / "rag",
            mode=model.mode.value if hasattr(model.mode, "value") else str(model.mode),
            n_docs=model.eval_docs,
            label_smoothing=model.label_smoothing,
            exclude_bos_score=model.exclude_bos_score,
        )
    card = model_card(
        data=data,
        model=model,
        generator_class=type(module.generator).__name__,
        metrics=metrics,
        overrides=overrides,
        run_dir=run_dir,
        steps=steps,
        max_question_length=max_question_length,
        checkpoint=checkpoint,
        index_command=index_command,
        rag=rag,
        retrieval=retrieval,
    )
    write_text_atomic(directory / "README.md", card)
    return directory


def _metrics_table(metrics: dict[str, float]) -> list[str]:
    splits = list(dict.fromkeys(k.split("/", 1)[0] for k in metrics if "/" in k and not k.startswith("time/")))
    names = ["em", "f1", *sorted({k.split("/", 1)[1] for k in metrics if "/recall@" in k}), "mrr", "loss"]
    names = [n for n in names if any(f"{s}/{n}" in metrics for s in splits)]
    if not names:
        return ["(no metrics: the run was not tested)"]
    lines = ["| split | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for s in splits:
        lines.append(f"| {s} | " + " | ".join(f"{metrics[f'{s}/{n}']:.4f}" if f"{s}/{n}" in metrics else "–"
                                             for n in names) + " |")
    return lines


def model_card(
    *,
    data: DataConfig,
    model: ModelConfig,
    generator_class: str,
    metrics: dict[str, float],
    overrides: list[str],
    run_dir: Path,
    steps: int,
    max_question_length: int,
    checkpoint: str | None = None,
    index_command: str | None = None,
    rag: bool = False,
    retrieval: PlainRetrieval | None = None,
) -> str:
    mode = model.mode.value if hasattr(model.mode, "value") else str(model.mode)
    copy = generator_class != "BartForConditionalGeneration"
    encoder = model.question_encoder
    command = " ".join(["rag-train", *overrides])
    files = [("train", data.train_file), *((f"train ({name})", path) for name, path in data.extra_train_files.items()),
             ("validation", data.val_file), ("test", data.test_file),
             *data.extra_test_files.items(), ("corpus (retrieved passages)", data.corpus_file)]
    if copy:
        generator_load = (
            "from rag_lightning.models.copy_generator import CopyBartForConditionalGeneration\n"
            'generator = CopyBartForConditionalGeneration.from_pretrained("generator")  # with the copy head\n'
            '# plain transformers loads the BART weights without the head (the answers then differ):\n'
            '# BartForConditionalGeneration.from_pretrained("generator")'
        )
    else:
        generator_load = 'generator = BartForConditionalGeneration.from_pretrained("generator")'
    lines = [
        f"# {mode.replace('_', '-')} model trained with rag_lightning",
        "",
        f"Exported by `rag-train` on {dt.date.today().isoformat()} from the run `{run_dir}` after {steps} training "
        "steps. "
        + (f"Retrieval-Augmented Generation (Lewis et al., 2020), `{mode}`: the question encoder scores the passages "
           f"of a corpus, the generator reads the question with each of the top {model.eval_docs} passages and the "
           "answers are marginalised over them." if model.retrieves else
           "Closed book: the generator answers from the question alone (the question encoder is exported untrained)."),
        "",
        f"Command: `{command}`",
        "",
        "| directory | what | class |",
        "|---|---|---|",
        f"| `question_encoder/` | DPR question encoder ({encoder.kind}) and its tokenizer | `DPRQuestionEncoder`, "
        "`AutoTokenizer` |",
        f"| `generator/` | the BART generator and its tokenizer | `{generator_class}`"
        + (" (`rag_lightning.models.copy_generator`: BART with a pointer-generator copy head)" if copy else "")
        + ", `AutoTokenizer` |",
        *([f"| `rag/` | the same models as a transformers RAG checkpoint, with `RagTokenizer` | "
           f"`{'RagTokenForGeneration' if mode == 'rag_token' else 'RagSequenceForGeneration'}` |"] if rag else []),
        "",
        "## Trained on",
        "",
        f"Data set `{data.name}`:",
        "",
        *[f"- {what}: `{path}`" for what, path in files if path],
        "",
        "## Metrics",
        "",
        "From the run's `metrics.json` (EM/F1 SQuAD-style; recall@k: a gold passage among the top k):",
        "",
        *_metrics_table(metrics),
        "",
        "## How to load",
        "",
        "Question vectors with plain transformers (the vector is DPR's `pooler_output`; the tokenizer truncates "
        f"at {max_question_length} tokens, as training did):",
        "",
        "```python",
        "from transformers import AutoTokenizer, BartForConditionalGeneration, DPRQuestionEncoder",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("question_encoder")',
        'encoder = DPRQuestionEncoder.from_pretrained("question_encoder").eval()',
        'vectors = encoder(**tokenizer(["What is the capital of Chad?"], truncation=True, padding=True,',
        '                              return_tensors="pt")).pooler_output',
        'generator_tokenizer = AutoTokenizer.from_pretrained("generator")',
        generator_load,
        "```",
        "",
        ("The passages are not in this directory: they come from the corpus above through a FAISS index of the "
         "context encoder's vectors"
         + (f" (`{index_command}` builds it)" if index_command else "")
         + ". The generator reads `question // title / text` per passage." if model.retrieves else "")
        + (f' Answers{" with their passages" if model.retrieves else ""}: '
           f'`rag-predict ckpt_path={checkpoint} question="..."`.' if checkpoint else ""),
    ]
    if retrieval is not None and model.retrieves:
        lines += _plain_retrieval(retrieval, model, copy)
    return "\n".join(lines).strip() + "\n"


def _plain_retrieval(r: PlainRetrieval, model: ModelConfig, copy: bool) -> list[str]:
    """The card's second and third blocks: the run's top-k passages with numpy and FAISS, then answers with the
    generator on each question's first passage (RAG with one passage is the generator on that context)."""
    exact = (
        "exact" if r.index_type == "flat" else
        f"approximate, like the framework's search (a `{r.index_type}` index"
        + ("; the framework re-ranks its candidates with the exact vectors, so the order can differ)"
           if r.index_type == "ivfpq" else ")")
    )
    context = 'f"{q.strip()} // {passage(r)}"' if r.layout == "question_first" else 'f"{passage(r)} // {q.strip()}"'
    lines = [
        "",
        "## Retrieval and answers without rag_lightning",
        "",
        "After the code above: the run's top-k passages from its FAISS index and corpus store (numpy arrays and "
        f"FAISS's own format, no pickle), by inner product, best first ({exact}):",
        "",
        "```python",
        "import faiss, numpy as np, torch",
        "",
        f'STORE, INDEX = "{r.store_dir}", "{r.index_dir}"',
        "",
        "def field(name):  # one column of the corpus store: row -> text",
        '    values = np.load(f"{STORE}/{name}_values.npy", mmap_mode="r")',
        '    offsets = np.load(f"{STORE}/{name}_offsets.npy")',
        '    return lambda row: bytes(values[offsets[row]:offsets[row + 1]]).decode("utf-8")',
        "",
        'ids, titles, texts = field("ids"), field("titles"), field("texts")',
        'index = faiss.read_index(f"{INDEX}/index.faiss")',
        'questions = ["What is the capital of Chad?"]',
        "with torch.no_grad():",
        "    vectors = encoder(**tokenizer(questions, truncation=True, padding=True, return_tensors=\"pt\")).pooler_output",
        f"scores, rows = index.search(vectors.numpy(), {model.eval_docs})",
        "top_ids = [[ids(r) for r in row] for row in rows]",
        "```",
        "",
    ]
    if copy:
        return lines
    return lines + [
        f"Answers from each question's first passage: the generator reads `question // title / text`, cut to "
        f"{r.context_max_length} tokens (RAG over one passage is the generator on that context; over "
        f"{model.eval_docs}, the mixture needs RAG's decoder: `rag-predict`, or `export_rag=true`'s `rag/`):",
        "",
        "```python",
        "def passage(row):",
        f'    return f"{{titles(row)}}{r.title_separator}{{texts(row)}}" if titles(row) else texts(row)',
        "",
        f"contexts = [{context} for q, r in zip(questions, rows[:, 0])]",
        "inputs = generator_tokenizer(contexts, truncation=True, max_length="
        f'{r.context_max_length}, padding=True, return_tensors="pt")',
        f"generated = generator.eval().generate(**inputs, num_beams=1, max_new_tokens={model.decoding.max_new_tokens})",
        "answers = [a.strip() for a in generator_tokenizer.batch_decode(generated, skip_special_tokens=True)]",
        "```",
    ]
