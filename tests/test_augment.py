import torch

from rag_lightning.models.augment import drop_question_words, swap_answers

PAD, EOS, BOS, MASK = 1, 2, 0, 4


def test_swaps_answer_in_contexts_and_target():
    # example 0: answer [7, 8], present in its first context; example 1: answer [9]
    contexts = torch.tensor([
        [BOS, 5, 7, 8, 6, EOS],
        [BOS, 5, 6, EOS, PAD, PAD],
        [BOS, 9, 3, EOS, PAD, PAD],
        [BOS, 4, EOS, PAD, PAD, PAD],
    ])
    labels = torch.tensor([[7, 8, EOS], [9, EOS, PAD]])
    ctx, mask, new_labels, dec = swap_answers(
        contexts, labels, n_docs=2, pad_id=PAD, eos_id=EOS, decoder_start_id=EOS, prob=1.0
    )
    assert ctx.tolist() == [
        [BOS, 5, 9, 6, EOS],
        [BOS, 5, 6, EOS, PAD],
        [BOS, 7, 8, 3, EOS],
        [BOS, 4, EOS, PAD, PAD],
    ]
    assert mask.tolist()[0] == [1, 1, 1, 1, 1] and mask.tolist()[1] == [1, 1, 1, 1, 0]
    assert new_labels[0].tolist()[:2] == [9, EOS] and new_labels[1].tolist() == [7, 8, EOS]
    assert dec[1].tolist() == [EOS, 7, 8] and dec[0].tolist()[:2] == [EOS, 9]


def test_nothing_changes_without_the_answer_in_context_or_with_prob_zero():
    contexts = torch.tensor([[BOS, 5, EOS], [BOS, 6, EOS]])
    labels = torch.tensor([[7, EOS], [8, EOS]])
    for prob in (0.0, 1.0):
        ctx, _, new_labels, dec = swap_answers(
            contexts, labels, n_docs=1, pad_id=PAD, eos_id=EOS, decoder_start_id=EOS, prob=prob
        )
        assert torch.equal(ctx, contexts) and torch.equal(new_labels, labels)
        assert dec.tolist() == [[EOS, 7], [EOS, 8]]


def test_question_word_dropout_is_off_at_zero_and_masks_at_the_rate():
    questions = [[10 + i for i in range(n)] for n in (3, 0, 7)]
    assert drop_question_words(questions, prob=0.0, mask_id=MASK) == questions
    many = [list(range(10, 60))] * 400  # 20,000 tokens: the masked share is within 0.01 of p
    for p in (0.1, 0.3):
        out = drop_question_words(many, prob=p, mask_id=MASK, generator=torch.Generator().manual_seed(0))
        share = sum(t == MASK for q in out for t in q) / 20_000
        assert abs(share - p) < 0.01, (p, share)
        # a token is either kept in its place or masked: lengths and the unmasked tokens are unchanged
        assert all(len(o) == len(q) and all(t in (s, MASK) for t, s in zip(o, q)) for o, q in zip(out, many))


def test_question_word_dropout_is_seeded_and_drops_without_a_mask_token():
    questions = [list(range(10, 40)) for _ in range(8)]

    def run(seed: int, mask_id: int | None = MASK) -> list[list[int]]:
        return drop_question_words(questions, prob=0.5, mask_id=mask_id, generator=torch.Generator().manual_seed(seed))

    assert run(1) == run(1) and run(1) != run(2)
    dropped = run(1, mask_id=None)  # the same draws: the masked positions are the removed ones
    assert dropped == [[t for t in q if t != MASK] for q in run(1)]
    assert sum(map(len, dropped)) < sum(map(len, questions))


