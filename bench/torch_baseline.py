#!/usr/bin/env python3
"""PyTorch + transformers baseline for `qwen-bench`: the same random checkpoint directory, the same
prompt length, batch sizes and decode steps, f32 on the CPU, transformers' own KV cache.
Run by hand (torch is never installed in CI):

    python bench/torch_baseline.py target/bench-models/qwen25_05b --prompt-len 128 --decode-steps 16 --batch 1,8
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--prompt-len", type=int, default=128)
p.add_argument("--decode-steps", type=int, default=16)
p.add_argument("--batch", default="1,8")
a = p.parse_args()
torch.set_grad_enabled(False)
model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.float32).eval()
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
print("| batch | prompt | prefill tok/s | decode ms/step | decode tok/s |")
for b in [int(x) for x in a.batch.split(",")]:
    ids = torch.randint(0, 150000, (b, a.prompt_len))
    t = time.perf_counter()
    out = model(ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    prefill = time.perf_counter() - t
    past = out.past_key_values
    t = time.perf_counter()
    for _ in range(a.decode_steps):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    dec = time.perf_counter() - t
    print(f"| {b} | {a.prompt_len} | {b * a.prompt_len / prefill:.0f} | {dec * 1e3 / a.decode_steps:.1f} | {b * a.decode_steps / dec:.1f} |")
