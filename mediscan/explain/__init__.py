"""Layer 1: what a Grad-CAM map looks like and how faithful it is (overlays, faithfulness), on top of grad_cam.py."""
