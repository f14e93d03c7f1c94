#!/usr/bin/env python3
"""Runs an exported Hugging Face directory in `transformers`, the reference for `pretrain export`'s tests.

usage: check_export.py HF_DIR IDS_JSON
IDS_JSON holds {"ids": [[token ids], ...]} (rows of equal length). Loads the directory with
LlamaForCausalLM.from_pretrained (fp32, CPU) and prints {"logits": [...]} (rows x positions x vocab,
flattened). When the directory has a tokenizer, it must load with AutoTokenizer and round-trip a text.
"""
import json
import os
import sys

import torch
from transformers import AutoTokenizer, LlamaForCausalLM


def main() -> None:
    model_dir, ids_path = sys.argv[1], sys.argv[2]
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with open(ids_path, encoding="utf-8") as f:
        ids = torch.tensor(json.load(f)["ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        text = "The quick brown fox, 42 times."
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(encoded) != text:
            sys.exit(f"the tokenizer does not round-trip {text!r}: {encoded}")
    json.dump({"logits": logits.flatten().tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
