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
