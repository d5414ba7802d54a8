"""GPU self-check of the training fast path: the CUDA-graph stage 2 must train like the eager one.

    python bench/gpu_selfcheck.py

Trains the same tiny synthetic task twice from the same weights (no augmentation, 1 head + 2 fine-tuning
epochs, 64 px): once replaying a captured CUDA graph, once eagerly. Prints the validation curves of both
and the largest weight difference; bf16 kernels are not bit-reproducible, so it checks closeness, not
equality. Then loads the graphed run's checkpoint in the Predictor on the GPU and checks the
out-of-scope promise there: at most 5 % of the validation images flagged (training ran under bf16; the
detector must have been fitted on the fp32 numbers the Predictor computes). Exits 1 if either check
fails. On a machine without CUDA it says so and exits 0.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from mediscan.core.checkpoint import load_checkpoint
from mediscan.devtools.synthetic import make_dataset
from mediscan.inference.predictor import Predictor
from mediscan.training.fit import TrainConfig, fit


def main() -> int:
    if not torch.cuda.is_available():
        print("CUDA is not available here: nothing to check")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "dataset", per_class=24, size=72, seed=5)
        runs = {}
        for graphs in (True, False):
            config = TrainConfig(data=str(data), out=str(Path(tmp) / f"graphs_{graphs}"), weights="none",
                                 input_size=64, head_epochs=1, finetune_epochs=2, finetune_lr=1e-4,
                                 augment=False, progress=False, gallery=False, cuda_graphs=graphs)
            lines: list[str] = []
            result = fit(config, log=lines.append)
            runs[graphs] = (result, load_checkpoint(Path(config.out) / "last.safetensors").model)
            print(f"cuda_graphs={graphs}: " + "; ".join(l for l in lines if l.startswith(("epoch", "stage 2", "CUDA"))))
        (graphed, g_model), (eager, e_model) = runs[True], runs[False]
        # Relative: BatchNorm running variances of a [-1024, 1024] input are in the millions.
        diff = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                   for a, b in zip(g_model.state_dict().values(), e_model.state_dict().values())
                   if a.is_floating_point())
        val_gap = max(abs(a["val_loss"] - b["val_loss"]) for a, b in zip(graphed.history, eager.history))
        print(f"largest relative weight difference after training: {diff:.3e}; largest val-loss gap: {val_gap:.3e}")
        ok = val_gap < 0.05
        print("OK: graphed and eager training agree" if ok else "MISMATCH between graphed and eager training")
        promise = out_of_scope_promise_holds(Path(tmp) / "graphs_True" / "best.safetensors", data)
        return 0 if ok and promise else 1


def out_of_scope_promise_holds(checkpoint: Path, data: Path) -> bool:
    """Does the Predictor, on the GPU, flag at most 5 % of the validation images the detector was fitted on?"""
    predictor = Predictor(checkpoint, "cuda")
    paths = sorted((data / "val").rglob("*.png"))
    flagged = sum(p.is_out_of_scope for p in predictor.predict_many(paths))
    share = flagged / len(paths)
    print(f"Predictor on cuda flags {flagged}/{len(paths)} validation images ({share:.1%}) as out of scope")
    ok = share <= 0.05
    print("OK: at most 5 % of validation flagged" if ok else "MISMATCH: the out-of-scope threshold does not hold")
    return ok


if __name__ == "__main__":
    sys.exit(main())
