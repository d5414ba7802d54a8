"""A whole training step (augment, forward, backward, Adam) captured once as a CUDA graph and replayed.

At batch 16 a DenseNet121 step launches about a thousand small kernels and the GPU mostly waits for
the CPU to launch them. Replaying a captured graph launches them all at once. The recipe follows
PyTorch's "whole network capture": warm up on a side stream, zero grads to None, capture forward,
backward and ``optimizer.step()`` (Adam with ``capturable=True``), then copy each new batch into the
static input buffers and replay. Batches must all have the capture's shape, so the last incomplete
batch of an epoch is dropped on this path (the per-epoch reshuffle still uses every image over time).
"""
from __future__ import annotations

import torch
from torch import nn

from mediscan.training.augment import augment_batch


class GraphedTrainStep:
    """Callable ``(images, labels) -> (loss, logits)`` that replays one captured training step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
                 example_images: torch.Tensor, example_labels: torch.Tensor, *, augment: bool,
                 amp: bool, warmup_steps: int = 3):
        self.static_images = example_images.clone()
        self.static_labels = example_labels.clone()
        self._model, self._optimizer, self._criterion = model, optimizer, criterion
        self._augment, self._amp = augment, amp

        # Warm-up and capture run real steps; put weights and optimizer state back afterwards (in place,
        # so the graph's addresses stay valid) so that graphed training equals eager training.
        saved_model = {k: v.clone() for k, v in model.state_dict().items()}
        saved_optim = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
                       for p, st in optimizer.state.items()}

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):          # warm-up: cuDNN autotuning and allocator state settle
            for _ in range(warmup_steps):
                optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)

        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # grads are (re)allocated inside the graph's memory pool
        with torch.cuda.graph(self.graph):
            self.static_loss, self.static_logits = self._step()

        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(saved_model[key])
            for param, state in optimizer.state.items():
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        continue
                    if param in saved_optim:
                        value.copy_(saved_optim[param][key])
                    else:                      # state created by the warm-up: back to a fresh Adam
                        value.zero_()

    def _step(self):
        images = self.static_images
        if self._augment:
            images = augment_batch(images)     # device RNG: replays draw fresh numbers
        images = images.contiguous(memory_format=torch.channels_last)
        # Autocast's cache of bf16 weight copies must be off inside a graph: a cached copy would be
        # frozen into the capture and never see the optimizer's updates.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._amp, cache_enabled=False):
            logits = self._model(images)
        loss = self._criterion(logits.float(), self.static_labels)
        loss.backward()
        self._optimizer.step()
        return loss.detach(), logits.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.static_loss, self.static_logits
