"""The command line of ``densenet121_xray_classifier.py`` (also installed as ``mediscan-train``).

Usage and examples are in that file's docstring and in ``--help``.
"""
from __future__ import annotations

import argparse
import sys

from mediscan.apps.exit_codes import EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_OK


def get_args_parser() -> argparse.ArgumentParser:
    from mediscan.training.config import TrainConfig
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train (two stages) or evaluate the MediScan organ classifier.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=d.data, help="dataset folder with train/ [val/] test/, one sub-folder per class")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {d.out} when training, <checkpoint folder>/evaluation with "
                        f"--evaluate, the checkpoint itself with --refit-ood)")
    p.add_argument("--weights", default=d.weights,
                   help="starting weights: a torchxrayvision DenseNet121 name, a local .pt / CheXNet model.pth.tar, or 'none'")
    p.add_argument("--weights-cache", default=d.weights_cache, help="folder for downloaded weights (default: ~/.torchxrayvision)")
    p.add_argument("--input-size", type=int, default=d.input_size, help="model input side in pixels")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="stage 1: epochs with the backbone frozen")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs, help="stage 2: epochs with all layers trainable")
    p.add_argument("--head-lr", type=float, default=d.head_lr, help="Adam learning rate in stage 1")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr, help="Adam learning rate in stage 2")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the final Linear layer")
    p.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency (imbalanced data)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="turn off training augmentation")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of train/ held out when there is no val/")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable or non-image files (listed) instead of stopping")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (split, shuffling, augmentation)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--workers", type=int, default=d.workers, help="threads that decode images")
    p.add_argument("--cache-dir", default=d.cache_dir,
                   help="folder for an on-disk cache of the decoded images, reused by later runs on the same "
                        "data and input size; --evaluate and --refit-ood read it too (default: decoded images "
                        "stay in RAM)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 mixed precision on CUDA")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="train stage 2 eagerly on CUDA instead of replaying a captured graph")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.safetensors")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars (log lines only)")
    p.add_argument("--no-gallery", dest="gallery", action="store_false", help="skip the Grad-CAM gallery in the report")
    p.add_argument("--modalities", default=d.modalities,
                   help="DICOM modalities the model is for, e.g. CR,DX (default: the Modality of DICOM training "
                        "files, else CR,DX,CT,MR,XA,RF); a DICOM of any other modality is out of scope")
    p.add_argument("--outlier-exposure", action="store_true",
                   help="stage 2 also trains on synthetic outliers made from the batch (energy-margin loss)")
    p.add_argument("--oe-weight", type=float, default=d.oe_weight, help="weight of the outlier-exposure loss")
    p.add_argument("--oe-kinds", default=d.oe_kinds,
                   help="synthetic outlier kinds for --outlier-exposure: all, or a comma-separated subset of "
                        "patch_shuffle, phase_scramble, mosaic, warp, texture, blend, dead_leaves")
    p.add_argument("--evaluate", metavar="CHECKPOINT", help="only evaluate CHECKPOINT on <data>/test and write a report")
    p.add_argument("--refit-ood", metavar="CHECKPOINT",
                   help="only refit CHECKPOINT's out-of-scope statistics on <data> train/val (no retraining)")
    p.add_argument("--export-onnx", metavar="CHECKPOINT",
                   help="only export CHECKPOINT to ONNX for the Predictor's ONNX Runtime backend")
    p.add_argument("--onnx-out", metavar="PATH", default=None,
                   help="where --export-onnx writes (default: the checkpoint's path with a .onnx suffix)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.onnx_out and not args.export_onnx:
        parser.error("--onnx-out is only used with --export-onnx")
    if args.modalities is not None:
        from mediscan.training.modalities import parse_modalities
        try:
            parse_modalities(args.modalities)
        except ValueError as exc:
            parser.error(str(exc))
    from mediscan.training.outliers import parse_outlier_kinds
    try:
        parse_outlier_kinds(args.oe_kinds)
    except ValueError as exc:
        parser.error(str(exc))
    from mediscan.core.checkpoint import CheckpointError
    from mediscan.core.dataset import DatasetError
    from mediscan.core.model import WeightsError
    try:
        if args.export_onnx:
            from mediscan.inference.onnx_export import export_onnx
            done = export_onnx(args.export_onnx, args.onnx_out)
            print(f"onnx: {done.path} (checkpoint sha256 {done.checkpoint_sha256[:12]}..., max probability "
                  f"difference vs PyTorch {done.max_probability_difference:.1e})")
            return EXIT_OK
        if args.refit_ood:
            from mediscan.training.finalize import refit_ood
            target, _ = refit_ood(args.refit_ood, args.data, out=args.out, batch_size=args.batch_size,
                                  workers=args.workers, device=args.device, skip_bad=args.skip_bad,
                                  cache_dir=args.cache_dir)
            from mediscan.inference.onnx_backend import export_command, onnx_path_for
            if onnx_path_for(target).is_file():
                print(f"note: {onnx_path_for(target)} is now stale; re-export it with\n    {export_command(target)}")
            return EXIT_OK
        if args.evaluate:
            from mediscan.evaluation.report import evaluate_checkpoint
            report = evaluate_checkpoint(args.evaluate, args.data, out_dir=args.out, batch_size=args.batch_size,
                                         workers=args.workers, device=args.device, skip_bad=args.skip_bad,
                                         cache_dir=args.cache_dir)
            print(f"report: {report}")
            return EXIT_OK
        from mediscan.training.config import TrainConfig
        from mediscan.training.fit import fit
        options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
        config = TrainConfig(**options)
        result = fit(config)
        print(f"done in {result.seconds / 60:.1f} min: {result.best_path}" +
              (f", report {result.report_path}" if result.report_path else ""))
        return EXIT_OK
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_MODEL
    except (DatasetError, WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch is in <out>/last.safetensors; continue with --resume",
              file=sys.stderr)
        return 130

