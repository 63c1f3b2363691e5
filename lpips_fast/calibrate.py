"""The training loop behind `lpips-fast train` and the scoring behind `lpips-fast eval2afc`:
upstream train.py's schedule (epochs at the initial learning rate, then decay epochs with a
linear decay to 0), a checkpoint after every epoch for --resume, lin weights written in the
released files' format (`linK.model.1.weight`, what `LPIPS(model_path=...)` loads).

Reproducible: the initial weights come from the seed; epoch e shuffles with a generator seeded (seed, e) and seeds torch's global
generator (dropout) with it too, so a resumed run ends with the weights of an uninterrupted
one.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import write_atomically
from .bapps import bapps_loader
from .trainer import Trainer, progress_bar, score_2afc_dataset


@dataclass
class TrainSettings:
    net: str = "alex"
    version: str = "0.1"
    epochs: int = 5           # upstream's nepoch
    decay_epochs: int = 5     # upstream's nepoch_decay
    lr: float = 1e-4
    beta1: float = 0.5
    batch_size: int = 50
    load_size: int = 64
    dropout: bool = True
    seed: int = 0
    impl: str = "auto"


# the settings a checkpoint must share with the run that resumes it
_RESUME_KEYS = ("net", "version", "epochs", "decay_epochs", "lr", "beta1", "batch_size",
                "load_size", "dropout", "seed")


def checkpoint_path(output) -> Path:
    return Path(str(output) + ".ckpt")


def lin_state(net) -> dict:
    """The lin layers' weights under the released files' keys (linK.model.1.weight)."""
    return {f"lin{k}.model.1.weight": lin.weight.detach().cpu().clone()
            for k, lin in enumerate(net.lins)}


def _save(path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomically(path, buf.getvalue())


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _resume(trainer, settings, ckpt: Path) -> int:
    """Load a checkpoint into the trainer; the number of epochs it had finished."""
    state = torch.load(ckpt, map_location=trainer.device, weights_only=True)
    differs = [k for k in _RESUME_KEYS if state["settings"].get(k) != getattr(settings, k)]
    if differs:
        raise ValueError(f"{ckpt}: the checkpoint was made with other settings ("
                         + ", ".join(f"{k} {state['settings'].get(k)!r} != "
                                     f"{getattr(settings, k)!r}" for k in differs) + ")")
    trainer.net.load_state_dict(state["net"])
    trainer.rankLoss.net.load_state_dict(state["rank"])
    trainer.optimizer_net.load_state_dict(state["optimizer"])
    trainer.old_lr = state["old_lr"]
    return state["epoch"]


def train(data, output, settings: TrainSettings, device="cpu", resume=False, progress=True,
          log=print):
    """Train lin layers on the 2AFC folder `data`; write them to `output`. Returns the
    last epoch's mean loss and accuracy (a dict), or None when nothing was left to do."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"training runs on the CPU or a CUDA device, not {device}")
    torch.manual_seed(settings.seed)  # the initial lin and ranking-net weights
    trainer = Trainer()
    trainer.initialize(net=settings.net, version=settings.version, is_train=True,
                       lr=settings.lr, beta1=settings.beta1, use_gpu=device.type == "cuda",
                       gpu_ids=[device.index or 0], dropout=settings.dropout,
                       impl=settings.impl, verbose=False)
    ckpt = checkpoint_path(output)
    start = _resume(trainer, settings, ckpt) if resume and ckpt.exists() else 0
    if resume and start:
        log(f"resuming after epoch {start} ({ckpt})")
    total = settings.epochs + settings.decay_epochs
    errors = None
    for epoch in range(start + 1, total + 1):
        errors = _train_epoch(trainer, data, settings, epoch, total, progress)
        if epoch > settings.epochs:
            trainer.old_lr = _decay(trainer, settings.decay_epochs)
        _save(ckpt, dict(settings=asdict(settings), epoch=epoch, net=trainer.net.state_dict(),
                         rank=trainer.rankLoss.net.state_dict(),
                         optimizer=trainer.optimizer_net.state_dict(), old_lr=trainer.old_lr))
        log(f"epoch {epoch}/{total}: loss {errors['loss_total']:.4f}  "
            f"acc {errors['acc_r']:.4f}  lr {trainer.old_lr:.3g}")
    _save(output, lin_state(trainer.net))
    return errors


def _decay(trainer, decay_epochs):
    """Trainer.update_learning_rate without its print (the epoch line says the lr)."""
    lr = trainer.old_lr - trainer.lr / decay_epochs
    for group in trainer.optimizer_net.param_groups:
        group["lr"] = lr
    return lr


def _train_epoch(trainer, data, settings, epoch, total, progress):
    seed = _epoch_seed(settings.seed, epoch)
    loader = bapps_loader(data, "2afc", settings.batch_size, shuffle=True,
                          load_size=settings.load_size,
                          generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # dropout masks
    losses, accs, counts = [], [], []
    for batch in progress_bar(loader, f"epoch {epoch}/{total}", progress):
        trainer.set_input(batch)
        trainer.optimize_parameters()
        errors = trainer.get_current_errors()
        losses.append(errors["loss_total"])
        accs.append(errors["acc_r"])
        counts.append(len(batch["judge"]))
    n = sum(counts)
    return {"loss_total": sum(v * c for v, c in zip(losses, counts)) / n,
            "acc_r": sum(v * c for v, c in zip(accs, counts)) / n}


def eval_2afc(data, net="alex", version="0.1", model_path=None, device="cpu", batch_size=50,
              load_size=64, impl="auto", progress=True):
    """The 2AFC score of LPIPS (released lin weights, or model_path's) on a 2AFC folder:
    (score, number of triplets)."""
    from .model import LPIPS
    model = LPIPS(net=net, version=version, model_path=model_path, verbose=False,
                  impl=impl).to(device)
    loader = bapps_loader(data, "2afc", batch_size, load_size=load_size)

    def dist(a, b):
        with torch.inference_mode():
            return model(a.to(device), b.to(device))
    score, info = score_2afc_dataset(loader, dist, name="2afc", progress=progress)
    if math.isnan(score):
        raise ValueError(f"{data}: the 2AFC score is NaN (a judgment outside [0, 1]?)")
    return float(score), len(info["gts"])
