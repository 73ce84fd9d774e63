import torch

from rag_lightning.models.augment import swap_answers

PAD, EOS, BOS = 1, 2, 0


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
