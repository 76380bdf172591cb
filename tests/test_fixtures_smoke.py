"""The tiny models the suite builds load through transformers' real loading code."""


def test_tiny_models_load_for_classification(tiny_bert, tiny_llama):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for path in (tiny_bert, tiny_llama):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
            model.config.pad_token_id = tok.pad_token_id
        batch = tok(["great good", "bad awful terrible"], padding=True, return_tensors="pt")
        out = model(**batch)
        assert out.logits.shape == (2, 3)
