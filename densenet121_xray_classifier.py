"""Train and evaluate the MediScan organ classifier (DenseNet121, torchxrayvision weights).

Train with the default two-stage schedule (5 head epochs at lr 1e-3, 10 fine-tuning epochs at 1e-5):

    python densenet121_xray_classifier.py --data dataset --out models

Quick CPU smoke run from random weights, no network needed:

    python densenet121_xray_classifier.py --data dataset --out runs/smoke --weights none \\
        --head-epochs 1 --finetune-epochs 1

Continue an interrupted run, or evaluate a checkpoint on dataset/test alone:

    python densenet121_xray_classifier.py --data dataset --out models --resume
    python densenet121_xray_classifier.py --evaluate models/best.safetensors --data dataset

Refit the out-of-scope statistics of a checkpoint from an older MediScan (no retraining; predictions
do not change):

    python densenet121_xray_classifier.py --refit-ood models/best.safetensors --data dataset

Export a checkpoint for the optional ONNX Runtime CPU backend (writes models/best.onnx; checks parity):

    python densenet121_xray_classifier.py --export-onnx models/best.safetensors

Outputs in --out: best.safetensors, last.safetensors, history.csv, training_curves.png, report.md,
confusion_matrix.png/json, gradcam_gallery.png, metrics.json. Not a medical device.
"""
import sys

from mediscan.apps.train_cli import EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_OK, get_args_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
