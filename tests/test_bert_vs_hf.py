"""minBERT equals transformers.BertModel on the same weights (last hidden state, fp32)."""

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from mtbert.errors import UserError
from mtbert.model.bert import from_pretrained

SENTENCES = [("A man is playing a guitar.", "A man plays the guitar on stage."),
             ("How do I learn Python quickly, and where should I start?", "Best way to learn Python?"),
             (" It 's a lovely film with lovely performances by Buy and Accorsi .", "No one goes unindicted here .")]


def _compare(folder, pair=False):
    tok = AutoTokenizer.from_pretrained(str(folder))
    a, b = zip(*SENTENCES)
    enc = tok(list(a), list(b), padding=True, return_tensors="pt") if pair else tok(list(a), padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    hf = BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    ours, _ = from_pretrained(str(folder))
    ours.eval()
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state
        got = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        ref_pool = hf(**enc).pooler_output
    assert (got - ref).abs().max().item() < 1e-5
    if hf.pooler is not None:
        assert (ours.pool(got) - ref_pool).abs().max().item() < 1e-5


@pytest.mark.parametrize("pair", [False, True])
def test_packaged_minilm_matches_hf(minilm_dir, pair):
    _compare(minilm_dir, pair)


@pytest.mark.parametrize("pair", [False, True])
def test_random_tiny_config_matches_hf(tiny_ckpt, pair):
    _compare(tiny_ckpt, pair)


def test_alias_and_bad_path():
    model, folder = from_pretrained("minilm-l6")
    assert len(model.layers) == 6 and model.config.hidden_size == 384
    with pytest.raises(UserError, match="not a checkpoint folder"):
        from_pretrained("./no/such/folder")
