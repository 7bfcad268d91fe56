# PyTorch on the same GPU: GPT-2 small (transformers) training tokens/s, plain
# next-token training and the distillation step (a frozen GPT-2 small teacher
# forward + student forward/backward with a*T^2*KL + (1-a)*CE), AdamW, grad clip.
import time, torch, torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
def bench(batch, seq, distill, dtype, steps=10, warm=3):
    cfg = GPT2Config()
    student = GPT2LMHeadModel(cfg).to(dev).train()
    teacher = GPT2LMHeadModel(cfg).to(dev).eval() if distill else None
    opt = torch.optim.AdamW(student.parameters(), lr=3e-4)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    inp, tgt = x[:, :-1], x[:, 1:]
    T, a = 2.0, 0.5
    def step():
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            logits = student(inp).logits
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt.reshape(-1))
            if distill:
                with torch.no_grad():
                    tl = teacher(inp).logits.float()
                kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(tl / T, -1),
                              log_target=True, reduction="batchmean") / seq
                loss = a * T * T * kl + (1 - a) * ce
            else:
                loss = ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    tps = steps * batch * seq / dt
    print(f"torch {'distill' if distill else 'train  '} {str(dtype):15s} batch {batch:3d} x seq {seq:5d}: {tps:10.0f} tokens/s ({dt / steps * 1e3:.1f} ms/step)", flush=True)
    del student, teacher, opt
    torch.cuda.empty_cache()
# TORCH_SHAPES="8x256,16x1024" (the default) picks the batch x seq shapes.
import os
shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ.get("TORCH_SHAPES", "8x256,16x1024").split(",")]
for batch, seq in shapes:
    for distill in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            bench(batch, seq, distill, dtype)
