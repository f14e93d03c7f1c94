#!/usr/bin/env python3
"""Scores texts with Hugging Face `transformers`, the reference for the data-prep BERT scorer's tests.

usage: check_bert.py MODEL_DIR TEXTS_JSON
MODEL_DIR holds config.json, model.safetensors and tokenizer.json of a BertForSequenceClassification;
TEXTS_JSON a JSON list of strings. Prints a JSON list with each text's probability of the positive
label, defined as the data-prep scorer defines it: the softmax column of the label named like
"good"/"positive" (else the last label), or the sigmoid of a single output.
"""
import json
import sys

import torch
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

POSITIVE = {"good", "positive", "hq", "high", "high_quality", "keep", "pos", "1"}


def main() -> None:
    model_dir, texts_path = sys.argv[1], sys.argv[2]
    model = BertForSequenceClassification.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)
    labels = model.config.num_labels
    names = {int(i): str(n).lower() for i, n in model.config.id2label.items()}
    positive = next((i for i in sorted(names) if names[i] in POSITIVE and i < labels), labels - 1)
    max_length = min(model.config.max_position_embeddings, 512)
    scores = []
    with torch.no_grad():
        for text in texts:
            batch = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids")).logits[0]
            probabilities = torch.sigmoid(logits) if labels == 1 else torch.softmax(logits, dim=-1)
            scores.append(float(probabilities[positive]))
    json.dump(scores, sys.stdout)


if __name__ == "__main__":
    main()
