"""Training and generation speed of CALM-M-sized models on one device (the GPU check's core).

For CALM (the ``m`` preset: K = 4, l = 128, a 1024 x 16 backbone, an energy head with N = 8,
M = 100) and the token baseline of the same backbone, with random weights and a synthetic
batch, it measures:

* training: tokens/s and model FLOPs utilisation (MFU: analytic training FLOPs per second over
  the device's peak bf16 FLOPs), in bf16 autocast, eager and with ``torch.compile``;
* generation: tokens/s at batch 1 and 32 after a 32-token prompt, T = 1.

Usage::

    python benchmarks/gpu_bench.py [--device cuda] [--peak-tflops 989] [--json OUT]
    python benchmarks/gpu_bench.py --device cpu --tiny      # a smoke test of the script itself

It prints one JSON line per measurement and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_models.config import BackboneConfig, BaselineConfig, HeadConfig, preset  # noqa: E402
from calm_models.runs import build_model  # noqa: E402


def _models(tiny: bool) -> dict[str, torch.nn.Module]:
    cfg = preset("m", "calm")
    if tiny:  # the same code paths at a size a CPU runs in seconds
        backbone = BackboneConfig(hidden_size=64, num_layers=2, num_heads=4, max_seq_len=512)
        cfg = replace(
            cfg,
            data=replace(cfg.data, vocab_size=512),
            autoencoder=replace(cfg.autoencoder, hidden_size=64, latent_size=16),
            calm=replace(cfg.calm, backbone=backbone, head=HeadConfig(hidden_size=64, num_blocks=1)),
            baseline=BaselineConfig(**asdict(backbone)),
        )
    calm = build_model(cfg, cfg.data.vocab_size)
    ar = build_model(replace(cfg, stage="ar"), cfg.data.vocab_size)
    return {"calm": calm, "ar": ar}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(model, device, block_len: int, batch: int, steps: int, compile_: bool, peak: float) -> dict:
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    step_fn = torch.compile(model.loss) if compile_ else model.loss
    tokens = torch.randint(model.vocab_size, (batch, block_len), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = step_fn(tokens)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    tok_s = batch * block_len / seconds
    flops = model.flops_per_token(block_len)["train"]
    return {
        "tokens_per_s": tok_s,
        "train_flops_per_token": flops,
        "mfu": tok_s * flops / peak if peak else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }


@torch.no_grad()
def generation_speed(model, device, batch: int, new_tokens: int) -> dict:
    model = model.to(device).eval()
    prompts = torch.randint(model.vocab_size, (batch, 32), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        model.generate(prompts, 8, generator=gen)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model.generate(prompts, new_tokens, generator=gen)
        _sync(device)
    return {"tokens_per_s": batch * new_tokens / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the device (H100/H200 SXM: 989)"
    )
    parser.add_argument("--block-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="small models (checks the script)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        args.block_len, args.batch, args.steps = 64, 2, 2
    torch.manual_seed(0)
    rows = []
    for name, model in _models(args.tiny).items():
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("autoencoder."))
        for compile_ in (False,) if args.no_compile else (False, True):
            row = {
                "model": name,
                "params_m": params / 1e6,
                "what": "train",
                "compile": compile_,
                **train_speed(
                    model,
                    device,
                    args.block_len,
                    args.batch,
                    args.steps,
                    compile_,
                    args.peak_tflops * 1e12 if device.type == "cuda" else 0.0,
                ),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        for batch in (1, 32):
            row = {
                "model": name,
                "what": f"generate batch {batch}",
                **generation_speed(model, device, batch, 16 if args.tiny else 128),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n| model | measurement | tokens/s | MFU |\n|---|---|---|---|")
    for r in rows:
        what = r["what"] + (" (compiled)" if r.get("compile") else "")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        print(f"| {r['model']} | {what} | {r['tokens_per_s']:,.0f} | {mfu} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
