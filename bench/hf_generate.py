#!/usr/bin/env python3
"""Hugging Face transformers' generate on the prompts `qwen-load` used, for its ratio column.

    python bench/hf_generate.py MODEL_DIR PROMPTS.json MAX_NEW_TOKENS

All prompts have the same length, so they run as one batch without padding: greedy, f32, CPU,
exactly MAX_NEW_TOKENS each. Prints {"tokens_per_s": ...} on its last line.
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, prompts_file, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_grad_enabled(False)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
ids = torch.tensor(json.load(open(prompts_file)))
start = time.perf_counter()
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     pad_token_id=0)
elapsed = time.perf_counter() - start
generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
print(json.dumps({"tokens_per_s": generated / elapsed, "seconds": elapsed, "batch": int(ids.shape[0])}))
