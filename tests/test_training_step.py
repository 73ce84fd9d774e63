"""The training step's wiring, pinned against an independent computation from the module's pieces.

The math (the three NLLs, the decoders) is tested against transformers elsewhere; these tests check what the
module does with it: which loss a mode trains with, that each target meets the contexts of its own question,
that the question encoder gets a gradient exactly when it should, and that the step learns.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rag_lightning.models.marginalize import closed_book_nll, rag_sequence_nll, rag_token_nll
from rag_lightning.pipeline import setup

# tiny encoders have dropout: the module and the hand computation both run in eval mode to compare exactly
# (eval mode changes nothing else here: no curriculum, no answer swapping in the tiny experiment)


@pytest.fixture
def tiny_module(tmp_path, tiny_train_config):
    """``tiny_module(*overrides)``: (module, one training batch of 4 questions with 4 different answers)."""

    def build(*overrides: str):
        torch.manual_seed(0)
        _, module, datamodule = setup(tiny_train_config(tmp_path, *overrides))
        batch = next(iter(datamodule.train_dataloader()))
        assert len({tuple(a) for a in batch["answers"]}) == len(batch["answers"]) == 4
        return module, batch

    return build


def _question_ids(batch: dict) -> list[list[int]]:
    ids, mask = batch["question_generator_ids"], batch["question_generator_mask"]
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _rag_pieces(module, batch: dict, n_docs: int, *, aligned: bool = True):
    """Logits of every (question, passage) context and the doc scores, computed step by step by hand.

    Context b*k + j holds passage j of question b, so its decoder input is question b's target; with
    ``aligned=False`` the targets are tiled instead (question order b = 0, 1, ..., 0, 1, ...), a misalignment.
    """
    retriever = module.retriever
    q = module.question_encoder(
        input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"]
    ).pooler_output
    found = retriever.retrieve(q, n_docs)
    doc_scores = (q[:, None, :] * retriever.vectors(found.rows)).sum(-1)
    contexts, mask = retriever.build_contexts(_question_ids(batch), found.rows)
    dec = batch["decoder_input_ids"]
    size = dec.shape[0]
    order = [b for b in range(size) for _ in range(n_docs)] if aligned else [i % size for i in range(size * n_docs)]
    logits = module.generator(
        input_ids=contexts, attention_mask=mask, decoder_input_ids=dec[order], use_cache=False
    ).logits
    return logits, doc_scores


def _sharpen(module) -> None:
    """Large random weights: a freshly initialised tiny model predicts almost the same near-uniform tokens
    from every passage, where the two marginalisations (and aligned vs misaligned targets) barely differ."""
    with torch.no_grad():
        for p in [*module.generator.parameters(), *module.question_encoder.parameters()]:
            if p.ndim > 1:
                p.normal_(0.0, 0.3)


@pytest.mark.parametrize("mode", ["rag_token", "rag_sequence", "closed_book"])
def test_the_step_trains_with_its_modes_loss_on_aligned_targets(tiny_module, mode):
    module, batch = tiny_module(f"model={mode}", "model.question_encoder_warmup_steps=0")
    module.eval()
    _sharpen(module)
    loss = module.training_step(batch, 0)
    pad = module.tokenizer.pad_token_id
    labels = batch["labels"]
    if mode == "closed_book":
        bos, eos = module.tokenizer.bos_token_id, module.tokenizer.eos_token_id
        rows = [[bos, *ids, eos] for ids in _question_ids(batch)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        logits = module.generator(
            input_ids=ids, attention_mask=(ids != pad).long(), decoder_input_ids=batch["decoder_input_ids"]
        ).logits
        expected = closed_book_nll(logits, labels, pad_token_id=pad, reduction="token_mean")
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        return
    n_docs = module.cfg.n_docs
    logits, doc_scores = _rag_pieces(module, batch, n_docs)
    token = rag_token_nll(logits, doc_scores, labels, pad_token_id=pad, reduction="token_mean")
    sequence = rag_sequence_nll(logits, doc_scores, labels, pad_token_id=pad, reduction="token_mean")
    assert abs(token.item() - sequence.item()) > 1e-3  # the batch tells the two losses apart
    torch.testing.assert_close(loss, token if mode == "rag_token" else sequence, rtol=1e-5, atol=1e-6)
    # ... and it tells aligned targets from misaligned ones
    tiled, _ = _rag_pieces(module, batch, n_docs, aligned=False)
    misaligned = rag_token_nll(tiled, doc_scores, labels, pad_token_id=pad, reduction="token_mean")
    assert abs(misaligned.item() - token.item()) > 1e-3


def _encoder_grads(module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in module.question_encoder.named_parameters()}


@pytest.mark.parametrize(
    ("overrides", "trained"),
    [
        (("model.question_encoder_warmup_steps=0",), "all"),
        (("model.question_encoder_warmup_steps=5",), "none"),  # step 0 is inside the warm-up
        (("model.question_encoder_warmup_steps=0", "model.freeze_question_encoder=true"), "none"),
        (("model.question_encoder_warmup_steps=0", "model.question_encoder_trainable_layers=1"), "top"),
    ],
)
def test_the_question_encoder_gets_a_gradient_exactly_when_it_trains(tiny_module, overrides, trained):
    module, batch = tiny_module(*overrides)
    module.eval()
    module.zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    grads = _encoder_grads(module)
    nonzero = {name for name, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    if trained == "none":
        assert not nonzero
    elif trained == "all":
        assert any("embeddings" in n for n in nonzero) and any("layer.1." in n for n in nonzero)
    else:  # only the top layer of the two
        assert nonzero and all("layer.1." in n for n in nonzero), sorted(nonzero)[:5]


def test_the_step_learns_a_tiny_batch(tiny_module):
    module, batch = tiny_module("model.question_encoder_warmup_steps=0")
    module.eval()
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_multi_task_step_adds_the_weighted_contrastive_term(tiny_module):
    """model.retrieval_loss_weight=w: the step's loss is the NLL plus w times the retriever's contrastive loss
    of the batch's questions against their gold passages and every retrieved passage (the non-gold ones
    are hard negatives)."""
    from rag_lightning.models.module import contrastive_loss

    module, batch = tiny_module("model.question_encoder_warmup_steps=0", "model.retrieval_loss_weight=0.5")
    module.eval()
    loss = module.training_step(batch, 0)
    nll, _ = module.nll(batch, module.cfg.n_docs, module.cfg.loss_reduction)
    q = module.question_encoder(
        input_ids=batch["question_input_ids"], attention_mask=batch["question_attention_mask"]
    ).pooler_output
    rows = module.retriever.rows_of([gold[0] for gold in batch["gold_passage_ids"]])
    assert None not in rows  # every tiny-world question names its gold passage
    retrieved = module.retrieve(batch, module.cfg.n_docs)["rows"]
    columns = list(dict.fromkeys(rows + retrieved.reshape(-1).tolist()))
    assert len(columns) > len(set(rows))  # retrieved non-gold passages joined the in-batch golds
    positives = torch.tensor([[c == r for c in columns] for r in rows])  # one gold passage per question here
    contrastive = contrastive_loss(q, module.retriever.vectors(columns), positives)
    assert contrastive.item() > 0.1
    torch.testing.assert_close(loss, nll + 0.5 * contrastive, rtol=1e-5, atol=1e-6)
    # the term needs a training encoder: none while it is frozen
    frozen, batch = tiny_module("model.question_encoder_warmup_steps=5", "model.retrieval_loss_weight=0.5")
    frozen.eval()
    nll, _ = frozen.nll(batch, frozen.cfg.n_docs, frozen.cfg.loss_reduction)
    torch.testing.assert_close(frozen.training_step(batch, 0), nll)


def test_answer_swapping_trains_on_the_swapped_contexts_and_answers(tiny_module):
    """model.answer_swap_prob=1 in training: the generator reads contexts whose answer is replaced by another
    example's and is trained to give that answer (the gold curriculum puts each answer in the contexts)."""
    from rag_lightning.models.augment import swap_answers

    module, batch = tiny_module("model.answer_swap_prob=1.0", "model.gold_passage_steps=5")
    module.eval()
    _sharpen(module)  # a generator that reads its contexts, so swapped contexts change the loss
    module.training = True  # the module's own switch only: encoders and generator stay without dropout
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    ret = module.retrieve(batch, module.cfg.n_docs)
    pad, eos = module.tokenizer.pad_token_id, module.tokenizer.eos_token_id
    torch.manual_seed(3)
    ids, mask, labels, dec_in = swap_answers(
        ret["context_input_ids"], batch["labels"], n_docs=module.cfg.n_docs, pad_id=pad, eos_id=eos,
        decoder_start_id=int(batch["decoder_input_ids"][0, 0]), prob=1.0,
    )  # fmt: skip
    assert not torch.equal(labels, batch["labels"])  # answers were swapped
    logits = module.generator(
        input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in.repeat_interleave(module.cfg.n_docs, 0)
    ).logits
    expected = rag_token_nll(logits, ret["doc_scores"], labels, pad_token_id=pad, reduction="token_mean")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    unswapped_contexts = module.generator(
        input_ids=ret["context_input_ids"], attention_mask=ret["context_attention_mask"],
        decoder_input_ids=dec_in.repeat_interleave(module.cfg.n_docs, 0),
    ).logits  # fmt: skip
    other = rag_token_nll(unswapped_contexts, ret["doc_scores"], labels, pad_token_id=pad, reduction="token_mean")
    assert abs(other.item() - expected.item()) > 1e-3  # the batch tells swapped contexts from the originals


