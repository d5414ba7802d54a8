"""Classify one X-ray (or a folder of them) and show where the model looked.

Examples::

    # one image: prediction, probability table, verdict, and a figure (original | heatmap | overlay)
    python test_single_image.py chest.png
    python test_single_image.py scan.dcm --checkpoint models/best.safetensors --output scan_gradcam.png
    python test_single_image.py knee.jpg --explain-class bone          # heatmap for another class
    python test_single_image.py chest.png --json --no-figure           # one JSON object, for scripts

    # a folder (recursive): one CSV row per file, bad files get an error row
    python test_single_image.py dataset/test --csv results.csv
    python test_single_image.py incoming/ --csv results.csv --overlays overlays/
    python test_single_image.py /archive --csv results.csv --resume     # continue after a crash
    torchrun --standalone --nproc_per_node 4 test_single_image.py /archive --csv results.csv

The checkpoint is --checkpoint, else $MEDISCAN_MODEL, else models/best.safetensors.
Exit codes: 0 ok (folder mode: also when some files had errors -- see the CSV and the summary),
2 bad input (unreadable image, unknown class, empty folder), 3 no usable model.

Not a medical device: research and education only.
"""
import sys

from mediscan.apps.predict_cli import EXIT_BAD_INPUT, EXIT_NO_MODEL, EXIT_OK, get_args_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
