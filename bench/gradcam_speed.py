"""How much does an explanation cost on top of a prediction? (CPU, random-init DenseNet121, 224 px)

    python bench/gradcam_speed.py                 # 30 timed runs each, after warm-up
    python bench/gradcam_speed.py --runs 50 --batch 4

Times, round-robin so that machine load hits every variant alike, the median of:
  predict      plain forward under torch.inference_mode (the baseline)
  fast         grad_cam(model, x): prediction + heatmap, closed-form weights, no backward
  general      grad_cam(model, x, target_layer=model.head.relu): hook + autograd on the same layer
  pgc          pytorch-grad-cam GradCAM on the same layer and class (created once, outside the timing)
and prints fast/predict (target <= 1.15) and fast/pgc (target <= 0.8). Uses torch's default thread count.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import grad_cam  # noqa: E402
from mediscan.core.model import build_model  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per variant (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per variant first (default: 3)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default: 224)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = get_args_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    model, _ = build_model(4, weights="none")
    model.eval()
    x = (torch.rand(args.batch, 1, args.size, args.size) * 2 - 1) * 1024
    with torch.inference_mode():
        predicted = model(x).argmax(1)

    def predict():
        with torch.inference_mode():
            return model(x)

    variants = {
        "predict": predict,
        "fast": lambda: grad_cam.grad_cam(model, x),
        "general": lambda: grad_cam.grad_cam(model, x, predicted, target_layer=model.head.relu),
    }
    reference = None
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        print("pytorch-grad-cam is not installed (pip install grad-cam==1.5.7): its timing is skipped")
    else:
        twin = copy.deepcopy(model)      # the reference writes .grad and calls .eval(): keep it apart
        reference = GradCAM(model=twin, target_layers=[twin.head.relu])
        targets = [ClassifierOutputTarget(int(c)) for c in predicted]
        variants["pgc"] = lambda: reference(input_tensor=x, targets=targets)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, input "
          f"{args.batch}x1x{args.size}x{args.size}, {args.runs} runs after {args.warmup} warm-up")
    # Same map from every explainer (sanity check, not timed).
    fast_cams = grad_cam.grad_cam(model, x).cams
    print(f"max |fast - general| = {float((fast_cams - variants['general']().cams).abs().max()):.2e}")
    if reference is not None:
        reference_cams = torch.from_numpy(variants["pgc"]())
        print(f"max |fast - pytorch-grad-cam| = {float((fast_cams - reference_cams).abs().max()):.2e}")

    for _ in range(args.warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    if reference is not None:
        reference.activations_and_grads.release()

    medians = {name: statistics.median(values) for name, values in times.items()}
    labels = {"predict": "prediction alone (inference_mode)", "fast": "fast path: prediction + heatmap",
              "general": "general path on head.relu", "pgc": "pytorch-grad-cam GradCAM"}
    for name, label in labels.items():
        if name in medians:
            print(f"{label:<36} median {1000 * medians[name]:8.1f} ms")
    fast_vs_predict = medians["fast"] / medians["predict"]
    print(f"fast / predict           = {fast_vs_predict:.3f}  (target <= 1.15)"
          f"  {'OK' if fast_vs_predict <= 1.15 else 'MISSED'}")
    if "pgc" in medians:
        fast_vs_pgc = medians["fast"] / medians["pgc"]
        print(f"fast / pytorch-grad-cam  = {fast_vs_pgc:.3f}  (target <= 0.8)"
              f"  {'OK' if fast_vs_pgc <= 0.8 else 'MISSED'}")
    print(f"general / predict        = {medians['general'] / medians['predict']:.3f}")
    return medians


if __name__ == "__main__":
    main()