def test_evaluation_never_swaps_answers(tiny_module):
    # every passage of the tiny world is read (24), so each answer is in its contexts and could be swapped
    module, batch = tiny_module("model.answer_swap_prob=1.0", "model.n_docs=24", "model.eval_n_docs=24")
    module.eval()
    _sharpen(module)
    torch.manual_seed(3)
    evaluated, _ = module.nll(batch, module.cfg.n_docs, "token_mean")
    module.cfg.answer_swap_prob = 0.0
    plain, _ = module.nll(batch, module.cfg.n_docs, "token_mean")
    torch.testing.assert_close(evaluated, plain)
    module.training = True  # the same batch in training does swap (the test above checks how)
    module.cfg.answer_swap_prob = 1.0
    torch.manual_seed(3)
    trained, _ = module.nll(batch, module.cfg.n_docs, "token_mean")
    assert abs(trained.item() - plain.item()) > 1e-3


def test_the_step_logs_its_terms_under_their_dashboard_names(tiny_module):
    """What a training step sends to the loggers: each term under its name, with the batch size (B), and the
    loss on the progress bar."""
    module, batch = tiny_module("model.question_encoder_warmup_steps=0", "model.retrieval_loss_weight=0.5")
    module.eval()
    logged = {}
    module.log = lambda name, value, **kwargs: logged.setdefault(name, (value, kwargs))
    loss = module.training_step(batch, 0)
    assert set(logged) == {"train/nll", "train/retrieval_loss", "train/doc_entropy", "train/distinct_passages",
                           "train/question_encoder_frozen", "train/loss"}
    assert all(kwargs["batch_size"] == 4 for _, kwargs in logged.values())
    assert logged["train/loss"][1].get("prog_bar") is True
    assert all(not kwargs.get("prog_bar") for name, (_, kwargs) in logged.items() if name != "train/loss")
    nll, ret = module.nll(batch, module.cfg.n_docs, module.cfg.loss_reduction)
    contrastive = module.retrieval_loss(batch, ret)
    torch.testing.assert_close(logged["train/loss"][0], loss)
    torch.testing.assert_close(logged["train/nll"][0], nll)
    torch.testing.assert_close(logged["train/retrieval_loss"][0], contrastive)
    assert logged["train/question_encoder_frozen"][0] == 0.0
    assert 0.0 < float(logged["train/distinct_passages"][0]) <= 1.0 and float(logged["train/doc_entropy"][0]) > 0.0


