"""Layer 0: images in, tensors and checkpoints out.

imaging, preprocessing, model, checkpoint, ood, dataset, runtime (device, autocast, batched forward).
"""
