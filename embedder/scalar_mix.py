"""AllenNLP's ScalarMix: a learned, softmax-normalised mix of layer outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _tiny_value_of_dtype(dtype: torch.dtype) -> float:
    return 1e-13 if dtype in (torch.float32, torch.float64) else 1e-4


class ScalarMix(torch.nn.Module):
    """Compute ``gamma * sum_k softmax(w)_k * h_k`` over ``mixture_size`` tensors.

    With ``do_layer_norm`` each tensor is first normalised by the mean and
    variance of its unmasked elements, as in AllenNLP (requires ``mask``).
    """

    def __init__(
        self,
        mixture_size: int,
        do_layer_norm: bool = False,
        initial_scalar_parameters: Sequence[float] | None = None,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.mixture_size = mixture_size
        self.do_layer_norm = do_layer_norm
        if initial_scalar_parameters is None:
            initial_scalar_parameters = [0.0] * mixture_size
        elif len(initial_scalar_parameters) != mixture_size:
            raise ValueError(
                f"Length of initial_scalar_parameters {list(initial_scalar_parameters)} "
                f"differs from mixture_size {mixture_size}"
            )
        self.scalar_parameters = torch.nn.ParameterList(
            torch.nn.Parameter(torch.tensor([float(value)]), requires_grad=trainable)
            for value in initial_scalar_parameters
        )
        self.gamma = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=trainable)

    def forward(self, tensors: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mix ``mixture_size`` tensors of one shape (``[batch, length, dim]``, a layer each).

        Parameters
        ----------
        tensors : ``Sequence[torch.Tensor]``
            ``mixture_size`` tensors of shape ``[batch, length, dim]``.
        mask : ``torch.Tensor``, optional
            ``[batch, length]``, True at real positions: the positions ``do_layer_norm`` normalizes over
            (required with it).

        Returns
        -------
        ``[batch, length, dim]``: ``gamma * sum_k softmax(w)_k * h_k``.
        """
        if len(tensors) != self.mixture_size:
            raise ValueError(f"{len(tensors)} tensors were passed, but the module was initialized "
                             f"to mix {self.mixture_size} tensors.")
        weights = torch.softmax(torch.cat(list(self.scalar_parameters)), dim=0)
        dtype = tensors[0].dtype
        weights = weights.to(dtype)
        gamma = self.gamma.to(dtype)
        if not self.do_layer_norm:
            return gamma * sum(weight * tensor for weight, tensor in zip(weights, tensors))
        if mask is None:
            raise ValueError("ScalarMix with do_layer_norm=True needs a mask")
        broadcast_mask = mask.unsqueeze(-1).to(dtype)
        num_elements_not_masked = mask.sum() * tensors[0].size(-1)
        return gamma * sum(
            weight * self._layer_norm(tensor, broadcast_mask, num_elements_not_masked)
            for weight, tensor in zip(weights, tensors)
        )

    @staticmethod
    def _layer_norm(tensor: torch.Tensor, broadcast_mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        tensor_masked = tensor * broadcast_mask
        mean = tensor_masked.sum() / count
        variance = (((tensor_masked - mean) * broadcast_mask) ** 2).sum() / count
        return (tensor - mean) / torch.sqrt(variance + _tiny_value_of_dtype(variance.dtype))