@pytest.mark.parametrize(
    "override, precision, fused",
    [(None, "32-true", True), (None, "bf16-mixed", True), (None, "16-mixed", False), ("false", "32-true", False)],
)
def test_the_optimizer_is_fused_adamw_unless_fp16_scaling_or_the_config_says_no(
    tiny_module, override, precision, fused
):
    """model.optim.fused=null: the fused kernel (~6x faster AdamW step on CPU) wherever Lightning can clip with it;
    the fused step takes the same step as the looped one."""
    module, batch = tiny_module(*([f"model.optim.fused={override}"] if override else []))
    module._trainer = SimpleNamespace(precision=precision)
    optimizer = module.build_optimizer()
    module._trainer = None
    assert optimizer.defaults["fused"] is fused
    assert [g["weight_decay"] for g in optimizer.param_groups[:2]] == [module.cfg.optim.weight_decay, 0.0]
    if fused:  # one step of each kernel from the same weights and gradients lands on the same weights
        module.eval()
        start = {n: p.detach().clone() for n, p in module.named_parameters()}
        looped = torch.optim.AdamW(
            [{**g, "params": g["params"]} for g in optimizer.param_groups], fused=False, foreach=False
        )
        results = []
        for opt in (optimizer, looped):
            with torch.no_grad():
                for n, p in module.named_parameters():
                    p.copy_(start[n])
            opt.zero_grad()
            module.training_step(batch, 0).backward()
            opt.step()
            results.append({n: p.detach().clone() for n, p in module.named_parameters()})
        for n in start:
            torch.testing.assert_close(results[0][n], results[1][n], rtol=1e-5, atol=1e-7)


