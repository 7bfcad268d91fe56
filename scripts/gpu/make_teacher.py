# A GPT-2-small-shaped teacher (12 x 768, vocab 50257, random init, seed 0)
# in the Hugging Face layout, with the repo's GPT-2 tokenizer files.
import shutil, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
out = sys.argv[1]
m = GPT2LMHeadModel(GPT2Config())
m.save_pretrained(out, safe_serialization=True)
for f in ("vocab.json", "merges.txt"):
    shutil.copy(f"assets/gpt2-tokenizer/{f}", out)
print("teacher saved:", sum(p.numel() for p in m.parameters()), "parameters")
