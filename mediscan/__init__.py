"""MediScan: organ classification of medical images (bone, brain, heart, lungs) with Grad-CAM explanations.

The shared core every entry point imports. Not a medical device: research and education only.
"""

__version__ = "0.1.0"

NOT_FOR_CLINICAL_USE = ("Not a medical device. MediScan is for research and education only and must not be "
                        "used for diagnosis or any clinical decision.")
