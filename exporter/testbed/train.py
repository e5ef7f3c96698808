"""Train a test-bed model (Wan video or SD3 image) on procedural captioned data with rectified flow.

Two stages, because the GPU machine has no text-encoder weights:

    # here (CPU): every caption's MiniLM embeddings, once per data kind (+ the empty prompt, last row)
    python -m ditbake.exporter.testbed.train embed --out out/testbed
    # on the GPU: fit with a wall-clock budget; writes config.json, weights, history.json, loss.png
    python -m ditbake.exporter.testbed.train fit --model wan --embeds out/testbed --out OUT/testbed-wan --minutes 4

Classifier-free guidance: 10% of training samples get the empty prompt's embedding
(``TextEncoder.encode([""])``, i.e. [CLS] [SEP] then zero rows); sampling uses it as negative.
The weights saved are an exponential moving average of the trained ones.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ditbake.exporter.testbed import data, flow
from ditbake.exporter.testbed.models import DATA_FILE, TESTBEDS, TEXT_LEN, build, data_spec_record

log = logging.getLogger("ditbake.testbed")

EMBED_FILE = "embeds_{kind}.safetensors"


class TrainConfigError(ValueError):
    """A training configuration value is out of range."""


@dataclass(frozen=True)
class TrainConfig:
    model: str = "wan"
    minutes: float = 4.0
    max_steps: int = 100_000
    batch_size: int = 64
    lr: float = 4e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    cfg_dropout: float = 0.1
    shift: float = flow.DEFAULT_SHIFT
    held_out_samples: int = 256
    eval_every: int = 250
    seed: int = 0
    # render at another size than the bed's (frames, height, width): a cheap low-resolution stage
    # first, the full size after (`--init`); the data rules (motion per frame, split) are the bed's
    clip: tuple[int, int, int] | None = None
    compile: bool = False  # regional torch.compile of the blocks (GPU time is the training budget)

    def __post_init__(self):
        if self.model not in TESTBEDS:
            raise TrainConfigError(f"unknown test-bed model {self.model!r}; expected one of {sorted(TESTBEDS)}")
        if not 0 <= self.cfg_dropout < 1 or not 0 < self.ema_decay < 1:
            raise TrainConfigError("cfg_dropout must be in [0, 1) and ema_decay in (0, 1)")
        if self.minutes <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise TrainConfigError("minutes, batch_size and lr must be positive")


# ---------------------------------------------------------------- text embeddings

def embed_captions(kind: str, out_dir: Path, batch: int = 256) -> Path:
    """Write tokens [N+1, L, 384] (fp16) and pooled [N+1, 384] for every caption of `kind`; row N is ""."""
    from safetensors.torch import save_file  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ditbake.runtime.text_encoder import TextEncoder  # noqa: PLC0415

    encoder = TextEncoder.load(max_length=TEXT_LEN)
    captions = data.all_captions(kind) + [""]
    tokens, pooled = [], []
    for i in tqdm(range(0, len(captions), batch), desc=f"embed {kind}"):
        hidden, mask = encoder.encode_with_mask(captions[i:i + batch])
        tokens.append(hidden)
        pooled.append(hidden.sum(1) / mask.sum(1, keepdim=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EMBED_FILE.format(kind=kind)
    save_file({"tokens": torch.cat(tokens).half(), "pooled": torch.cat(pooled).half()}, str(path))
    log.info("wrote %s (%d captions + empty prompt)", path, len(captions) - 1)
    return path


def load_embeds(embeds_dir: Path, kind: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    t = load_file(str(Path(embeds_dir) / EMBED_FILE.format(kind=kind)))
    if t["tokens"].shape[0] != data.num_captions(kind) + 1:
        raise TrainConfigError(f"embedding table has {t['tokens'].shape[0]} rows, expected "
                               f"{data.num_captions(kind) + 1}; re-run `train embed`")
    return t["tokens"].float().to(device), t["pooled"].float().to(device)


# ---------------------------------------------------------------- training

def load_model(path: Path):
    """A saved test-bed model (fp32), to continue training from."""
    import diffusers  # noqa: PLC0415

    config = json.loads((Path(path) / "config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_pretrained(str(path), torch_dtype=torch.float32)


def _lr_at(step: int, cfg: TrainConfig, progress: float) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Trainer:
    def __init__(self, cfg: TrainConfig, embeds_dir: Path, device: torch.device, init: Path | None = None):
        self.cfg = cfg
        self.device = device
        self.spec = TESTBEDS[cfg.model][1] if cfg.clip is None else TESTBEDS[cfg.model][1].at_size(*cfg.clip)
        self.kind = self.spec.kind
        torch.manual_seed(cfg.seed)
        self.model = (build(cfg.model) if init is None else load_model(init)).to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if cfg.compile:
            import importlib  # noqa: PLC0415

            importlib.import_module("torch._dynamo").config.suppress_errors = True  # a graph that fails to compile runs eagerly
            for block in self.model.blocks:
                block.compile()
        self.tokens, self.pooled = load_embeds(embeds_dir, self.kind, device)
        self.empty_id = self.tokens.shape[0] - 1
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.99))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.held_out = self._held_out_batch()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _held_out_batch(self):
        """Fixed held-out captions, placements, noise and times (seed-independent of training)."""
        gen = torch.Generator().manual_seed(12345)
        n = self.cfg.held_out_samples
        scenes = data.sample_scenes(self.spec, n, gen, split="held_out")
        x0 = data.render(self.spec, scenes, self.device)
        noise = torch.randn(x0.shape, generator=gen).to(self.device)
        t = flow.shift_sigmas((torch.arange(n) + 0.5) / n, self.cfg.shift).to(self.device)
        return x0, scenes.caption_ids.to(self.device), noise, t

    def _loss(self, model, x0, ids, noise, t) -> torch.Tensor:
        x_t, target = flow.training_pair(x0, noise, t)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            v = flow.model_velocity(model, self.kind, x_t, t, self.tokens[ids], self.pooled[ids])
        return F.mse_loss(v.float(), target)

    @torch.no_grad()
    def held_out_loss(self, model) -> float:
        x0, ids, noise, t = self.held_out
        losses = [self._loss(model, x0[i:i + 64], ids[i:i + 64], noise[i:i + 64], t[i:i + 64]).item()
                  for i in range(0, len(ids), 64)]
        return float(sum(losses) / len(losses))

    def step(self, step: int, progress: float) -> float:
        cfg = self.cfg
        scenes = data.sample_scenes(self.spec, cfg.batch_size, self.gen)
        x0 = data.render(self.spec, scenes, self.device)
        ids = scenes.caption_ids.to(self.device)
        drop = torch.rand(cfg.batch_size, generator=self.gen).to(self.device) < cfg.cfg_dropout
        ids = torch.where(drop, torch.full_like(ids, self.empty_id), ids)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        t = flow.sample_t(cfg.batch_size, cfg.shift, self.gen, self.device)
        loss = self._loss(self.model, x0, ids, noise, t)
        for group in self.opt.param_groups:
            group["lr"] = _lr_at(step, cfg, progress)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(self.ema.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - decay)
        return loss.item()

    def fit(self) -> dict:
        from tqdm.auto import tqdm  # noqa: PLC0415

        cfg = self.cfg
        budget = cfg.minutes * 60
        history = {"step": [], "train_loss": [], "eval_step": [], "held_out_loss": []}
        start = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, desc=f"train {cfg.model}", mininterval=10)
        step = 0
        while step < cfg.max_steps:
            elapsed = time.perf_counter() - start
            if elapsed > budget:
                break
            loss = self.step(step, elapsed / budget)
            history["step"].append(step)
            history["train_loss"].append(loss)
            if step % cfg.eval_every == 0:
                history["eval_step"].append(step)
                history["held_out_loss"].append(self.held_out_loss(self.ema))
                bar.set_postfix(loss=f"{loss:.4f}", held_out=f"{history['held_out_loss'][-1]:.4f}")
            step += 1
            bar.update(1)
        bar.close()
        minutes = (time.perf_counter() - start) / 60
        final = self.held_out_loss(self.ema)
        history["eval_step"].append(step)
        history["held_out_loss"].append(final)
        log.info("%s: %d steps in %.1f min, held-out loss (EMA) %.4f", cfg.model, step, minutes, final)
        return {"config": asdict(cfg), "parameters": self.parameters, "steps": step, "train_minutes": minutes,
                "clip": [self.spec.frames, self.spec.height, self.spec.width],
                "final_held_out_loss": final, "device": torch.cuda.get_device_name() if self.device.type == "cuda"
                else "cpu", "batch_size": cfg.batch_size, "history": history}


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the up to `window - 1` before it (the loss curves' smoothing)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_loss(history: dict, path: Path, title: str) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    steps, loss = history["step"], history["train_loss"]
    window = max(1, len(loss) // 100)
    smooth = running_mean(loss, window)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, smooth, label=f"train (mean of {window})", lw=1)
    ax.plot(history["eval_step"], history["held_out_loss"], "o-", ms=3, label="held-out captions (EMA weights)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save(trainer: Trainer, result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    trainer.ema.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    (out / "history.json").write_text(json.dumps(result))
    (out / DATA_FILE).write_text(json.dumps(data_spec_record(TESTBEDS[trainer.cfg.model][1], trainer.cfg.model), indent=1))
    try:
        plot_loss(result["history"], out / "loss.png", f"test-bed {trainer.cfg.model}")
    except ImportError:
        log.warning("matplotlib missing: loss.png not written (history.json has the curve)")


def _clip_size(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FxHxW such as 16x32x32, got {text!r}") from None
    return f, h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditbake.exporter.testbed.train")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="MiniLM embeddings of every caption (run where the encoder is installed)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("fit", help="train one test-bed model with a wall-clock budget")
    p.add_argument("--model", choices=sorted(TESTBEDS), required=True)
    p.add_argument("--embeds", type=Path, required=True, help="directory written by `embed`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--compile", action="store_true", help="torch.compile each block (regional)")
    p.add_argument("--clip", type=_clip_size, help="FxHxW to render at instead of the bed's size (a low-res stage)")
    p.add_argument("--init", type=Path, help="continue from a saved model directory (fresh optimizer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "embed":
        for kind in data.KINDS:
            embed_captions(kind, args.out)
        return 0
    cfg = TrainConfig(model=args.model, minutes=args.minutes, max_steps=args.max_steps, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                      clip=args.clip, compile=args.compile)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(cfg, args.embeds, torch.device(args.device), init=args.init)
    log.info("%s: %.2fM parameters, batch %d, %.1f min budget", cfg.model, trainer.parameters / 1e6,
             cfg.batch_size, cfg.minutes)
    save(trainer, trainer.fit(), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