def test_fused_true_on_weights_it_cannot_run_on_is_refused_naming_the_key():
    from rag_lightning.config import ConfigError
    from rag_lightning.models.module import _use_fused

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, device="meta"))]}]
    assert _use_fused(None, groups, "32-true") is False
    with pytest.raises(ConfigError, match="model.optim.fused"):
        _use_fused(True, groups, "32-true")


def test_question_word_dropout_masks_the_question_in_training_contexts_only(tiny_module):
    """model.question_word_dropout: in training each question token of the generator's contexts becomes
    <mask> at random, the same tokens in all of a question's contexts; the passages, the retriever's question
    and every evaluation context are untouched, and the run's seed decides the draw."""
    module, batch = tiny_module("model.question_word_dropout=0.5", "model.gold_passage_steps=0")
    module.eval()
    k, mask_id = module.cfg.n_docs, module.tokenizer.mask_token_id
    questions = _question_ids(batch)
    plain_ret = module.retrieve(batch, k)
    evaluated = plain_ret["context_input_ids"]
    module.training = True  # the module's own switch only: encoders and generator stay without dropout
    torch.manual_seed(3)
    trained = module.retrieve(batch, k)
    assert torch.equal(trained["rows"], plain_ret["rows"])  # the retriever read the whole question
    torch.testing.assert_close(trained["doc_scores"], plain_ret["doc_scores"])
    torch.manual_seed(3)
    assert torch.equal(module.retrieve(batch, k)["context_input_ids"], trained["context_input_ids"])
    torch.manual_seed(4)
    assert not torch.equal(module.retrieve(batch, k)["context_input_ids"], trained["context_input_ids"])
    masked = 0
    for b, question in enumerate(questions):
        n = len(question)  # question_first: <s>, the question, the separator, the passage
        rows = [trained["context_input_ids"][b * k + j].tolist() for j in range(k)]
        assert all(row[1 : n + 1] == rows[0][1 : n + 1] for row in rows)  # one draw per question
        assert all(t in (q, mask_id) for t, q in zip(rows[0][1 : n + 1], question))
        masked += sum(t == mask_id for t in rows[0][1 : n + 1])
        for j, row in enumerate(rows):
            plain = evaluated[b * k + j].tolist()
            assert plain[1 : n + 1] == question and row[n + 1 :] == plain[n + 1 :]  # passages untouched
    assert 0 < masked < sum(map(len, questions))
    module.training = False
    assert torch.equal(module.retrieve(batch, k)["context_input_ids"], evaluated)  # eval never masks
    assert mask_id not in evaluated.tolist()[0]


