import math

import pytest
import torch
from transformers import BartConfig

from rag_lightning.models.copy_generator import CopyBartForConditionalGeneration, copy_mixture_log_probs


def _model(seed: int = 0) -> CopyBartForConditionalGeneration:
    cfg = BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    return CopyBartForConditionalGeneration(cfg).eval()


SOURCE = torch.tensor([[0, 5, 6, 7, 2, 1], [0, 9, 9, 30, 11, 2]])
MASK = (SOURCE != 1).long()


def test_mixture_matches_hand_computation():
    vocab_logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    attention = torch.tensor([[[0.75, 0.25]]])  # over source positions holding tokens 2 and 2
    source_ids = torch.tensor([[2, 2]])
    gate = torch.tensor([[0.6]])
    got = copy_mixture_log_probs(vocab_logits, attention, source_ids, gate).exp()
    expected = torch.tensor([0.6 * 0.5, 0.6 * 0.25, 0.6 * 0.25 + 0.4 * 1.0])
    assert torch.allclose(got[0, 0], expected, atol=1e-6)


def test_distribution_sums_to_one():
    model = _model()
    dec = torch.tensor([[2, 5, 6], [2, 9, 30]])
    log_p = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(2, 3), atol=1e-5)


def test_loss_is_the_mean_token_nll_of_the_mixture():
    model = _model()
    dec = torch.tensor([[2, 5, 6], [2, 9, 30]])
    labels = torch.tensor([[5, 6, 2], [9, 30, 1]])
    out = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec, labels=labels)
    picked = out.logits.gather(-1, labels[..., None]).squeeze(-1)
    keep = labels != 1
    assert math.isclose(out.loss.item(), -(picked[keep]).mean().item(), rel_tol=1e-6)


def test_incremental_decoding_with_cache_equals_full_forward():
    model = _model(seed=3)
    dec = torch.tensor([[2, 5, 6, 7], [2, 9, 30, 11]])
    full = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    enc = model.get_encoder()(input_ids=SOURCE, attention_mask=MASK)
    cache, steps = None, []
    for t in range(dec.shape[1]):
        out = model(
            encoder_outputs=enc, attention_mask=MASK, decoder_input_ids=dec[:, t : t + 1], cache=cache, use_cache=True
        )
        cache = out.cache
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_generate_with_and_without_cache_agree():
    model = _model(seed=5)
    kwargs = {"input_ids": SOURCE, "attention_mask": MASK, "max_new_tokens": 6, "do_sample": False}
    for beams in (1, 3):
        with_cache = model.generate(num_beams=beams, **kwargs)
        without = model.generate(num_beams=beams, use_cache=False, **kwargs)
        assert torch.equal(with_cache, without)


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    again = CopyBartForConditionalGeneration.from_pretrained(tmp_path).eval()
    dec = torch.tensor([[2, 5], [2, 9]])
    a = model(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    b = again(input_ids=SOURCE, attention_mask=MASK, decoder_input_ids=dec).logits
    assert torch.equal(a, b)


def test_foreign_encoder_states_are_refused():
    model = _model()
    plain = model.model.encoder(input_ids=SOURCE, attention_mask=MASK)
    with pytest.raises(ValueError, match="token-id channel"):
        model(encoder_outputs=(plain.last_hidden_state,), attention_mask=MASK, decoder_input_ids=SOURCE[:, :1])