def test_given_donors_take_the_place_of_the_batch():
    """donor_answers (the data module's same-relation draws): a picked example takes its own donor, in its
    contexts and its target; an empty donor leaves it alone; a batch of one can swap."""
    contexts = torch.tensor([[BOS, 5, 7, 8, 6, EOS], [BOS, 9, 3, EOS, PAD, PAD]])
    labels = torch.tensor([[7, 8, EOS], [9, EOS, PAD]])
    ctx, _, new_labels, dec = swap_answers(
        contexts, labels, n_docs=1, pad_id=PAD, eos_id=EOS, decoder_start_id=EOS, prob=1.0,
        donor_answers=[[11], []],
    )  # fmt: skip
    assert ctx.tolist() == [[BOS, 5, 11, 6, EOS], [BOS, 9, 3, EOS, PAD]]
    assert new_labels.tolist() == [[11, EOS], [9, EOS]] and dec.tolist() == [[EOS, 11], [EOS, 9]]
    ctx, _, new_labels, _ = swap_answers(
        contexts[:1], labels[:1], n_docs=1, pad_id=PAD, eos_id=EOS, decoder_start_id=EOS, prob=1.0,
        donor_answers=[[12, 13]],
    )  # fmt: skip
    assert ctx.tolist() == [[BOS, 5, 12, 13, 6, EOS]] and new_labels.tolist() == [[12, 13, EOS]]


def test_a_swap_never_makes_a_context_longer_than_max_length():
    """A longer answer standing twice in a passage would lengthen the context past the generator's positions
    (the main job's rag-train model.answer_swap_prob=0.25 crashed on it in BART's position embedding): with
    cut_tail the passage's tail is cut, keeping </s>; without it, or where the new answer would be cut away,
    the example keeps its answer."""
    contexts = torch.tensor([[BOS, 7, 5, 7, EOS]])  # the answer [7] twice
    labels = torch.tensor([[7, EOS]])
    kwargs = {"n_docs": 1, "pad_id": PAD, "eos_id": EOS, "decoder_start_id": EOS, "prob": 1.0,
              "donor_answers": [[11, 12, 13]], "max_length": 6}
    ctx, _, new_labels, _ = swap_answers(contexts, labels, **kwargs)
    assert ctx.tolist() == contexts.tolist() and new_labels.tolist() == labels.tolist()  # 9 tokens: not swapped
    ctx, _, new_labels, _ = swap_answers(contexts, labels, cut_tail=True, **kwargs)
    assert ctx.tolist() == [[BOS, 11, 12, 13, 5, EOS]] and new_labels.tolist() == [[11, 12, 13, EOS]]
    tail_only = torch.tensor([[BOS, 5, 6, 7, EOS]])  # the answer only at the end: cutting would lose it
    ctx, _, new_labels, _ = swap_answers(tail_only, labels, cut_tail=True, **kwargs)
    assert ctx.tolist() == tail_only.tolist() and new_labels.tolist() == labels.tolist()
    ctx, _, _, _ = swap_answers(tail_only, labels, cut_tail=True, **{**kwargs, "max_length": 8})
    assert ctx.tolist() == [[BOS, 5, 6, 11, 12, 13, EOS]]  # within the limit: swapped whole


def _encoded(relation: str, answer: list[int], i: int):
    from rag_lightning.data.datamodule import EncodedQA
    from rag_lightning.data.readers import QAExample

    return EncodedQA(QAExample(f"q{i}", "?", ("a",), relation=relation), "?", [101], [5], [*answer, EOS])


def test_same_relation_donors_are_another_answer_of_the_relation():
    from rag_lightning.data.datamodule import Collator, SameRelationAnswers

    items = [_encoded("capital", [20 + i % 3], i) for i in range(6)]  # 3 distinct capitals, each twice
    items += [_encoded("population", [40, 41], 6), _encoded("alone", [50], 7), _encoded("", [60], 8)]
    pool = SameRelationAnswers(items)
    assert pool.relation_sizes() == {"capital": 3, "population": 1, "alone": 1}  # rows without one: none
    torch.manual_seed(0)
    draws = [pool.draw(items[0]) for _ in range(300)]
    assert {tuple(d) for d in draws} == {(21,), (22,)}  # never its own answer, both others
    assert 100 < sum(d == [21] for d in draws) < 200  # uniform (expected 150, sd ~9)
    assert pool.draw(items[6]) == [] and pool.draw(items[7]) == [] and pool.draw(items[8]) == []
    torch.manual_seed(1)
    first = Collator(0, PAD, EOS, "train", pool)(items[:4])["swap_answers"]
    torch.manual_seed(1)
    assert Collator(0, PAD, EOS, "train", pool)(items[:4])["swap_answers"] == first  # seeded runs repeat
    assert all(d != it.target_ids[:-1] and d[0] in (20, 21, 22) for d, it in zip(first, items))
    assert "swap_answers" not in Collator(0, PAD, EOS, "val")(items[:4])