def test_checkpoints_record_the_generator_vocabulary_and_a_resume_through_another_is_refused(tiny_module):
    from rag_lightning.config import ConfigError
    from rag_lightning.data.gen_tokenizer import vocabulary_fingerprint
    from rag_lightning.models.module import TOKENIZER_KEY

    module, _ = tiny_module()
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[TOKENIZER_KEY] == vocabulary_fingerprint(module.tokenizer)
    module.on_load_checkpoint(checkpoint)  # the same vocabulary: fine
    module.on_load_checkpoint({})  # written before the record existed: not checked
    vocab = dict(module.tokenizer.get_vocab())
    other = SimpleNamespace(get_vocab=lambda: {**vocab, "<extra>": len(vocab)})
    assert vocabulary_fingerprint(other) != checkpoint[TOKENIZER_KEY]
    with pytest.raises(ConfigError, match="another generator tokenizer"):
        module.on_load_checkpoint({TOKENIZER_KEY: vocabulary_fingerprint(other)})


@pytest.mark.parametrize("max_length", [128, 56])
def test_same_relation_swaps_train_on_the_donors_within_the_context_limit(tiny_module, max_length):
    """model.answer_swap_donors=relation: each training batch carries another answer of each question's
    relation (the tiny world's are all capitals), the generator is trained to give it from contexts where it
    replaced the question's answer, and no context outgrows context.max_length, even for a donor far longer
    than the room a context has (that one is not swapped)."""
    module, batch = tiny_module(
        "model.answer_swap_prob=1.0", "model.answer_swap_donors=relation", "model.gold_passage_steps=5",
        f"context.max_length={max_length}",
    )  # fmt: skip
    donors = batch["swap_answers"]
    answers = [[t for t in row.tolist() if t not in (module.pad_id, module.eos_id)] for row in batch["labels"]]
    assert all(d and d != a for d, a in zip(donors, answers))  # another capital for every question
    batch["swap_answers"] = [answers[1] * 20, *donors[1:]]  # question 0's donor: 20 capitals long
    seen = {}
    forward = module.generator.forward

    def spy(*args, **kwargs):
        seen.update(contexts=kwargs["input_ids"], targets=kwargs["decoder_input_ids"][:: module.cfg.n_docs, 1:])
        return forward(*args, **kwargs)

    module.generator.forward = spy
    module.training = True
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    assert seen["contexts"].shape[1] <= max_length
    targets = [[t for t in row.tolist() if t not in (module.pad_id, module.eos_id)] for row in seen["targets"]]
    assert targets[0] == answers[0][: len(targets[0])]  # the long donor was not swapped in
    swapped = [b for b in range(1, 4) if targets[b] == donors[b]]
    assert all(targets[b] in (donors[b], answers[b][: len(targets[b])]) for b in range(1, 4))
    assert len(swapped) == 3 or max_length < 128  # with room, every question but the first takes its donor
    for b in swapped:  # the donor stands in the question's contexts, its own answer no more
        rows = seen["contexts"][b * module.cfg.n_docs : (b + 1) * module.cfg.n_docs].tolist()
        text = [" ".join(map(str, r)) for r in rows]
        assert any(" ".join(map(str, donors[b])) in t for t in text)
