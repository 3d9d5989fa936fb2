"""trainkit's step against a hand-written loop on a GPU-sized Transformer, in one process.

Both contenders train their own copy of the same encoder-decoder (d_model 512, 6+6 layers,
vocabulary 8,000: nmt_base's shape at a realistic vocabulary) on the same pinned batches of
random tokens, with fused AdamW, clipping at 1.0 and the same autocast. The raw loop is what a
careful user writes: non-blocking copies, ``clip_grad_norm_`` without reading the norm, no
host sync in the step. trainkit runs ``Trainer.train_step`` and ``after_step`` (what ``fit``
does per step: metering, the non-finite check on the device, the logging every 50 steps).
Windows of steps alternate between the contenders; each window ends with
``torch.cuda.synchronize()``, so its time is the GPU's time for those steps. Reported: the
median time per step of each, their ratio, and trainkit's overhead per step.

    python scripts/bench_gpu_step.py [--precision bf16] [--windows 8] [--steps 25]
    python scripts/bench_gpu_step.py --cpu      # tiny sizes: checks that it runs (no GPU figures)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from types import SimpleNamespace

import torch

from trainkit.engine.loop import Trainer
from trainkit.models import Transformer
from trainkit.tasks import Seq2SeqTask

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_batches(count: int, batch: int, length: int, vocab: int, pin: bool) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        tokens = torch.randint(3, vocab, (batch, 2 * length + 1), generator=generator)
        item = {"src": tokens[:, :length], "tgt_in": tokens[:, length:-1], "tgt_out": tokens[:, length + 1:]}
        batches.append({k: v.pin_memory() if pin else v for k, v in item.items()})
    return batches


def raw_step(model, optimizer, loss_fn, batch, device, dtype, scaler):
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(batch["src"], batch["tgt_in"])
    loss = loss_fn(logits.float().flatten(0, 1), batch["tgt_out"].flatten()) / batch["tgt_out"].numel()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: a smoke run")
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--windows", type=int, default=8, help="windows per contender (alternating)")
    parser.add_argument("--steps", type=int, default=25, help="steps per window")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = (dict(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64, vocab=100, batch=8, length=8)
             if args.cpu else dict(d_model=512, num_heads=8, num_encoder_layers=6, num_decoder_layers=6, ffn_dim=2048,
                                   vocab=8000, batch=64, length=64))
    vocab, batch, length = sizes.pop("vocab"), sizes.pop("batch"), sizes.pop("length")
    torch.manual_seed(0)
    model = Transformer(src_vocab_size=vocab, tgt_vocab_size=vocab, pad_id=0, dropout=0.1, **sizes)
    raw_model = copy.deepcopy(model).to(device)
    fused = dict(lr=1e-4, fused=True)
    raw_optimizer = torch.optim.AdamW(raw_model.parameters(), **fused)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=0)
    dtype = DTYPES[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    task = Seq2SeqTask(loss_fn, SimpleNamespace(pad_id=0), metrics=["perplexity"], num_samples=0)
    trainer = Trainer(model, torch.optim.AdamW(model.parameters(), **fused), task=task, precision=args.precision,
                      device=device, clip_grad_norm=1.0, log_every_n_steps=50)
    batches = make_batches(args.steps, batch, length, vocab, pin=device.type == "cuda")

    def window(contender: str) -> float:
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        started = time.perf_counter()
        for item in batches:
            if contender == "raw":
                raw_step(raw_model, raw_optimizer, loss_fn, item, device, dtype, scaler)
            else:
                trainer.train_step([item])
                trainer.after_step(None)
        sync()
        return (time.perf_counter() - started) / len(batches)

    window("raw"), window("trainkit")  # warm-up: optimizer state, cuBLAS, the caching allocator
    times = {"raw": [], "trainkit": []}
    for index in range(args.windows):
        order = ("raw", "trainkit") if index % 2 == 0 else ("trainkit", "raw")
        for contender in order:
            times[contender].append(window(contender))
    raw, ours = statistics.median(times["raw"]), statistics.median(times["trainkit"])
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "precision": args.precision,
              "parameters": sum(p.numel() for p in model.parameters()), "batch": [batch, length],
              "raw_ms_per_step": round(1000 * raw, 3), "trainkit_ms_per_step": round(1000 * ours, 3),
              "ratio": round(ours / raw, 4), "overhead_us_per_step": round(1e6 * (ours - raw), 1)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
